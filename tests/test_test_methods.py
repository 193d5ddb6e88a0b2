"""Every test method on hand-built cases with known answers, for any recall values; the merging of crop results;
the streamed (low-RAM) search equal to the one-shot search."""
import os
import tracemalloc
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import datasets_ws
import extraction
import metrics
import test as vg_test
import test_methods
from commons import UserInputError

SIDE = 8  # --resize 8 8: database images of 8x8 are not changed by the resize


class MeanColour(torch.nn.Module):
    """Descriptor = the mean normalised colour of the image: known exactly for images made of flat colours."""
    features_dim = 3

    def forward(self, images):
        return images.mean(dim=(2, 3))


def make_args(**overrides):
    args = dict(device="cpu", infer_batch_size=4, num_workers=0, resize=[SIDE, SIDE], recall_values=[1, 5, 10, 20],
                majority_weight=0.01, efficient_ram_testing=False)
    args.update(overrides)
    return SimpleNamespace(**args)


def grey(level):
    return (level, level, level)


# Database: flat 8x8 images 100 m apart (so each query's only positive is the image at its own position)
DATABASE_COLOURS = {"g003": grey(3), "g020": grey(20), "g026": grey(26), "g061": grey(61), "g100": grey(100),
                    "g160": grey(160), "g220": grey(220), "red": (255, 0, 0), "green": (0, 255, 0),
                    "blue": (0, 0, 255), "yellow": (255, 255, 0)}


def _striped_query():
    """8x24: the left two thirds black, the right third grey 60.

    Crops (five_crop order TL, TR, BL, BR, centre): black, 60, black, 60, black. So:
    hard_resize / single_query see the mean 20 -> g020; central_crop sees black -> g003;
    five_crops see (3 * 0 + 2 * 60) / 5 = 24 -> g026; nearest_crop: a 60 crop is 1 grey level from g061, a black
    crop 3 from g003 -> g061 first; maj_voting: g003 has 3 first-place votes, g061 2 -> g003 first.
    """
    image = np.zeros((SIDE, 3 * SIDE, 3), dtype=np.uint8)
    image[:, 2 * SIDE:] = 60
    return Image.fromarray(image)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("datasets")
    split = root / "colours" / "images" / "test"
    (split / "database").mkdir(parents=True)
    (split / "queries").mkdir(parents=True)
    east = {}
    for i, (name, colour) in enumerate(DATABASE_COLOURS.items()):
        east[name] = 100 * i
        Image.new("RGB", (SIDE, SIDE), colour).save(split / "database" / f"@{100 * i:07d}.00@0000000.00@@{name}@.png")
    # Query 0 stands where g003 is; query 1 (a flat grey 100, the same for every method) where g100 is
    _striped_query().save(split / "queries" / f"@{east['g003']:07d}.00@0000000.00@@striped@.png")
    Image.new("RGB", (SIDE, SIDE), grey(100)).save(split / "queries" / f"@{east['g100']:07d}.00@0000000.00@@flat@.png")
    dataset = datasets_ws.GeoDataset(str(root), "colours", "test", positive_dist_threshold=25)
    index_of = {os.path.basename(p).split("@")[4]: i for i, p in enumerate(dataset.database_paths)}
    assert [os.path.basename(p).split("@")[4] for p in dataset.queries_paths] == ["striped", "flat"]
    return dataset, index_of


# Top-1 of the striped query per method (see _striped_query), and whether it is its positive (g003)
STRIPED_TOP1 = {"hard_resize": "g020", "single_query": "g020", "central_crop": "g003", "five_crops": "g026",
                "nearest_crop": "g061", "maj_voting": "g003"}
RECALL_VALUES_CASES = [[1], [1, 3], [1, 5, 10], [1, 5, 10, 20], [2, 11, 50]]


