"""Testing: descriptors of the database and the queries (extraction.py), nearest-neighbour search (search.py),
the test methods' merging of the per-crop results and Recall@N (metrics.py).

`test(args, eval_ds, model, test_method, pca)` is what training and eval.py call; `retrieve(...)` is the part
that needs no coordinates (it also serves folders of images without positions).

By default descriptors stay in memory and the search is exact (faiss' L2 k-NN). The large-scale flags
(--descriptors_folder, --max_ram_gb, --descriptors_dtype, --faiss_index) send descriptors to an on-disk store
in shards instead (`extraction.extract_descriptors`: resumable, several processes under torchrun write disjoint
shards) and search them within a memory budget (search.py).
"""
import contextlib
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

import commons
import datasets_ws
import search
from extraction import collect_descriptors, descriptor_batches, extract_descriptors, gather_descriptors, images_loader
from metrics import compute_recalls, nearest_crop_distances, recalls_to_str
from search import StreamingExactSearch, exact_search
from test_methods import get_test_method

# Database descriptors per chunk of the streamed search; None: faiss' own database block, which keeps every
# distance bit-identical to the one-shot search
STREAMING_CHUNK_SIZE = None
INDEX_FOLDER = "index"


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


def _retrieval(method, args, queries_shape, distances, predictions, extraction_seconds, search_seconds):
    """The Retrieval of a search of queries whose descriptors had shape queries_shape + (dim,): crop methods that
    merge keep the results of each crop ([queries, crops, k])."""
    if method.merge_predictions is not None:
        predictions = predictions.reshape(tuple(queries_shape) + predictions.shape[-1:])
        distances = distances.reshape(tuple(queries_shape) + distances.shape[-1:])
    return Retrieval(predictions, distances, method.merge_predictions, args.majority_weight, extraction_seconds,
                     search_seconds)


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
        loader = images_loader(database_paths, datasets_ws.hard_resize, args.resize, args.infer_batch_size,
                               args.num_workers, args.device)
        return observed("database", descriptor_batches(model, loader, args.device, pca=pca,
                                                       description="Database"))

    queries_batch_size = 1 if method.one_query_per_batch else args.infer_batch_size
    queries_loader = images_loader(queries_paths, method.query_transform, args.resize, queries_batch_size,
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

    return _retrieval(method, args, queries_descriptors.shape[:-1], distances, predictions, extraction_seconds,
                      search_seconds)


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
    return _retrieval(method, args, queries.shape[:-1], distances, predictions, extraction_seconds, search_seconds)


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
    return _retrieval(method, args, queries_shape, result.distances, result.predictions, extraction_seconds,
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
