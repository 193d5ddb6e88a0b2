"""Testing: descriptors of the database and the queries, nearest-neighbour search, merging of the per-crop
results, and Recall@N.

`test(args, eval_ds, model, test_method, pca)` is what training and eval.py call; `retrieve(...)` is the part
that needs no coordinates (it also serves folders of images without positions), and `compute_recalls(...)` is a
pure function of predictions and positives.

By default descriptors stay in memory and the search is exact (faiss' L2 k-NN). The large-scale flags
(--descriptors_folder, --max_ram_gb, --descriptors_dtype, --faiss_index) send descriptors to an on-disk store
in shards instead (`extract_descriptors`: resumable, several processes under torchrun write disjoint shards) and
search them within a memory budget (search.py).
"""
import contextlib
import hashlib
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader

import commons
import datasets_ws
import descriptor_store
import search
from commons import UserInputError
# The exact search lives in search.py; these names stay importable from here
from search import StreamingExactSearch, exact_search  # noqa: F401

# Majority voting looks for database images repeated among the first n predictions of the crops, for these n
VOTING_TOP_N = (1, 5, 10)
# Database descriptors per chunk of the streamed search; None: faiss' own database block, which keeps every
# distance bit-identical to the one-shot search
STREAMING_CHUNK_SIZE = None
# Shards of stored descriptors hold at most this (what a crash can lose: extraction resumes at a shard)
MAX_SHARD_BYTES = 256 * 1024 ** 2
# Row size assumed for planning shards when the model does not report its features_dim
FALLBACK_ROW_BYTES = 4 * 4096
DATABASE_FOLDER = "database"
INDEX_FOLDER = "index"


# ----------------------------------------------------------------------------------------------------------
# Merging the results of the crops of each query

def merge_nearest_crop(predictions, distances, top_k):
    """Per query: pool the crops' (prediction, distance) lists, sort by distance, keep each database index once
    (at its smallest distance), return the first `top_k`.

    predictions, distances: [queries_num, crops_num, k]. Returns [queries_num, top_k].
    """
    queries_num = predictions.shape[0]
    predictions = predictions.reshape(queries_num, -1)
    distances = distances.reshape(queries_num, -1)
    merged = np.empty((queries_num, top_k), dtype=predictions.dtype)
    for q in range(queries_num):
        sorted_predictions = predictions[q, np.argsort(distances[q])]
        _, unique_index = np.unique(sorted_predictions, return_index=True)
        merged[q] = sorted_predictions[np.sort(unique_index)][:top_k]
    return merged


def _vote(predictions, distances, top_n, majority_weight):
    """Lower, in place, the distance of each database index repeated among the first `top_n` columns of the
    crops' predictions [crops_num, k] by majority_weight * count / top_n."""
    selected = predictions[:, :top_n]
    values, counts = np.unique(selected, return_counts=True)
    for value, count in zip(values[counts > 1], counts[counts > 1]):
        distances[:, :top_n][selected == value] -= majority_weight * count / top_n


def merge_majority_voting(predictions, distances, top_k, majority_weight):
    """Majority voting over the crops (for n in VOTING_TOP_N), then as nearest_crop."""
    distances = distances.copy()
    for q in range(predictions.shape[0]):
        for top_n in VOTING_TOP_N:
            _vote(predictions[q], distances[q], top_n, majority_weight)
    return merge_nearest_crop(predictions, distances, top_k)


def nearest_crop_distances(predictions, distances, merged):
    """For each merged prediction [queries_num, top_k], its smallest distance over the query's crops
    (predictions, distances: [queries_num, crops_num, k]); what a person reads as "how far" for crop methods."""
    result = np.empty(merged.shape, dtype=distances.dtype)
    for q in range(merged.shape[0]):
        smallest = {}
        for prediction, distance in zip(predictions[q].ravel(), distances[q].ravel()):
            if prediction not in smallest or distance < smallest[prediction]:
                smallest[prediction] = distance
        result[q] = [smallest[prediction] for prediction in merged[q]]
    return result


