"""Recall@N: a pure, vectorised function of predictions and positives, equal to the original's plain loop."""
import json
import os

import numpy as np
import pytest

import datasets_ws
import metrics

CORRIDOR = os.path.join(os.path.dirname(__file__), "data", "realdata", "vprbench_corridor")


def plain_loop_recalls(predictions, positives_per_query, recall_values):
    """The original benchmark's loop (recall_values sorted, as the parser makes them)."""
    recalls = np.zeros(len(recall_values))
    for query_index, prediction in enumerate(predictions):
        for i, n in enumerate(recall_values):
            if np.any(np.isin(prediction[:n], positives_per_query[query_index])):
                recalls[i:] += 1
                break
    return recalls / len(predictions) * 100


@pytest.mark.parametrize("seed", range(20))
def test_recalls_equal_the_plain_loop_on_random_cases(seed):
    rng = np.random.default_rng(seed)
    database_num = int(rng.integers(1, 60))
    queries_num = int(rng.integers(1, 40))
    k = int(rng.integers(1, database_num + 1))
    predictions = np.stack([rng.permutation(database_num)[:k] for _ in range(queries_num)])
    # Some queries without positives, some with many
    positives = [np.sort(rng.choice(database_num, int(rng.integers(0, min(database_num, 6) + 1)), replace=False))
                 for _ in range(queries_num)]
    recall_values = sorted(set(rng.integers(1, 30, size=int(rng.integers(1, 6))).tolist()))
    got = metrics.compute_recalls(predictions, positives, recall_values)
    np.testing.assert_array_equal(got, plain_loop_recalls(predictions, positives, recall_values))


def test_recalls_by_hand():
    predictions = np.array([[3, 1, 2],   # positive at rank 2
                            [0, 1, 2],   # positive at rank 1
                            [2, 1, 0],   # no positive among the predictions
                            [1, 2, 3]])  # no positive at all: still in the denominator
    positives = [np.array([1]), np.array([0, 5]), np.array([7]), np.array([], dtype=np.int64)]
    np.testing.assert_array_equal(metrics.compute_recalls(predictions, positives, [1, 2, 3, 50]),
                                  [25.0, 50.0, 50.0, 50.0])
    # Any order and any N (beyond k the recall stays as at k)
    np.testing.assert_array_equal(metrics.compute_recalls(predictions, positives, [3, 1]), [50.0, 25.0])


def test_faiss_missing_results_never_count_as_positives():
    # -1 is faiss' "no result"; query 1's key arithmetic would alias it with query 0's last database index
    predictions = np.array([[0, 1], [-1, -1]])
    positives = [np.array([1]), np.array([0])]
    np.testing.assert_array_equal(metrics.positives_mask(predictions, positives), [[False, True], [False, False]])


def test_positives_mask_checks_its_inputs():
    with pytest.raises(ValueError, match="2 rows of predictions but positives for 1 queries"):
        metrics.positives_mask(np.zeros((2, 3), dtype=int), [np.array([0])])


def test_recalls_string_has_the_original_format():
    assert (metrics.recalls_to_str([1, 5, 10, 20], [47.83, 55.81, 60.25, 67.1])
            == "R@1: 47.8, R@5: 55.8, R@10: 60.2, R@20: 67.1")
    assert metrics.recalls_to_str([1, 3], [100.0, 0.0]) == "R@1: 100.0, R@3: 0.0"


@pytest.mark.parametrize("method", ["AMOSNet", "AlexNet_VPR", "CALC", "CoHOG", "HOG", "HybridNet", "NetVLAD",
                                    "RegionVLAD", "ap-gem-r101", "denseVLAD"])
def test_vprbench_corridor_recalls_from_its_similarity_matrices(method):
    """VPR-Bench's own similarity matrices, ranked and fed to compute_recalls with the positives that our
    dataset reader derives from the file names, give the recalls listed with them."""
    dataset = datasets_ws.GeoDataset(os.path.dirname(CORRIDOR), "vprbench_corridor", "test",
                                     positive_dist_threshold=25)
    scores = np.load(os.path.join(CORRIDOR, "vprbench_scores.npz"))[f"{method}__scores"]
    with open(os.path.join(CORRIDOR, "vprbench_scores_recalls.json")) as file:
        expected = json.load(file)[method]
    predictions = np.argsort(-scores, axis=1, kind="stable")[:, :10]  # higher score = more similar
    recalls = metrics.compute_recalls(predictions, dataset.soft_positives_per_query, [1, 5, 10])
    assert [round(r, 2) for r in recalls] == [expected["R@1"], expected["R@5"], expected["R@10"]]
