"""Mining: batched searches give the original's per-query triplets; positives and negatives respect the distances."""
import logging
from types import SimpleNamespace

import faiss
import numpy as np
import pytest
import torch

import datasets_ws
import mining
from commons import UserInputError

HARD, SOFT = 10, 25
DIM = 8


def make_world(seed=0, database_num=120, queries_num=40, note=None):
    """Database images every 5 m along a street, queries scattered on it (some far from it), random features.

    Returns the dataset view the miners read and features [database_num + queries_num, DIM] of every image.
    """
    rng = np.random.default_rng(seed)
    database_utms = np.stack([np.arange(database_num) * 5.0, np.zeros(database_num)], axis=1)
    queries_utms = np.stack([rng.uniform(-20, database_num * 5 + 20, queries_num),
                             rng.uniform(-6, 6, queries_num)], axis=1)
    hard = datasets_ws.find_positives(database_utms, queries_utms, HARD)
    keep = [len(p) > 0 for p in hard]
    queries_utms = queries_utms[keep]
    notes = note or (lambda i: f"day_forward")
    dataset = SimpleNamespace(
        database_num=database_num, queries_num=len(queries_utms), database_utms=database_utms,
        queries_utms=queries_utms,
        hard_positives_per_query=[p for p, k in zip(hard, keep) if k],
        soft_positives_per_query=datasets_ws.find_positives(database_utms, queries_utms, SOFT),
        queries_paths=[f"/q/@{e}@{n}@@@@@@@@@@@@{notes(i)}@.jpg" for i, (e, n) in enumerate(queries_utms)])
    features = rng.standard_normal((database_num + len(queries_utms), DIM)).astype(np.float32)
    return dataset, features


# ---------------------------------------------------------------------------------------------- the original's
# per-query form (one faiss index per query), kept as the reference

def ref_best_positive(dataset, features, query_index):
    positives = dataset.hard_positives_per_query[query_index]
    index = faiss.IndexFlatL2(DIM)
    index.add(features[positives])
    _, best = index.search(features[dataset.database_num + query_index].reshape(1, -1), 1)
    return positives[best[0]].item()


def ref_hardest_negatives(dataset, features, query_index, neg_samples, k):
    index = faiss.IndexFlatL2(DIM)
    index.add(features[neg_samples])
    _, nums = index.search(features[dataset.database_num + query_index].reshape(1, -1), k)
    return neg_samples[nums.reshape(-1)].astype(np.int32)


def ref_partial(dataset, features, count, negs_num, neg_samples_num, weights=None):
    queries = np.random.choice(dataset.queries_num, count, replace=False, p=weights)
    sampled_database = np.random.choice(dataset.database_num, neg_samples_num, replace=False)
    triplets = []
    for q in queries:
        positive = ref_best_positive(dataset, features, q)
        neg_indexes = np.setdiff1d(sampled_database, dataset.soft_positives_per_query[q], assume_unique=True)
        triplets.append((q, positive, *ref_hardest_negatives(dataset, features, q, neg_indexes, negs_num)))
    return np.array(triplets)


def ref_full(dataset, features, count, negs_num, neg_samples_num, neg_cache):
    queries = np.random.choice(dataset.queries_num, count, replace=False)
    triplets = []
    for q in queries:
        positive = ref_best_positive(dataset, features, q)
        neg_indexes = np.random.choice(dataset.database_num, neg_samples_num, replace=False)
        neg_indexes = np.setdiff1d(neg_indexes, dataset.soft_positives_per_query[q], assume_unique=True)
        neg_indexes = np.unique(np.concatenate([neg_cache[q], neg_indexes]))
        neg_indexes = ref_hardest_negatives(dataset, features, q, neg_indexes, negs_num)
        neg_cache[q] = neg_indexes
        triplets.append((q, positive, *neg_indexes))
    return np.array(triplets)


def ref_random(dataset, features, count, negs_num):
    queries = np.random.choice(dataset.queries_num, count, replace=False)
    triplets = []
    for q in queries:
        positive = ref_best_positive(dataset, features, q)
        soft = dataset.soft_positives_per_query[q]
        neg_indexes = np.random.choice(dataset.database_num, size=negs_num + len(soft), replace=False)
        neg_indexes = np.setdiff1d(neg_indexes, soft, assume_unique=True)[:negs_num]
        triplets.append((q, positive, *neg_indexes))
    return np.array(triplets)


def batched(miner, dataset, features, count):
    plan = miner.plan(count)
    cache_indexes = plan.cache_indexes
    cache = mining.FeatureCache(cache_indexes, features[cache_indexes], len(features))
    return miner.mine(plan, cache), plan


