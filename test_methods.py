"""Test methods (--test_method) and their registry: how queries are turned into tensors at test time and how the
results of their crops are merged."""
from dataclasses import dataclass
from typing import Callable, Optional

import datasets_ws
from commons import UserInputError
from metrics import merge_majority_voting, merge_nearest_crop


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