@dataclass(frozen=True)
class TestMethod:
    """What a --test_method does to queries.

    query_transform: (normalised tensor, resize) -> tensor [3, H, W], or [crops, 3, H, W] for crop methods.
    one_query_per_batch: queries keep their own size and cannot be stacked.
    mean_of_crops: a query's descriptor is the mean of its crops' descriptors.
    merge_predictions: (predictions, distances [queries, crops, k], top_k, majority_weight) -> [queries, top_k],
        for methods that search with every crop and merge the results.
    """
    query_transform: Callable
    one_query_per_batch: bool = False
    mean_of_crops: bool = False
    merge_predictions: Optional[Callable] = None


TEST_METHODS = {
    "hard_resize": TestMethod(datasets_ws.hard_resize),
    "single_query": TestMethod(datasets_ws.resize_shorter_side, one_query_per_batch=True),
    "central_crop": TestMethod(datasets_ws.central_crop),
    "five_crops": TestMethod(datasets_ws.five_crops, mean_of_crops=True),
    "nearest_crop": TestMethod(datasets_ws.five_crops,
                               merge_predictions=lambda p, d, k, w: merge_nearest_crop(p, d, k)),
    "maj_voting": TestMethod(datasets_ws.five_crops, merge_predictions=merge_majority_voting),
}


def get_test_method(name):
    if name not in TEST_METHODS:
        raise UserInputError(f"Unknown test method '{name}'; valid names: {', '.join(TEST_METHODS)}")
    return TEST_METHODS[name]


# ----------------------------------------------------------------------------------------------------------
# Recall

def positives_mask(predictions, positives_per_query):
    """[queries_num, k] booleans: whether prediction j of query q is one of its positives.

    predictions: [queries_num, k] database indices (negative values, faiss' "no result", are never positives);
    positives_per_query: one array of database indices per query.
    """
    predictions = np.asarray(predictions, dtype=np.int64)
    queries_num = len(predictions)
    if len(positives_per_query) != queries_num:
        raise ValueError(f"{queries_num} rows of predictions but positives for {len(positives_per_query)} queries")
    lengths = np.array([len(p) for p in positives_per_query], dtype=np.int64)
    if predictions.size == 0 or lengths.sum() == 0:
        return np.zeros(predictions.shape, dtype=bool)
    positives = np.concatenate([np.asarray(p, dtype=np.int64) for p in positives_per_query])
    # One integer key per (query, database index) pair, so that a single isin answers every query at once
    width = max(int(predictions.max()), int(positives.max())) + 1
    positive_keys = np.repeat(np.arange(queries_num, dtype=np.int64), lengths) * width + positives
    prediction_keys = np.arange(queries_num, dtype=np.int64)[:, None] * width + predictions
    return np.isin(prediction_keys, positive_keys) & (predictions >= 0)


def compute_recalls(predictions, positives_per_query, recall_values):
    """Recall@N in percent for each N of `recall_values`: the share of queries with at least one positive among
    their first N predictions. Queries without positives count as misses."""
    mask = positives_mask(predictions, positives_per_query)
    queries_num = len(mask)
    if queries_num == 0:
        raise ValueError("Cannot compute recalls without queries")
    first_hit = np.where(mask.any(axis=1), mask.argmax(axis=1), np.iinfo(np.int64).max)
    return np.array([np.count_nonzero(first_hit < n) / queries_num * 100 for n in recall_values])


def recalls_to_str(recall_values, recalls):
    """The original's format, parsed by sweeps: 'R@1: 47.8, R@5: 55.8, R@10: 60.2, R@20: 67.1'."""
    return ", ".join(f"R@{n}: {recall:.1f}" for n, recall in zip(recall_values, recalls))


# ----------------------------------------------------------------------------------------------------------
# Descriptors

def pin_memory(device):
    """Pinned host memory speeds up copies to a GPU and is useless (and warned about) without one."""
    return torch.device(device).type == "cuda"