@pytest.mark.parametrize("recall_values", RECALL_VALUES_CASES, ids=str)
@pytest.mark.parametrize("test_method", list(test_methods.TEST_METHODS))
def test_each_method_finds_the_known_answer_with_any_recall_values(world, test_method, recall_values):
    dataset, index_of = world
    args = make_args(recall_values=recall_values)
    predictions, distances = vg_test.retrieve(args, dataset.database_paths, dataset.queries_paths, MeanColour(),
                                              test_method).top()
    k = min(max(recall_values), dataset.database_num)
    assert predictions.shape == distances.shape == (2, k)
    assert predictions[0, 0] == index_of[STRIPED_TOP1[test_method]]
    assert predictions[1, 0] == index_of["g100"]
    assert distances[1, 0] == pytest.approx(0, abs=1e-6)
    for row in predictions:  # every database image at most once per query
        assert len(set(row.tolist())) == k
    if test_method != "maj_voting":  # voting reorders by adjusted distances, not by the reported ones
        assert np.all(np.diff(distances, axis=1) >= 0)

    recalls, recalls_str = vg_test.test(args, dataset, MeanColour(), test_method)
    assert list(recalls) == recall_values
    for n in recall_values:
        if n == 1:  # the flat query is always right; the striped one when its top-1 is g003
            assert recalls[n] == (100.0 if STRIPED_TOP1[test_method] == "g003" else 50.0)
        if n >= dataset.database_num:  # every database image is among the predictions
            assert recalls[n] == 100.0
    assert recalls_str == ", ".join(f"R@{n}: {recalls[n]:.1f}" for n in recall_values)


def test_recall_at_1_per_method(world):
    dataset, _ = world
    for test_method, top1 in STRIPED_TOP1.items():
        recalls, _ = vg_test.test(make_args(recall_values=[1]), dataset, MeanColour(), test_method)
        assert recalls == {1: 100.0 if top1 == "g003" else 50.0}, test_method


def test_majority_voting_without_weight_is_nearest_crop(world):
    dataset, index_of = world
    predictions, _ = vg_test.retrieve(make_args(majority_weight=0.0), dataset.database_paths,
                                      dataset.queries_paths, MeanColour(), "maj_voting").top()
    reference, _ = vg_test.retrieve(make_args(), dataset.database_paths, dataset.queries_paths, MeanColour(),
                                    "nearest_crop").top()
    np.testing.assert_array_equal(predictions, reference)
    assert predictions[0, 0] == index_of["g061"]


def test_five_crops_descriptor_is_the_mean_of_its_crops(world):
    dataset, _ = world
    saved = {}
    vg_test.retrieve(make_args(), dataset.database_paths, dataset.queries_paths, MeanColour(), "five_crops",
                     on_descriptors=lambda kind, indices, d: saved.setdefault(kind, {}).update(zip(indices, d)))
    std = np.array(datasets_ws.IMAGENET_STD)
    mean = np.array(datasets_ws.IMAGENET_MEAN)
    np.testing.assert_allclose(saved["queries"][0], (24 / 255 - mean) / std, atol=1e-5)
    np.testing.assert_allclose(saved["database"][0], (3 / 255 - mean) / std, atol=1e-5)


def test_single_query_takes_queries_of_any_size_one_at_a_time(world):
    dataset, _ = world
    seen = []
    vg_test.retrieve(make_args(), dataset.database_paths, dataset.queries_paths, MeanColour(), "single_query",
                     on_descriptors=lambda kind, indices, d: seen.append((kind, len(indices))))
    assert [n for kind, n in seen if kind == "queries"] == [1, 1]
    assert [n for kind, n in seen if kind == "database"] == [4, 4, 3]


def test_unknown_test_method_lists_the_valid_ones(world):
    dataset, _ = world
    with pytest.raises(UserInputError, match="Unknown test method 'six_crops'; valid names: hard_resize, single_q"):
        vg_test.retrieve(make_args(), dataset.database_paths, dataset.queries_paths, MeanColour(), "six_crops")


# ---------------------------------------------------------------------------------------------- merging

