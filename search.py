"""Nearest-neighbour search of query descriptors among database descriptors, with memory bounded by a budget.

- Exact search (the default and the reference): faiss' L2 k-NN over the database a block at a time with a
  running top-k (`StreamingExactSearch`), bit-identical to the one-shot `exact_search`.
- Approximate faiss indexes (`FAISS_INDEXES`, --faiss_index): trained on a sample of the database, built in
  parts that each fit the budget, saved beside the descriptors and reused, searched part by part for chunks of
  queries, the parts' top-k merged.
`search_descriptors(database, queries, k, settings, index_folder)` picks one of the two from the settings.
"""
import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

import faiss
import numpy as np

from commons import UserInputError, progress_bar, write_atomically
from descriptor_store import sha256_of_strings
from indexes import (DEFAULT_MAX_PQ_BYTES, DEFAULT_MAX_RAM_GB, PQ_CENTROIDS, TRAIN_VECTORS_PER_CENTROID, IndexParams,
                     get_index_type)

GIB = 1024 ** 3
# faiss' BLAS buffers, Python and NumPy temporaries: kept out of the budget's share for descriptors
FIXED_OVERHEAD_BYTES = 64 * 1024 ** 2
INDEX_FILE_PATTERN = "part_{:05d}.faiss"
INDEX_INFO_NAME = "index.json"


# ----------------------------------------------------------------------------------------------------------
# Exact search

def exact_search(database_descriptors, queries_descriptors, k):
    """faiss' exact L2 k-NN: (squared L2 distances, database indices), each [queries_num, k], nearest first.
    The same computation as IndexFlatL2.search, without copying the database into an index."""
    return faiss.knn(np.ascontiguousarray(queries_descriptors, dtype=np.float32),
                     np.ascontiguousarray(database_descriptors, dtype=np.float32), k)