def make_loader(paths, transform, resize, batch_size, num_workers, device):
    dataset = datasets_ws.ImagesDataset(paths, transform, resize)
    return DataLoader(dataset, batch_size=batch_size, **datasets_ws.loader_options(num_workers, device))


def descriptor_batches(model, loader, device, mean_of_crops=False, pca=None, description=None):
    """Yield (indices, descriptors float32) per batch of `loader`, which yields (images, indices).

    Images [b, crops, 3, H, W] (crop test methods) go through the model as b * crops images, the crops of a
    query contiguous; their descriptors are averaged per query when `mean_of_crops`, else returned as
    [b, crops, dim]. PCA, when given, is applied after the averaging.
    """
    with torch.no_grad():
        for images, indices in commons.progress_bar(loader, description):
            crops_num = images.shape[1] if images.dim() == 5 else None
            if crops_num is not None:
                images = images.flatten(0, 1)
            features = model(images.to(device))
            if crops_num is not None and mean_of_crops:
                features = torch.stack(torch.split(features, crops_num)).mean(1)
            features = features.cpu().numpy()
            if pca is not None:
                features = pca.transform(features)
            features = np.asarray(features, dtype=np.float32)
            if not np.isfinite(features).all():
                # faiss would rank NaN descriptors silently, and every recall would read as a plain miss
                raise UserInputError(
                    "The model gives non-finite descriptors (NaN or inf) for some images: its weights are broken "
                    "(a diverged training or a damaged checkpoint). Check --resume, or retrain with a lower --lr.")
            if crops_num is not None and not mean_of_crops:
                features = features.reshape(len(indices), crops_num, -1)
            yield indices.numpy(), features


def collect_descriptors(batches, total):
    """Fill one array [total, ...] from the (indices, descriptors) batches."""
    descriptors = None
    for indices, features in batches:
        if descriptors is None:
            descriptors = np.empty((total,) + features.shape[1:], dtype=np.float32)
        descriptors[indices] = features
    return descriptors


# ----------------------------------------------------------------------------------------------------------
# Descriptors on disk: resumable, sharded, several processes

def model_fingerprint(model):
    """A hash of what the model computes: its structure (repr: layers, poolings, where it normalises) and
    every weight and buffer."""
    digest = hashlib.sha256(repr(model).encode("utf-8"))
    for name, tensor in model.state_dict().items():
        array = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{array.dtype}|{tuple(array.shape)}".encode("utf-8"))
        # As bytes (any dtype, bfloat16 included)
        digest.update(array.reshape(-1).view(torch.uint8).numpy().tobytes() if array.numel() else b"")
    return digest.hexdigest()


def vectors_per_image(transform, resize, mean_of_crops):
    """How many descriptors an image gives: its crops' count for crop methods that search with every crop."""
    shape = transform(torch.zeros(3, *resize), resize).shape
    return 1 if len(shape) == 3 or mean_of_crops else shape[0]