def test_nearest_crop_merge_by_hand():
    # 1 query, 3 crops, k = 3
    predictions = np.array([[[4, 2, 7], [2, 9, 4], [7, 4, 1]]])
    distances = np.array([[[0.5, 0.9, 1.0], [0.1, 0.6, 0.7], [0.3, 0.4, 2.0]]], dtype=np.float32)
    # sorted: 2(.1) 7(.3) 4(.4) 4(.5) 9(.6) 4(.7) 2(.9) 7(1.0) 1(2.0) -> unique in order 2 7 4 9 1
    np.testing.assert_array_equal(metrics.merge_nearest_crop(predictions, distances, 3), [[2, 7, 4]])
    np.testing.assert_array_equal(metrics.merge_nearest_crop(predictions, distances, 5), [[2, 7, 4, 9, 1]])
    np.testing.assert_allclose(metrics.nearest_crop_distances(predictions, distances, np.array([[2, 7, 4, 9, 1]])),
                               [[0.1, 0.3, 0.4, 0.6, 2.0]])


def test_majority_voting_merge_by_hand():
    # 1 query, 5 crops, k = 2. Database 5 is first for 3 crops but farther than 8, first for 2 crops
    predictions = np.array([[[5, 8], [8, 5], [5, 8], [8, 5], [5, 8]]])
    distances = np.array([[[0.9, 1.5], [0.1, 1.6], [0.9, 1.5], [0.1, 1.6], [0.9, 1.5]]], dtype=np.float32)
    np.testing.assert_array_equal(metrics.merge_nearest_crop(predictions, distances, 2), [[8, 5]])
    # top1 votes: 5 -> 3 w, 8 -> 2 w; in the first 5 (and 10) columns both appear 5 times: equal votes.
    # With w = 1: 5 at 0.9 - 3 - 1 - 0.5 = -3.6; 8 at 0.1 - 2 - 1 - 0.5 = -3.4 -> 5 first
    np.testing.assert_array_equal(metrics.merge_majority_voting(predictions, distances, 2, 1.0), [[5, 8]])
    # With w = 0.5: 5 at 0.9 - 1.5 = -0.6 (-0.5 -0.25 for top5/10 on both) vs 8 at 0.1 - 1.0 = -0.9 -> 8 first
    np.testing.assert_array_equal(metrics.merge_majority_voting(predictions, distances, 2, 0.5), [[8, 5]])
    # The input distances are not modified
    assert distances[0, 0, 0] == np.float32(0.9)


@pytest.mark.parametrize("crops_num,k,top_k", [(5, 20, 20), (5, 10, 10), (3, 4, 2), (2, 1, 1)])
def test_merges_work_for_any_crop_count_and_k(crops_num, k, top_k):
    rng = np.random.default_rng(crops_num * 100 + k)
    queries_num, database_num = 7, 30
    predictions = np.stack([np.stack([rng.permutation(database_num)[:k] for _ in range(crops_num)])
                            for _ in range(queries_num)])
    distances = np.sort(rng.random((queries_num, crops_num, k)).astype(np.float32), axis=2)
    for merged in (metrics.merge_nearest_crop(predictions, distances, top_k),
                   metrics.merge_majority_voting(predictions, distances, top_k, 0.01)):
        assert merged.shape == (queries_num, top_k)
        for q in range(queries_num):
            assert len(set(merged[q].tolist())) == top_k
            assert set(merged[q].tolist()) <= set(predictions[q].ravel().tolist())
    # nearest_crop by a plain loop: the best distance of each index, sorted
    merged = metrics.merge_nearest_crop(predictions, distances, top_k)
    for q in range(queries_num):
        best = {}
        for p, d in zip(predictions[q].ravel(), distances[q].ravel()):
            best[p] = min(best.get(p, np.inf), d)
        assert merged[q].tolist() == sorted(best, key=lambda p: best[p])[:top_k]