# ---------------------------------------------------------------------------------------------- batched == reference

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_partial_equals_the_per_query_reference(seed):
    dataset, features = make_world(seed)
    np.random.seed(seed)
    expected = ref_partial(dataset, features, 20, 5, 50)
    np.random.seed(seed)
    got, plan = batched(mining.PartialMining(dataset, 5, 50), dataset, features, 20)
    np.testing.assert_array_equal(got, expected)
    # Cached: the sampled database images, the positives of the sampled queries, the sampled queries
    positives = np.concatenate([dataset.hard_positives_per_query[q] for q in plan.queries_indexes])
    assert set(plan.database_indexes) == set(plan.sampled_database_indexes) | set(positives)


def test_full_equals_the_per_query_reference_over_refreshes_with_its_cache():
    dataset, features = make_world(3)
    neg_cache = [np.empty((0,), dtype=np.int32) for _ in range(dataset.queries_num)]
    miner = mining.FullMining(dataset, 4, 30)
    np.random.seed(3)
    expected = [ref_full(dataset, features + i, dataset.queries_num // 2, 4, 30, neg_cache) for i in range(3)]
    np.random.seed(3)
    got = [batched(miner, dataset, features + i, dataset.queries_num // 2)[0] for i in range(3)]
    for e, g in zip(expected, got):
        np.testing.assert_array_equal(g, e)
    for q in range(dataset.queries_num):
        np.testing.assert_array_equal(miner.neg_cache[q][miner.neg_cache[q] >= 0], neg_cache[q])
    # The second refresh reused previous negatives for the queries sampled twice
    assert sum(len(c) > 0 for c in neg_cache) > dataset.queries_num // 2


def test_random_equals_the_per_query_reference():
    dataset, features = make_world(4)
    np.random.seed(4)
    expected = ref_random(dataset, features, 15, 6)
    np.random.seed(4)
    got, plan = batched(mining.RandomMining(dataset, 6, 1000), dataset, features, 15)
    np.testing.assert_array_equal(got, expected)
    positives = np.concatenate([dataset.hard_positives_per_query[q] for q in plan.queries_indexes])
    np.testing.assert_array_equal(plan.database_indexes, np.unique(positives))


def msls_note(i):
    return ["day_forward", "night_forward", "day_sideways", "night_sideways"][i % 7 % 4]


def test_msls_weighted_equals_the_reference_with_the_weights():
    dataset, features = make_world(5, note=msls_note)
    miner = mining.MslsWeightedMining(dataset, 5, 40)
    np.random.seed(5)
    expected = ref_partial(dataset, features, 10, 5, 40, weights=miner.weights)
    np.random.seed(5)
    got, _ = batched(miner, dataset, features, 10)
    np.testing.assert_array_equal(got, expected)


def test_msls_weights_by_hand():
    notes = ["day_forward", "night_forward", "day_sideways", "day_forward"]
    paths = [f"/q/@0@0@@@@@@@@@@@@{note}@.jpg" for note in notes]
    weights = mining.msls_query_weights(paths)
    raw = np.array([1, 1 + 4 / 1, 1 + 4 / 1, 1])
    np.testing.assert_allclose(weights, raw / raw.sum())


def test_msls_weighted_without_notes_is_a_clear_error():
    with pytest.raises(UserInputError, match="msls_weighted.*notes"):
        mining.msls_query_weights(["/q/@0@0@@@@@@@@@@@@synthetic@.jpg"])


# ---------------------------------------------------------------------------------------------- distances

@pytest.mark.parametrize("name", list(mining.MINING_METHODS))
def test_positives_within_hard_and_negatives_beyond_soft_threshold(name):
    dataset, features = make_world(6, note=msls_note)
    miner = mining.make_miner(name, dataset, 5, 40)
    np.random.seed(6)
    for refresh in range(2):
        triplets, _ = batched(miner, dataset, features, 12)
        assert triplets.shape == (12, 2 + 5) and triplets.dtype == np.int64
        assert len(np.unique(triplets[:, 0])) == 12
        for query_index, positive, *negatives in triplets:
            query_utm = dataset.queries_utms[query_index]
            assert np.linalg.norm(dataset.database_utms[positive] - query_utm) <= HARD
            distances = np.linalg.norm(dataset.database_utms[negatives] - query_utm, axis=1)
            assert np.all(distances > SOFT), (name, query_index, distances)
            assert len(set(negatives)) == len(negatives)


def test_best_positive_is_the_nearest_in_feature_space():
    dataset, features = make_world(7)
    queries = np.arange(dataset.queries_num)
    cache = mining.FeatureCache(np.arange(len(features)), features, len(features))
    got = mining.best_positives(cache, queries, dataset.hard_positives_per_query, dataset.database_num)
    for q in queries:
        positives = dataset.hard_positives_per_query[q]
        distances = ((features[positives] - features[dataset.database_num + q]) ** 2).sum(1)
        assert got[q] == positives[np.argmin(distances)]


def test_pairwise_distances_are_faiss_exact_search_distances_bit_for_bit():
    rng = np.random.default_rng(0)
    features = rng.standard_normal((50, 300)).astype(np.float32)
    candidates = np.array([[3, 7, 9, -1], [0, 1, 2, 49]])
    got = mining.pairwise_distances(features, [10, 11], candidates)
    for i, query_row in enumerate([10, 11]):
        valid = candidates[i][candidates[i] >= 0]
        index = faiss.IndexFlatL2(300)
        index.add(features[valid])
        distances, labels = index.search(features[query_row:query_row + 1], len(valid))
        assert got[i][labels[0]].tobytes() == distances[0].tobytes()
    assert got[0, 3] == np.inf


def test_feature_cache_refuses_uncached_images():
    cache = mining.FeatureCache([0, 5], np.zeros((2, DIM), np.float32), 10)
    np.testing.assert_array_equal(cache.rows([5, -1, 0]), [1, -1, 0])
    with pytest.raises(RuntimeError, match=r"\[3\]"):
        cache.rows([3])


# ---------------------------------------------------------------------------------------------- sizes

def test_neg_samples_num_is_clamped_to_the_database_with_a_warning(caplog):
    dataset, features = make_world(8, database_num=60)
    with caplog.at_level(logging.WARNING):
        miner = mining.PartialMining(dataset, 5, 1000)
    assert miner.neg_samples_num == 60
    assert "--neg_samples_num 1000 is larger than the training database (60 images)" in caplog.text
    triplets, _ = batched(miner, dataset, features, 5)
    assert triplets.shape == (5, 7)


def test_too_many_negatives_for_the_database_is_a_clear_error():
    dataset, _ = make_world(9, database_num=12)
    with pytest.raises(UserInputError, match="--negs_num_per_query 10"):
        mining.RandomMining(dataset, 10, 100)


def test_too_few_sampled_negatives_names_the_flags():
    dataset, features = make_world(10)
    miner = mining.PartialMining(dataset, 8, 8)  # every soft positive among the 8 samples leaves fewer than 8
    np.random.seed(0)
    with pytest.raises(UserInputError, match="raise --neg_samples_num or lower --negs_num_per_query"):
        for _ in range(20):
            batched(miner, dataset, features, 10)


def test_unknown_mining_lists_the_valid_names():
    dataset, _ = make_world(0)
    with pytest.raises(UserInputError, match="partial, full, random, msls_weighted"):
        mining.make_miner("hardest", dataset, 5, 10)


def test_full_mining_state_round_trip_and_shape_mismatch(caplog):
    dataset, features = make_world(11)
    miner = mining.FullMining(dataset, 4, 30)
    np.random.seed(0)
    batched(miner, dataset, features, 10)
    state = miner.state_dict()
    assert isinstance(state["neg_cache"], torch.Tensor)
    other = mining.FullMining(dataset, 4, 30)
    other.load_state_dict(state)
    np.testing.assert_array_equal(other.neg_cache, miner.neg_cache)
    smaller = mining.FullMining(dataset, 3, 30)
    with caplog.at_level(logging.WARNING):
        smaller.load_state_dict(state)
    assert "starting with an empty cache" in caplog.text and np.all(smaller.neg_cache == -1)


# ---------------------------------------------------------------------------------------------- caching

class _Images(torch.utils.data.Dataset):
    def __init__(self, images):
        self.images = images

    def __getitem__(self, index):
        return self.images[index], index

    def __len__(self):
        return len(self.images)


def test_feature_extractor_returns_features_in_the_asked_order_and_restores_train_mode():
    torch.manual_seed(0)
    images = torch.randn(30, 3, 8, 8)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten())
    model.train()
    extractor = mining.FeatureExtractor(_Images(images), batch_size=4, num_workers=0, device="cpu")
    indexes = np.array([29, 3, 7, 0, 15, 16, 2])
    got = extractor(model, indexes, 4)
    assert model.training
    model.eval()
    with torch.no_grad():
        expected = model(images[indexes]).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    # The same loader serves the next refresh
    np.testing.assert_allclose(extractor(model, indexes[:2], 4), expected[:2], rtol=1e-5, atol=1e-6)