def store_descriptors(model, paths, folder, fingerprint, transform, resize, batch_size, num_workers, device,
                      mean_of_crops=False, pca=None, dtype="float32", max_ram_gb=None, shard_rows=None,
                      world=None, on_descriptors=None, description=None):
    """Describe `paths` with `model` into shards in `folder` (descriptor_store), skipping the shards already
    there (a resumed extraction) and returning the complete descriptor_store.DescriptorShards.

    Shards hold whole batches, so every image goes through the model in the same batch as in the one-shot
    extraction: the stored float32 descriptors equal `collect_descriptors`' bit for bit. Peak memory holds
    one shard (`shard_rows`, default from max_ram_gb and MAX_SHARD_BYTES), whatever the number of images.
    With `world` (commons.DistributedContext, several processes) process r extracts the shards s with
    s % world_size == r; rank 0 writes the manifest first and completes it once every process is done.
    `on_descriptors(indices, descriptors float32)` sees every row, extracted or read back from disk.
    """
    world = world or commons.DistributedContext(0, 1, 0, torch.device(device))
    if shard_rows is None:
        vector_size = pca.n_components_ if pca is not None else getattr(model, "features_dim", None)
        row_bytes = (4 * vector_size * vectors_per_image(transform, resize, mean_of_crops)
                     if vector_size else FALLBACK_ROW_BYTES)
        shard_rows = search.plan_shard_rows(max_ram_gb, row_bytes, batch_size, MAX_SHARD_BYTES)
    description = description or "Descriptors"
    error = None
    if world.rank == 0:  # one process writes the manifest; the others open it, or fail with the same message
        try:
            descriptor_store.open_shards(folder, fingerprint, len(paths), shard_rows, dtype)
        except UserInputError as caught:
            error = str(caught)
    error = commons.broadcast_object(error, world)
    if error is not None:
        raise UserInputError(error)
    shards = descriptor_store.open_shards(folder, fingerprint, len(paths), shard_rows, dtype, owner=False)
    missing = set(shards.missing_shards())
    if world.rank == 0:
        logging.info(f"{description}: extracting {len(missing)} of {shards.shards_num} shards of "
                     f"{shards.shard_rows} images into {folder}"
                     + (f" (the other {shards.shards_num - len(missing)} are there already)"
                        if len(missing) < shards.shards_num else ""))
    model = model.eval()
    for shard in range(shards.shards_num):
        start, end = shards.shard_range(shard)
        if shard not in missing:
            if on_descriptors is not None:
                on_descriptors(np.arange(start, end), shards.read(start, end))
            continue
        if shard % world.world_size != world.rank:
            continue
        loader = make_loader(paths[start:end], transform, resize, batch_size, num_workers, world.device)
        buffer = None
        for indices, features in descriptor_batches(model, loader, world.device, mean_of_crops, pca,
                                                    description=f"{description} {shard + 1}/{shards.shards_num}"):
            if buffer is None:
                buffer = np.empty((end - start,) + features.shape[1:], dtype=np.float32)
            buffer[indices] = features
            if on_descriptors is not None:
                on_descriptors(indices + start, features)
        shards.write_shard(shard, buffer)
        del buffer
    if world.world_size > 1:  # (a single process may still belong to a process group: no barrier then)
        commons.barrier()
    if world.rank == 0:
        shards.mark_complete()
    if world.world_size > 1:
        commons.barrier()
    return shards


def extract_descriptors(args, database_paths, queries_paths, model, test_method="hard_resize", pca=None,
                        descriptors_folder=None, world=None, on_descriptors=None):
    """Database and query descriptors into the store in `descriptors_folder` (`database/` and
    `queries_<test_method>/`, so that other test methods reuse the database), resuming what is there.
    Returns (database DescriptorShards, queries DescriptorShards). `on_descriptors(kind, indices, descriptors)`
    as in `retrieve`. Reads from args: device, infer_batch_size, num_workers, resize, descriptors_dtype,
    max_ram_gb (see search.search_settings).
    """
    if descriptors_folder is None:
        raise ValueError("extract_descriptors needs the folder to store the descriptors in")
    method = get_test_method(test_method)
    settings = search.search_settings(args)
    device = world.device if world is not None else args.device
    model_hash = model_fingerprint(model)
    common = {"model_sha256": model_hash, "pca_sha256": descriptor_store.pca_fingerprint(pca),
              "resize": list(args.resize)}
    stored = []
    for kind, paths, transform, batch_size, mean_of_crops, subfolder in (
            ("database", database_paths, datasets_ws.hard_resize, args.infer_batch_size, False, DATABASE_FOLDER),
            ("queries", queries_paths, method.query_transform,
             1 if method.one_query_per_batch else args.infer_batch_size, method.mean_of_crops,
             f"queries_{test_method}")):
        fingerprint = dict(common, paths_sha256=descriptor_store.sha256_of_strings(paths), batch_size=batch_size,
                           test_method=test_method if kind == "queries" else "hard_resize")

        def observe(indices, descriptors, kind=kind):
            if on_descriptors is not None:
                on_descriptors(kind, indices, descriptors)
        stored.append(store_descriptors(
            model, list(paths), os.path.join(descriptors_folder, subfolder), fingerprint, transform, args.resize,
            batch_size, args.num_workers, device, mean_of_crops, pca, settings.descriptors_dtype,
            settings.max_ram_gb, world=world, on_descriptors=observe, description=kind.capitalize()))
    return tuple(stored)