@pytest.mark.parametrize("test_method", list(test_methods.TEST_METHODS))
def test_top_k_of_a_deeper_search_equals_a_search_for_k(world, test_method):
    """eval.py searches deeper than max(recall_values) for --save_predictions K; the recalls must not change
    (majority voting looks at the first 10 predictions of each crop, so it depends on k)."""
    dataset, _ = world
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    deep = vg_test.retrieve(make_args(majority_weight=0.5), dataset.database_paths, dataset.queries_paths, model,
                            test_method, k=11)
    for k in (1, 3, 5, 10):
        shallow = vg_test.retrieve(make_args(recall_values=[k], majority_weight=0.5), dataset.database_paths,
                                   dataset.queries_paths, model, test_method)
        for got, expected in zip(deep.top(k), shallow.top()):
            np.testing.assert_array_equal(got, expected)


# ---------------------------------------------------------------------------------------------- low-RAM path

@pytest.mark.parametrize("test_method", list(test_methods.TEST_METHODS))
def test_efficient_ram_testing_gives_the_same_results(world, test_method, monkeypatch):
    dataset, _ = world
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    for recall_values in ([1, 5, 10, 20], [1, 3]):
        reference = vg_test.retrieve(make_args(recall_values=recall_values), dataset.database_paths,
                                     dataset.queries_paths, model, test_method)
        for chunk_size in (None, 3):  # faiss' block (one chunk here) and several chunks of 3
            monkeypatch.setattr(vg_test, "STREAMING_CHUNK_SIZE", chunk_size)
            streamed = vg_test.retrieve(make_args(recall_values=recall_values, efficient_ram_testing=True),
                                        dataset.database_paths, dataset.queries_paths, model, test_method)
            np.testing.assert_array_equal(streamed.searched_predictions, reference.searched_predictions)
            np.testing.assert_array_equal(streamed.searched_distances, reference.searched_distances)
            for got, expected in zip(streamed.top(), reference.top()):
                np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("chunk_size", [None, 7, 1000, 2048])
def test_streaming_search_equals_exact_search_with_ties(chunk_size):
    rng = np.random.default_rng(0)
    database = rng.standard_normal((5000, 16)).astype(np.float32)
    database[[10, 1500, 4000]] = database[2500]  # exact ties across chunks
    queries = rng.standard_normal((60, 16)).astype(np.float32)
    queries[0] = database[2500]
    expected_distances, expected_predictions = vg_test.exact_search(database, queries, 20)
    search = vg_test.StreamingExactSearch(queries, 20, chunk_size)
    for start in range(0, len(database), 333):  # batches unaligned with the chunks
        search.add(database[start:start + 333])
    distances, predictions = search.result()
    np.testing.assert_array_equal(predictions, expected_predictions)
    assert predictions[0, :4].tolist() == [10, 1500, 2500, 4000]
    if chunk_size is None or chunk_size % 1024 == 0:
        np.testing.assert_array_equal(distances, expected_distances)
    else:
        np.testing.assert_allclose(distances, expected_distances, rtol=1e-5, atol=1e-5)


def test_streaming_search_memory_does_not_grow_with_the_database():
    dim, queries_num, k, batch = 64, 50, 20, 500
    queries = np.random.default_rng(1).standard_normal((queries_num, dim)).astype(np.float32)

    def peak_bytes(database_num):
        tracemalloc.start()
        search = vg_test.StreamingExactSearch(queries, k)
        rng = np.random.default_rng(2)
        for _ in range(database_num // batch):  # descriptors made batch by batch, as extraction does
            search.add(rng.standard_normal((batch, dim)).astype(np.float32))
        search.result()
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return peak

    small, large = peak_bytes(5_000), peak_bytes(50_000)
    whole_database_bytes = 50_000 * dim * 4  # 12.8 MB, what the one-shot search holds
    assert large < whole_database_bytes / 4
    assert large < small * 1.5


def test_non_finite_descriptors_stop_the_test_with_a_clear_error():
    class BrokenModel(torch.nn.Module):
        def forward(self, images):
            features = torch.ones(images.shape[0], 4)
            features[0, 1] = float("nan")
            return features
    loader = [(torch.zeros(2, 3, 8, 8), torch.tensor([0, 1]))]
    with pytest.raises(UserInputError, match="non-finite descriptors .* Check --resume, or retrain with a lower --lr"):
        list(extraction.descriptor_batches(BrokenModel(), loader, "cpu"))
