"""Test-time methods: how queries are turned into tensors and how per-crop results become per-query predictions."""
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

import datasets_ws

# Majority voting looks for database images repeated among the first n predictions of the crops, for these n
VOTING_TOP_N = (1, 5, 10)


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