@contextlib.contextmanager
def descriptors_folder_or_temporary(descriptors_folder):
    """The given folder, or a temporary one removed afterwards (descriptors nobody asked to keep)."""
    if descriptors_folder is not None:
        yield descriptors_folder
        return
    with tempfile.TemporaryDirectory(prefix="descriptors_") as folder:
        yield folder


# ----------------------------------------------------------------------------------------------------------
# The whole pipeline

@dataclass
class Retrieval:
    """What the search found, before merging crops: per query (per crop for nearest_crop / maj_voting, shape
    [queries, crops, k]) the `searched_k` nearest database images as indices and squared L2 distances, nearest
    first; plus timings. `top(k)` gives each query's final top-k for any k <= searched_k, exactly as a search
    for k would (majority voting depends on k, so merging happens per k)."""
    searched_predictions: np.ndarray
    searched_distances: np.ndarray
    merge_predictions: Optional[Callable]
    majority_weight: float
    extraction_seconds: float
    search_seconds: float

    @property
    def searched_k(self):
        return self.searched_predictions.shape[-1]

    def top(self, k=None):
        """(predictions, squared L2 distances) [queries, k]; for crop methods the distance is the nearest
        crop's."""
        k = self.searched_k if k is None else min(k, self.searched_k)
        predictions = self.searched_predictions[..., :k]
        distances = self.searched_distances[..., :k]
        if self.merge_predictions is None:
            return predictions, distances
        merged = self.merge_predictions(predictions, distances, k, self.majority_weight)
        return merged, nearest_crop_distances(predictions, distances, merged)


