"""The faiss indexes that --faiss_index chooses from, with their parameters: declarations the parser reads
without loading faiss (it is imported when an index is built). search.py builds and searches them."""
from dataclasses import dataclass
from typing import Callable, Optional

from commons import UserInputError

# The budget of the large-scale path when --max_ram_gb is not given
DEFAULT_MAX_RAM_GB = 4.0


def _faiss():
    import faiss
    return faiss


@dataclass(frozen=True)
class IndexParams:
    """Parameters of the indexes, as the flags give them; None means "derived from the data" (see
    `resolve_params`)."""
    ivf_lists: Optional[int] = None
    ivf_probes: int = 16
    pq_bytes: Optional[int] = None
    hnsw_m: int = 32
    hnsw_ef_construction: int = 40
    hnsw_ef_search: int = 128
    index_train_size: Optional[int] = None
    seed: int = 0


@dataclass(frozen=True)
class IndexType:
    """How to make one kind of index.

    build: (dim, resolved parameters dict) -> an empty faiss index; None for flat, which is searched exactly
        block by block (see StreamingExactSearch) rather than built.
    bytes_per_vector: (dim, resolved) -> approximate memory one database vector takes in the index.
    configure: (index, IndexParams) -> None, sets the search-time parameters (probes, efSearch).
    trained: whether it learns from a sample of the database (clusters, codebooks).
    """
    build: Optional[Callable]
    bytes_per_vector: Callable
    configure: Callable = lambda index, params: None
    trained: bool = False


def _set_probes(index, params):
    index.nprobe = min(params.ivf_probes, index.nlist)


def _set_ef_search(index, params):
    index.hnsw.efSearch = params.hnsw_ef_search


def _hnsw_bytes(dim, resolved):
    # The vector, 2 * M neighbours on level 0, about 1 / (M - 1) of a vector's links on the upper levels
    return 4 * dim + 4 * 2 * resolved["hnsw_m"] * 1.1 + 16


FAISS_INDEXES = {
    "flat": IndexType(build=None, bytes_per_vector=lambda dim, resolved: 4 * dim),
    "ivf": IndexType(
        build=lambda dim, r: _faiss().IndexIVFFlat(_faiss().IndexFlatL2(dim), dim, r["ivf_lists"]),
        bytes_per_vector=lambda dim, r: 4 * dim + 8, configure=_set_probes, trained=True),
    "ivfpq": IndexType(
        build=lambda dim, r: _faiss().IndexIVFPQ(_faiss().IndexFlatL2(dim), dim, r["ivf_lists"], r["pq_bytes"], 8),
        bytes_per_vector=lambda dim, r: r["pq_bytes"] + 8, configure=_set_probes, trained=True),
    "hnsw": IndexType(
        build=lambda dim, r: _hnsw_flat(dim, r["hnsw_m"], r["hnsw_ef_construction"]),
        bytes_per_vector=_hnsw_bytes, configure=_set_ef_search),
}
# A product quantizer with 8-bit codes has 256 centroids per sub-vector: it needs at least that many samples
PQ_CENTROIDS = 256
# Default number of training vectors per centroid (inverted list, or PQ codebook entry; faiss warns below 39)
TRAIN_VECTORS_PER_CENTROID = 64
# Default --pq_bytes: the largest divisor of the descriptor size up to this
DEFAULT_MAX_PQ_BYTES = 64


def _hnsw_flat(dim, m, ef_construction):
    index = _faiss().IndexHNSWFlat(dim, m)
    index.hnsw.efConstruction = ef_construction
    return index


def get_index_type(name):
    if name not in FAISS_INDEXES:
        raise UserInputError(f"Unknown --faiss_index '{name}'; valid names: {', '.join(FAISS_INDEXES)}")
    return FAISS_INDEXES[name]