def merge_top_k(distances, predictions, new_distances, new_predictions, k):
    """The k nearest of two result lists per query ([queries, a] and [queries, b]). Stable: among equal
    distances the first list's entries, then the earlier columns, stay first, as in faiss' own search."""
    distances = np.concatenate([distances, new_distances], axis=1)
    predictions = np.concatenate([predictions, new_predictions], axis=1)
    order = np.argsort(distances, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(distances, order, axis=1), np.take_along_axis(predictions, order, axis=1)


class StreamingExactSearch:
    """Exact search with a running top-k over database descriptors given in order, a chunk at a time.

    Memory holds one chunk of the database, one chunk of the queries and the running results, never the whole
    database. `queries_descriptors` is anything that slices into [n, dim] rows: an array, a memory map of
    stored descriptors (any float dtype; read as float32, `query_chunk_size` rows at a time, None: all at once).
    The default database chunk is faiss' own database block, so every distance is computed exactly as
    `exact_search` computes it; ties are kept in database order as faiss does: the results are identical.
    """

    def __init__(self, queries_descriptors, k, chunk_size=None, query_chunk_size=None):
        self.queries = queries_descriptors
        self.queries_num = len(queries_descriptors)
        self.k = k
        self.chunk_size = chunk_size or faiss.cvar.distance_compute_blas_database_bs
        self.query_chunk_size = query_chunk_size or max(1, self.queries_num)
        # The queries in float32 once and for all when they come in one chunk
        self.query_cache = (np.ascontiguousarray(queries_descriptors[:], dtype=np.float32)
                            if self.query_chunk_size >= self.queries_num else None)
        self.buffer = None
        self.filled = 0
        self.offset = 0  # database index of buffer[0]
        self.distances = np.empty((self.queries_num, 0), dtype=np.float32)
        self.predictions = np.empty((self.queries_num, 0), dtype=np.int64)
        self.seconds = 0.0

    def add(self, descriptors):
        """Add the next database descriptors [n, dim], in database order."""
        if self.filled == 0 and len(descriptors) == self.chunk_size:  # a whole chunk: no copy into the buffer
            self._search_chunk(np.ascontiguousarray(descriptors, dtype=np.float32))
            return
        if self.buffer is None:
            self.buffer = np.empty((self.chunk_size, descriptors.shape[1]), dtype=np.float32)
        start = 0
        while start < len(descriptors):
            taken = min(self.chunk_size - self.filled, len(descriptors) - start)
            self.buffer[self.filled:self.filled + taken] = descriptors[start:start + taken]
            self.filled += taken
            start += taken
            if self.filled == self.chunk_size:
                self._search_chunk(self.buffer)

    def _query_chunks(self):
        if self.query_cache is not None:
            yield 0, self.query_cache
            return
        for start in range(0, self.queries_num, self.query_chunk_size):
            end = min(start + self.query_chunk_size, self.queries_num)
            yield start, np.ascontiguousarray(self.queries[start:end], dtype=np.float32)

    def _search_chunk(self, chunk):
        start_time = time.perf_counter()
        size = len(chunk) if chunk is not self.buffer else self.filled
        chunk = chunk[:size]
        k = min(self.k, size)
        distances = np.empty((self.queries_num, min(self.k, self.distances.shape[1] + k)), dtype=np.float32)
        predictions = np.empty(distances.shape, dtype=np.int64)
        for start, queries in self._query_chunks():
            end = start + len(queries)
            chunk_distances, chunk_predictions = exact_search(chunk, queries, k)
            distances[start:end], predictions[start:end] = merge_top_k(
                self.distances[start:end], self.predictions[start:end], chunk_distances,
                chunk_predictions + self.offset, self.k)
        self.distances, self.predictions = distances, predictions
        self.offset += size
        self.filled = 0
        self.seconds += time.perf_counter() - start_time

    def result(self):
        """(distances, predictions) [queries_num, k] over everything added."""
        if self.filled:
            self._search_chunk(self.buffer)
        return self.distances, self.predictions


# ----------------------------------------------------------------------------------------------------------
# Sources of vectors: arrays and stored descriptors, rows of several vectors (crops) flattened

class InMemoryRows:
    """An array [rows, ..., dim] with the reading interface of descriptor_store.DescriptorShards."""

    def __init__(self, array):
        self.array = array
        self.rows = len(array)
        self.row_shape = tuple(array.shape[1:])
        self.fingerprint = None

    def read(self, start, end):
        return np.asarray(self.array[start:end], dtype=np.float32)

    def blocks(self, block_rows, start=0, end=None):
        end = self.rows if end is None else end
        for block_start in range(start, end, block_rows):
            yield block_start, self.read(block_start, min(block_start + block_rows, end))

    def take(self, indices):
        return np.asarray(self.array[indices], dtype=np.float32)


class FlatVectors:
    """The vectors of a source whose rows hold one ([dim]) or several ([crops, dim]) of them, as one sequence of
    [dim] vectors that slices like an array (the queries of a crop test method search with every crop)."""

    def __init__(self, source):
        self.source = source
        self.dim = source.row_shape[-1]
        self.per_row = int(np.prod(source.row_shape[:-1], dtype=np.int64))

    def __len__(self):
        return self.source.rows * self.per_row

    def __getitem__(self, item):
        start, stop, step = item.indices(len(self)) if isinstance(item, slice) else (None, None, None)
        if step != 1:
            raise TypeError("FlatVectors supports contiguous slices only")
        first_row, end_row = start // self.per_row, -(-stop // self.per_row)
        rows = self.source.read(first_row, end_row).reshape(-1, self.dim)
        return rows[start - first_row * self.per_row:stop - first_row * self.per_row]


def as_source(descriptors):
    return InMemoryRows(descriptors) if isinstance(descriptors, np.ndarray) else descriptors


# ----------------------------------------------------------------------------------------------------------
# Memory plan

def budget_bytes(max_ram_gb):
    return int((max_ram_gb if max_ram_gb is not None else DEFAULT_MAX_RAM_GB) * GIB)


def _too_small(max_ram_gb, needed_bytes, what):
    return UserInputError(f"--max_ram_gb {max_ram_gb} is too small to {what}: it needs at least "
                          f"{needed_bytes / GIB:.3f} GB. Raise --max_ram_gb")


def plan_exact_search(max_ram_gb, dim, queries_num, k):
    """(database rows per block, query vectors per chunk) so that the search fits `max_ram_gb` (None: the
    default budget): the running results [queries, k] (three copies while merging) and a fixed overhead first;
    a quarter of the rest for a chunk of queries, the rest for two database blocks (the one searched and the
    next one read, or the buffer a short last block is copied into). Blocks of at least faiss' database block
    are multiples of it, as in faiss' own search."""
    vector_bytes = 4 * dim
    results_bytes = 3 * queries_num * k * (4 + 8)
    available = budget_bytes(max_ram_gb) - FIXED_OVERHEAD_BYTES - results_bytes
    if available < 2 * vector_bytes:
        raise _too_small(max_ram_gb, FIXED_OVERHEAD_BYTES + results_bytes + 2 * vector_bytes,
                         f"search {queries_num} query descriptors of size {dim} for their top {k}")
    query_rows = max(1, min(queries_num, available // 4 // vector_bytes))
    database_rows = max(1, (available - query_rows * vector_bytes) // 2 // vector_bytes)
    blas_block = faiss.cvar.distance_compute_blas_database_bs
    if database_rows >= blas_block:
        database_rows -= database_rows % blas_block
    return int(database_rows), int(query_rows)


def plan_shard_rows(max_ram_gb, row_bytes, batch_size, max_shard_bytes):
    """Rows per shard of extracted descriptors: a whole number of batches (so that every image goes through
    the model in the same batch as in the one-shot extraction), at most a quarter of the budget and
    `max_shard_bytes` (what a crash can lose), at least one batch."""
    shard_bytes = min(budget_bytes(max_ram_gb) // 4, max_shard_bytes)
    batches = max(1, shard_bytes // max(1, row_bytes * batch_size))
    return int(batches * batch_size)


# ----------------------------------------------------------------------------------------------------------
# The indexes (--faiss_index, declared in indexes.py)

def resolve_params(name, params, dim, database_rows, max_ram_gb):
    """The build parameters of index `name` for this database: defaults derived from the data, checked.
    Returns a dict (saved with the index): for IVF ivf_lists (default 4 * sqrt(rows)) and train_rows (default
    64 per centroid: per list, or per PQ codebook entry if more; at most the database and a quarter of the
    budget); for PQ pq_bytes (default the largest divisor of dim up to 64); for HNSW hnsw_m and
    hnsw_ef_construction."""
    resolved = {"index": name, "dim": int(dim)}
    if name in ("ivf", "ivfpq"):
        lists = params.ivf_lists or max(1, min(database_rows, round(4 * math.sqrt(database_rows))))
        wanted = params.index_train_size or TRAIN_VECTORS_PER_CENTROID * max(
            lists, PQ_CENTROIDS if name == "ivfpq" else 0)
        fitting = max(1, budget_bytes(max_ram_gb) // 4 // (4 * dim))
        train_rows = min(wanted, database_rows, fitting)
        if train_rows < wanted and params.index_train_size:
            logging.info(f"Training the index on {train_rows} vectors instead of --index_train_size "
                         f"{params.index_train_size} (the database size or a quarter of --max_ram_gb)")
        if lists > train_rows:
            raise UserInputError(
                f"--ivf_lists {lists} needs at least {lists} training vectors, but only {train_rows} are available "
                f"(database of {database_rows}, --index_train_size, --max_ram_gb): lower --ivf_lists")
        resolved.update(ivf_lists=int(lists), train_rows=int(train_rows), seed=params.seed)
    if name == "ivfpq":
        pq_bytes = params.pq_bytes or max(m for m in range(1, min(dim, DEFAULT_MAX_PQ_BYTES) + 1) if dim % m == 0)
        if dim % pq_bytes:
            divisors = [m for m in range(1, min(dim, 4 * DEFAULT_MAX_PQ_BYTES) + 1) if dim % m == 0]
            raise UserInputError(f"--pq_bytes {pq_bytes} must divide the descriptor size {dim} (each byte codes "
                                 f"an equal share of it): use one of {', '.join(map(str, divisors[-8:]))}")
        if resolved["train_rows"] < PQ_CENTROIDS:
            raise UserInputError(
                f"--faiss_index ivfpq needs at least {PQ_CENTROIDS} training vectors (its codebooks have "
                f"{PQ_CENTROIDS} entries), but only {resolved['train_rows']} are available: use --faiss_index "
                "ivf or hnsw for so small a database, or raise --index_train_size / --max_ram_gb")
        resolved["pq_bytes"] = int(pq_bytes)
    if name == "hnsw":
        resolved.update(hnsw_m=params.hnsw_m, hnsw_ef_construction=params.hnsw_ef_construction)
    return resolved


def train_sample(database, rows, seed):
    """`rows` database vectors drawn at random without replacement (seeded), in database order."""
    if rows >= database.rows:
        return database.read(0, database.rows)
    indices = np.sort(np.random.default_rng(seed).choice(database.rows, rows, replace=False))
    return database.take(indices)


def index_folder_name(resolved, database_fingerprint):
    """One folder per index and build parameters of one database (search-time parameters are not part of it:
    changing the probes or efSearch reuses the index)."""
    key = json.dumps({"params": resolved, "database": database_fingerprint}, sort_keys=True)
    return f"{resolved['index']}_{sha256_of_strings([key])[:12]}"


@dataclass
class BuiltIndex:
    """An index saved in parts: parts[i] covers database rows ranges[i] = (start, end). `reused`: loaded from
    an earlier build (build_seconds is that build's)."""
    folder: str
    resolved: dict
    ranges: list = field(default_factory=list)
    build_seconds: float = 0.0
    reused: bool = False

    def part_path(self, part):
        return os.path.join(self.folder, INDEX_FILE_PATTERN.format(part))


def load_built_index(folder):
    """The BuiltIndex saved in `folder`, or None when there is none (or only an unfinished one)."""
    try:
        with open(os.path.join(folder, INDEX_INFO_NAME)) as file:
            info = json.load(file)
    except (OSError, ValueError):
        return None
    built = BuiltIndex(folder, info["resolved"], [tuple(r) for r in info["ranges"]], info["build_seconds"],
                       reused=True)
    return built if all(os.path.exists(built.part_path(p)) for p in range(len(built.ranges))) else None


def _index_writer(index):
    return lambda file: faiss.write_index(index, faiss.PyCallbackIOWriter(file.write))


def build_index(name, params, database, max_ram_gb, folder):
    """Train (on a sample) and fill index `name` with the `database` vectors (a DescriptorShards or
    InMemoryRows of [rows, dim]), in parts of at most half the budget each, saved in `folder`/<name>_<hash>/.
    An index already built there with the same parameters is reused. Returns the BuiltIndex."""
    index_type = get_index_type(name)
    dim = database.row_shape[-1]
    resolved = resolve_params(name, params, dim, database.rows, max_ram_gb)
    index_folder = os.path.join(folder, index_folder_name(resolved, database.fingerprint))
    built = load_built_index(index_folder)
    if built is not None:
        logging.info(f"Reusing the {name} index of {index_folder}")
        return built
    shutil.rmtree(index_folder, ignore_errors=True)  # an unfinished build
    os.makedirs(index_folder)
    start_time = time.perf_counter()
    empty = index_type.build(dim, resolved)
    if index_type.trained:
        sample = train_sample(database, resolved["train_rows"], resolved["seed"])
        logging.info(f"Training the {name} index on {len(sample)} vectors ({resolved})")
        empty.train(sample)
        del sample
    trained = faiss.serialize_index(empty)
    del empty
    vector_bytes = index_type.bytes_per_vector(dim, resolved)
    part_rows = max(1, int(budget_bytes(max_ram_gb) // 2 // vector_bytes))
    add_rows = max(1, min(part_rows, budget_bytes(max_ram_gb) // 8 // (4 * dim)))
    built = BuiltIndex(index_folder, resolved)
    bar = progress_bar(None, f"Building the {name} index", total=database.rows, unit="vectors")
    for part, part_start in enumerate(range(0, database.rows, part_rows)):
        part_end = min(part_start + part_rows, database.rows)
        index = faiss.deserialize_index(trained)
        for _, block in database.blocks(add_rows, part_start, part_end):
            index.add(block)
            bar.update(len(block))
            del block  # before the next one is read
        write_atomically(built.part_path(part), _index_writer(index))
        built.ranges.append((part_start, part_end))
        del index
    bar.close()
    built.build_seconds = time.perf_counter() - start_time
    info = {"resolved": resolved, "ranges": built.ranges, "build_seconds": built.build_seconds}
    # Written last: an index folder without it is an unfinished build
    write_atomically(os.path.join(index_folder, INDEX_INFO_NAME),
                     lambda file: file.write(json.dumps(info, indent=1).encode("utf-8")))
    logging.info(f"Built the {name} index in {built.build_seconds:.1f} s, {len(built.ranges)} part(s), in "
                 f"{index_folder}")
    return built


def index_query_rows(max_ram_gb, dim, queries_num, k):
    """Queries searched at once in a built index: half of a chunk of the exact search's plan (the other half of
    the chunk's share of the budget goes to the part of the index being searched)."""
    _, query_rows = plan_exact_search(max_ram_gb, dim, queries_num, k)
    return max(1, query_rows // 2)


def search_built_index(built, params, queries, k, query_chunk_rows):
    """Search every part of `built` for chunks of the `queries` vectors (anything that slices into [n, dim]);
    the parts' top-k merged per query. Returns (distances, predictions) [queries, k]; -1 / inf where the
    index has fewer than k vectors."""
    index_type = get_index_type(built.resolved["index"])
    queries_num = len(queries)
    distances = np.full((queries_num, 0), np.inf, dtype=np.float32)
    predictions = np.full((queries_num, 0), -1, dtype=np.int64)
    bar = progress_bar(None, "Searching", total=queries_num * len(built.ranges), unit="queries")
    for part, (part_start, _) in enumerate(built.ranges):
        index = faiss.read_index(built.part_path(part))
        index_type.configure(index, params)
        part_distances = np.empty((queries_num, min(k, distances.shape[1] + k)), dtype=np.float32)
        part_predictions = np.empty(part_distances.shape, dtype=np.int64)
        for start in range(0, queries_num, query_chunk_rows):
            end = min(start + query_chunk_rows, queries_num)
            chunk_distances, chunk_predictions = index.search(
                np.ascontiguousarray(queries[start:end], dtype=np.float32), k)
            chunk_predictions = np.where(chunk_predictions >= 0, chunk_predictions + part_start, -1)
            part_distances[start:end], part_predictions[start:end] = merge_top_k(
                distances[start:end], predictions[start:end], chunk_distances, chunk_predictions, k)
            bar.update(end - start)
        distances, predictions = part_distances, part_predictions
        del index
    bar.close()
    return distances, predictions


# ----------------------------------------------------------------------------------------------------------
# Settings from the flags, and the one entry point

@dataclass(frozen=True)
class SearchSettings:
    """What the large-scale search flags ask for. `uses_store`: whether descriptors go through the on-disk store
    (any large-scale flag given); without it the search is the in-memory exact one."""
    faiss_index: str = "flat"
    params: IndexParams = IndexParams()
    max_ram_gb: Optional[float] = None
    descriptors_dtype: str = "float32"

    @property
    def uses_store(self):
        return (self.faiss_index != "flat" or self.max_ram_gb is not None or self.descriptors_dtype != "float32")


def search_settings(args):
    """SearchSettings from the parsed flags. Namespaces built by hand (tests, library use) may lack the
    large-scale flags: the defaults then apply."""
    defaults = IndexParams()
    params = IndexParams(**{name: getattr(args, name, getattr(defaults, name))
                            for name in asdict(defaults) if name != "seed"}, seed=getattr(args, "seed", 0))
    return SearchSettings(getattr(args, "faiss_index", "flat"), params, getattr(args, "max_ram_gb", None),
                          getattr(args, "descriptors_dtype", "float32"))


@dataclass
class SearchResult:
    distances: np.ndarray
    predictions: np.ndarray
    build_seconds: float
    search_seconds: float


def search_descriptors(database, queries, k, settings, index_folder=None):
    """The `k` nearest database vectors of every query vector, as `settings` say.

    database: DescriptorShards or array [rows, dim]; queries: DescriptorShards or array [rows, dim] or
    [rows, crops, dim] (every crop searches; results [rows * crops, k]). flat: exact, bit-identical to
    `exact_search`; the others: the index built (or reused) in `index_folder`. Memory stays within
    settings.max_ram_gb (None: DEFAULT_MAX_RAM_GB). Returns a SearchResult.
    """
    database, queries = as_source(database), FlatVectors(as_source(queries))
    k = min(k, database.rows)
    dim = database.row_shape[-1]
    if queries.dim != dim:
        raise ValueError(f"Queries of size {queries.dim} cannot be searched among database vectors of size {dim}")
    index_type = get_index_type(settings.faiss_index)
    if index_type.build is None:
        database_rows, query_rows = plan_exact_search(settings.max_ram_gb, dim, len(queries), k)
        logging.debug(f"Exact search in blocks of {database_rows} database vectors and {query_rows} queries")
        streaming = StreamingExactSearch(queries, k, database_rows, query_rows)
        bar = progress_bar(None, "Searching", total=database.rows, unit="vectors")
        for _, block in database.blocks(database_rows):
            streaming.add(block)
            bar.update(len(block))
            del block  # before the next one is read
        bar.close()
        distances, predictions = streaming.result()
        return SearchResult(distances, predictions, 0.0, streaming.seconds)
    if index_folder is None:
        raise ValueError(f"--faiss_index {settings.faiss_index} needs a folder to save the index in")
    built = build_index(settings.faiss_index, settings.params, database, settings.max_ram_gb, index_folder)
    query_rows = index_query_rows(settings.max_ram_gb, dim, len(queries), k)
    start_time = time.perf_counter()
    distances, predictions = search_built_index(built, settings.params, queries, k, query_rows)
    return SearchResult(distances, predictions, 0.0 if built.reused else built.build_seconds,
                        time.perf_counter() - start_time)