def retrieve(args, database_paths, queries_paths, model, test_method="hard_resize", pca=None, k=None,
             on_descriptors=None, descriptors_folder=None, world=None):
    """Describe database and queries with `model` and search each query's `k` nearest database images
    (k defaults to max(args.recall_values); it is clamped to the database size).

    The database is always hard-resized; queries are processed as `test_method` says. With
    args.efficient_ram_testing the database is streamed through `StreamingExactSearch` (same results, memory
    independent of the database size). `on_descriptors(kind, indices, descriptors)`, kind "database" or
    "queries", sees every batch of descriptors (e.g. to save them).
    With a `descriptors_folder`, or any large-scale flag (--faiss_index other than flat, --max_ram_gb,
    --descriptors_dtype float16), the descriptors go through the on-disk store (`extract_descriptors`; a
    temporary folder when none is given) and search.py searches them; the flat search there gives the same
    results as the in-memory one.
    With `world` (commons.DistributedContext) of several processes, each one describes its share of the images
    in memory and every process gets rank 0's search of the gathered descriptors (`retrieve_sharded`).
    Reads from args: device, infer_batch_size, num_workers, resize, recall_values, majority_weight,
    efficient_ram_testing, and the large-scale flags.
    """
    method = get_test_method(test_method)
    wanted_k = k or max(args.recall_values)
    k = min(wanted_k, len(database_paths))
    if k < wanted_k:
        logging.warning(f"The database has {len(database_paths)} images, fewer than the {wanted_k} predictions per "
                        f"query asked for (--recall_values, --save_predictions): each query gets all {k}, so R@N for "
                        f"N >= {k} is the share of queries with any positive")
    model = model.eval()
    settings = search.search_settings(args)
    if descriptors_folder is not None or settings.uses_store:
        return _retrieve_through_store(args, database_paths, queries_paths, model, test_method, pca, k,
                                       on_descriptors, descriptors_folder, settings)
    if world is not None and world.world_size > 1:
        if on_descriptors is not None:
            raise ValueError("on_descriptors sees the batches of one process: it is not available with several")
        return retrieve_sharded(args, database_paths, queries_paths, model, test_method, pca, k, world)

    def observed(kind, batches):
        for indices, features in batches:
            if on_descriptors is not None:
                on_descriptors(kind, indices, features)
            yield indices, features

    def database_batches():
        loader = make_loader(database_paths, datasets_ws.hard_resize, args.resize, args.infer_batch_size,
                             args.num_workers, args.device)
        return observed("database", descriptor_batches(model, loader, args.device, pca=pca,
                                                       description="Database"))

    queries_batch_size = 1 if method.one_query_per_batch else args.infer_batch_size
    queries_loader = make_loader(queries_paths, method.query_transform, args.resize, queries_batch_size,
                                 args.num_workers, args.device)
    start_time = time.perf_counter()
    queries_descriptors = collect_descriptors(
        observed("queries", descriptor_batches(model, queries_loader, args.device, method.mean_of_crops, pca,
                                               description="Queries")), len(queries_paths))
    # Crop methods search with every crop: [queries, crops, dim] -> [queries * crops, dim]
    flat_queries = queries_descriptors.reshape(-1, queries_descriptors.shape[-1])

    logging.debug(f"Extracting the descriptors of {len(database_paths)} database images and searching the top "
                  f"{k} of {len(queries_paths)} queries")
    if args.efficient_ram_testing:
        streaming = StreamingExactSearch(flat_queries, k, STREAMING_CHUNK_SIZE)
        for _, features in database_batches():
            streaming.add(features)
        distances, predictions = streaming.result()
        search_seconds = streaming.seconds
        extraction_seconds = time.perf_counter() - start_time - search_seconds
    else:
        database_descriptors = collect_descriptors(database_batches(), len(database_paths))
        extraction_seconds = time.perf_counter() - start_time
        search_start = time.perf_counter()
        distances, predictions = exact_search(database_descriptors, flat_queries, k)
        del database_descriptors
        search_seconds = time.perf_counter() - search_start

    if method.merge_predictions is not None:
        predictions = predictions.reshape(queries_descriptors.shape[:2] + (k,))
        distances = distances.reshape(queries_descriptors.shape[:2] + (k,))
    return Retrieval(predictions, distances, method.merge_predictions, args.majority_weight, extraction_seconds,
                     search_seconds)


def gather_descriptors(model, paths, transform, resize, batch_size, num_workers, world, mean_of_crops=False,
                       pca=None, description=None):
    """Descriptors [len(paths), ...] of `paths` on every process of `world`: process r describes its contiguous
    share (commons.shard_range) in memory and the shares are gathered in order."""
    start, end = commons.shard_range(len(paths), world.rank, world.world_size)
    loader = make_loader(paths[start:end], transform, resize, batch_size, num_workers, world.device)
    local = collect_descriptors(descriptor_batches(model, loader, world.device, mean_of_crops, pca, description),
                                end - start)
    if world.world_size == 1:
        return local
    # A process without images has no descriptor shape: it takes the others'
    shapes = [None] * world.world_size
    torch.distributed.all_gather_object(shapes, None if local is None else local.shape[1:])
    row_shape = next(shape for shape in shapes if shape is not None)
    local = np.empty((0,) + tuple(row_shape), np.float32) if local is None else local
    return commons.all_gather_rows(local, len(paths), world)


def retrieve_sharded(args, database_paths, queries_paths, model, test_method, pca, k, world):
    """`retrieve` by several processes: each describes its share of the database and of the queries
    (`gather_descriptors`), rank 0 searches the gathered descriptors exactly, and every process gets its
    Retrieval (the same predictions as one process)."""
    method = get_test_method(test_method)
    model = model.eval()
    start_time = time.perf_counter()
    queries = gather_descriptors(model, queries_paths, method.query_transform, args.resize,
                                 1 if method.one_query_per_batch else args.infer_batch_size, args.num_workers, world,
                                 method.mean_of_crops, pca, "Queries")
    database = gather_descriptors(model, database_paths, datasets_ws.hard_resize, args.resize, args.infer_batch_size,
                                  args.num_workers, world, pca=pca, description="Database")
    extraction_seconds = time.perf_counter() - start_time
    found = None
    if world.rank == 0:
        search_start = time.perf_counter()
        distances, predictions = exact_search(database, queries.reshape(-1, queries.shape[-1]), k)
        found = (distances, predictions, time.perf_counter() - search_start)
    distances, predictions, search_seconds = commons.broadcast_object(found, world)
    if method.merge_predictions is not None:
        predictions = predictions.reshape(queries.shape[:2] + (k,))
        distances = distances.reshape(queries.shape[:2] + (k,))
    return Retrieval(predictions, distances, method.merge_predictions, args.majority_weight, extraction_seconds,
                     search_seconds)


def _retrieve_through_store(args, database_paths, queries_paths, model, test_method, pca, k, on_descriptors,
                            descriptors_folder, settings):
    """`retrieve` with the descriptors on disk and the search of `settings` (search.SearchSettings)."""
    method = get_test_method(test_method)
    with descriptors_folder_or_temporary(descriptors_folder) as folder:
        start_time = time.perf_counter()
        database, queries = extract_descriptors(args, database_paths, queries_paths, model, test_method, pca,
                                                folder, on_descriptors=on_descriptors)
        extraction_seconds = time.perf_counter() - start_time
        logging.debug(f"Searching the top {k} of {queries.rows} queries among {database.rows} database "
                      f"descriptors with --faiss_index {settings.faiss_index}")
        result = search.search_descriptors(database, queries, k, settings, os.path.join(folder, INDEX_FOLDER))
        queries_shape = (queries.rows,) + queries.row_shape[:-1]
    predictions, distances = result.predictions, result.distances
    if method.merge_predictions is not None:
        predictions = predictions.reshape(queries_shape + (k,))
        distances = distances.reshape(queries_shape + (k,))
    return Retrieval(predictions, distances, method.merge_predictions, args.majority_weight, extraction_seconds,
                     result.build_seconds + result.search_seconds)


@dataclass
class Evaluation:
    """Recalls (percent, by N) of one dataset, the top-max(recall_values) predictions and squared distances
    that gave them, and the whole retrieval (see Retrieval.top for other k)."""
    recalls: dict
    recalls_str: str
    predictions: np.ndarray
    distances: np.ndarray
    retrieval: Retrieval
    extraction_seconds: float
    search_seconds: float


def evaluate(args, eval_ds, model, test_method="hard_resize", pca=None, k=None, on_descriptors=None,
             descriptors_folder=None, world=None):
    """`retrieve` on a GeoDataset (searching at least `k`), then Recall@N for each N of args.recall_values."""
    recall_k = max(args.recall_values)
    retrieval = retrieve(args, eval_ds.database_paths, eval_ds.queries_paths, model, test_method, pca,
                         max(k or recall_k, recall_k), on_descriptors, descriptors_folder, world)
    merge_start = time.perf_counter()
    predictions, distances = retrieval.top(recall_k)
    search_seconds = retrieval.search_seconds + time.perf_counter() - merge_start
    recalls = compute_recalls(predictions, eval_ds.soft_positives_per_query, args.recall_values)
    recalls_by_n = {int(n): float(recall) for n, recall in zip(args.recall_values, recalls)}
    return Evaluation(recalls_by_n, recalls_to_str(args.recall_values, recalls), predictions, distances, retrieval,
                      retrieval.extraction_seconds, search_seconds)


def test(args, eval_ds, model, test_method="hard_resize", pca=None, descriptors_folder=None, world=None):
    """Recalls of `model` on `eval_ds` (a datasets_ws.GeoDataset): ({N: recall in percent}, 'R@1: .., R@5: ..').
    With `world` of several processes, they share the extraction and all get the recalls."""
    evaluation = evaluate(args, eval_ds, model, test_method, pca, descriptors_folder=descriptors_folder, world=world)
    return evaluation.recalls, evaluation.recalls_str
