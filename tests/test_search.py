"""search.py: each index finds the exact neighbours where it should (flat always, bit for bit; ivf probing every
list; hnsw with a high efSearch) and most of them otherwise, indexes built in parts equal one part,
saved indexes are reused, the exact search in blocks from stored descriptors equals the one-shot search, memory
follows the budget, and bad parameters give errors that name the flag."""
import os
import tracemalloc

import faiss
import numpy as np
import pytest

import descriptor_store
import indexes
import search
from commons import UserInputError


def clustered(rows, dim, clusters, seed, spread=0.3):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32) * 3
    return (centres[rng.integers(clusters, size=rows)]
            + rng.standard_normal((rows, dim)).astype(np.float32) * spread).astype(np.float32)


def settings(name="flat", max_ram_gb=None, **params):
    return search.SearchSettings(name, search.IndexParams(**params), max_ram_gb)


@pytest.fixture(autouse=True, scope="module")
def one_faiss_thread():
    """faiss' OpenMP threads wait actively for each other: on a machine whose cores are busy (tests running in
    parallel) training slows down tenfold. One thread keeps these small cases fast."""
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(threads)


@pytest.fixture(scope="module")
def data():
    database = clustered(3000, 32, 20, seed=0)
    queries = clustered(70, 32, 20, seed=1)
    return database, queries, search.exact_search(database, queries, 10)


def test_exact_search_is_faiss_index_flat_l2(data):
    database, queries, (distances, predictions) = data
    index = faiss.IndexFlatL2(database.shape[1])
    index.add(database)
    expected_distances, expected_predictions = index.search(queries, 10)
    np.testing.assert_array_equal(distances, expected_distances)
    np.testing.assert_array_equal(predictions, expected_predictions)


@pytest.mark.parametrize("name, params", [
    ("flat", {}),
    ("ivf", {"ivf_lists": 16, "ivf_probes": 16}),           # every list probed: an exhaustive search
    ("hnsw", {"hnsw_m": 16, "hnsw_ef_search": 3000}),       # a candidate list as long as the database
])
def test_each_index_returns_the_exact_neighbours_where_it_should(data, tmp_path, name, params):
    database, queries, (expected_distances, expected_predictions) = data
    result = search.search_descriptors(database, queries, 10, settings(name, **params), str(tmp_path))
    np.testing.assert_array_equal(result.predictions, expected_predictions)
    if name == "flat":
        np.testing.assert_array_equal(result.distances, expected_distances)
    else:
        np.testing.assert_allclose(result.distances, expected_distances, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("name, params, minimum_recall", [
    ("ivf", {"ivf_lists": 32, "ivf_probes": 8}, 0.9),
    ("ivfpq", {"ivf_lists": 16, "ivf_probes": 8, "pq_bytes": 16, "index_train_size": 2048}, 0.7),
    ("hnsw", {"hnsw_m": 16, "hnsw_ef_search": 128}, 0.9),
])
def test_approximate_indexes_find_most_true_neighbours(data, tmp_path, name, params, minimum_recall):
    database, queries, (_, expected_predictions) = data
    result = search.search_descriptors(database, queries, 10, settings(name, **params), str(tmp_path))
    found = np.mean([len(set(got) & set(true)) / 10 for got, true in zip(result.predictions, expected_predictions)])
    assert found >= minimum_recall


def test_an_index_in_parts_equals_one_index(data, tmp_path, monkeypatch):
    """A budget smaller than the index splits it into parts sharing one training; probing every list, each
    part's results are exact, and their merge equals the single index's results."""
    monkeypatch.setattr(search, "FIXED_OVERHEAD_BYTES", 0)  # a budget of a few hundred vectors
    database, queries, _ = data
    params = {"ivf_lists": 8, "ivf_probes": 8, "index_train_size": 512}
    whole = search.search_descriptors(database, queries, 10, settings("ivf", **params), str(tmp_path / "a"))
    parted_settings = settings("ivf", max_ram_gb=700 * (4 * 32 + 8) / search.GIB, **params)  # 350 rows a part
    parted = search.search_descriptors(database, queries, 10, parted_settings, str(tmp_path / "b"))
    built = search.load_built_index(os.path.join(tmp_path / "b", os.listdir(tmp_path / "b")[0]))
    assert len(built.ranges) == 9 and built.ranges[0] == (0, 350) and built.ranges[-1] == (2800, 3000)
    np.testing.assert_array_equal(parted.predictions, whole.predictions)
    np.testing.assert_array_equal(parted.distances, whole.distances)


def test_a_built_index_is_saved_and_reused_whatever_the_search_parameters(data, tmp_path, monkeypatch):
    database, queries, _ = data
    first = search.search_descriptors(database, queries, 10, settings("ivf", ivf_lists=16, ivf_probes=2),
                                      str(tmp_path))
    assert len(os.listdir(tmp_path)) == 1

    def no_build(*args):
        raise AssertionError("the saved index should have been reused")
    monkeypatch.setitem(indexes.FAISS_INDEXES, "ivf", indexes.FAISS_INDEXES["ivf"].__class__(
        build=no_build, bytes_per_vector=indexes.FAISS_INDEXES["ivf"].bytes_per_vector,
        configure=indexes.FAISS_INDEXES["ivf"].configure, trained=True))
    again = search.search_descriptors(database, queries, 10, settings("ivf", ivf_lists=16, ivf_probes=2),
                                      str(tmp_path))
    np.testing.assert_array_equal(again.predictions, first.predictions)
    assert again.build_seconds == 0
    more_probes = search.search_descriptors(database, queries, 10, settings("ivf", ivf_lists=16, ivf_probes=16),
                                            str(tmp_path))
    np.testing.assert_array_equal(more_probes.predictions, search.exact_search(database, queries, 10)[1])
    with pytest.raises(AssertionError, match="reused"):  # other build parameters: another index
        search.search_descriptors(database, queries, 10, settings("ivf", ivf_lists=8), str(tmp_path))


def test_the_default_ivf_lists_and_training_sample_follow_the_database():
    resolved = search.resolve_params("ivf", search.IndexParams(), 64, 10_000, None)
    assert resolved["ivf_lists"] == 400 and resolved["train_rows"] == 10_000  # 4 sqrt(N); 64 per list > N
    resolved = search.resolve_params("ivfpq", search.IndexParams(ivf_lists=10), 96, 100_000, None)
    assert resolved["train_rows"] == 64 * 256 and resolved["pq_bytes"] == 48  # largest divisor of 96 up to 64
    resolved = search.resolve_params("ivf", search.IndexParams(ivf_lists=10), 96, 100_000, None)
    assert resolved["train_rows"] == 640
    # A quarter of the budget (4 MiB) holds the training sample: 256 vectors of 4 KiB
    resolved = search.resolve_params("ivf", search.IndexParams(ivf_lists=10), 1024, 10_000, 4 / 1024)
    assert resolved["train_rows"] == 256


@pytest.mark.parametrize("name, params, rows, message", [
    ("ivf", {"ivf_lists": 500}, 300, "--ivf_lists 500 needs at least 500 training vectors"),
    ("ivf", {"ivf_lists": 50, "index_train_size": 20}, 300, "--ivf_lists 50 needs at least 50"),
    ("ivfpq", {"ivf_lists": 4, "pq_bytes": 5}, 1000, "--pq_bytes 5 must divide the descriptor size 32"),
    ("ivfpq", {"ivf_lists": 4}, 200, "ivfpq needs at least 256 training vectors"),
    ("annoy", {}, 300, "Unknown --faiss_index 'annoy'; valid names: flat, ivf, ivfpq, hnsw"),
])
def test_bad_index_parameters_are_clear_errors(tmp_path, name, params, rows, message):
    database = clustered(rows, 32, 4, seed=0)
    with pytest.raises(UserInputError, match=message.replace("(", r"\(")):
        search.search_descriptors(database, database[:3], 5, settings(name, **params), str(tmp_path))


def test_a_budget_too_small_for_the_results_is_a_clear_error():
    with pytest.raises(UserInputError, match=r"--max_ram_gb 0.01 is too small .* Raise --max_ram_gb"):
        search.plan_exact_search(0.01, 128, 1_000_000, 100)


@pytest.mark.parametrize("max_ram_gb", [None, 1.0, 0.1])
def test_the_exact_search_plan_fits_the_budget(max_ram_gb):
    dim, queries_num, k = 4096, 20_000, 20
    database_rows, query_rows = search.plan_exact_search(max_ram_gb, dim, queries_num, k)
    used = (search.FIXED_OVERHEAD_BYTES + 3 * queries_num * k * 12 + (2 * database_rows + query_rows) * 4 * dim)
    assert used <= search.budget_bytes(max_ram_gb)
    assert 1 <= query_rows <= queries_num
    blas_block = faiss.cvar.distance_compute_blas_database_bs
    assert database_rows % blas_block == 0 or database_rows < blas_block


def test_shards_hold_whole_batches_within_the_budget():
    assert search.plan_shard_rows(None, 1024, 16, 256 * 1024 ** 2) == 256 * 1024  # 256 MiB of 1 KiB rows
    assert search.plan_shard_rows(1 / 1024, 1024, 16, 256 * 1024 ** 2) == 256  # a quarter of 1 MiB
    assert search.plan_shard_rows(1 / 1024, 1024, 100, 256 * 1024 ** 2) == 200  # whole batches: 2 of 100
    assert search.plan_shard_rows(1e-6, 1024, 16, 256 * 1024 ** 2) == 16  # at least one batch


# ------------------------------------------------------------------------------------ exact search in blocks

def stored(tmp_path, array, shard_rows, dtype="float32", name="stored"):
    shards = descriptor_store.open_shards(str(tmp_path / name), {"test": name}, len(array), shard_rows, dtype)
    for shard in range(shards.shards_num):
        shards.write_shard(shard, array[slice(*shards.shard_range(shard))])
    return shards


def test_exact_search_of_stored_descriptors_equals_the_one_shot_search(tmp_path):
    """Database and queries on disk in shards, read back in blocks and chunks much smaller than them (a budget
    of a few hundred vectors), with exact ties across blocks: the very same distances and order."""
    rng = np.random.default_rng(0)
    database = rng.standard_normal((5000, 16)).astype(np.float32)
    database[[10, 1500, 4000]] = database[2500]
    queries = rng.standard_normal((300, 16)).astype(np.float32)
    queries[0] = database[2500]
    expected = search.exact_search(database, queries, 20)
    budget_gb = (search.FIXED_OVERHEAD_BYTES + 3 * 300 * 20 * 12 + 600 * 64) / search.GIB
    database_rows, query_rows = search.plan_exact_search(budget_gb, 16, 300, 20)
    assert database_rows < 300 and query_rows < 300  # several blocks and several query chunks
    result = search.search_descriptors(stored(tmp_path, database, 777, name="db"),
                                       stored(tmp_path, queries, 50, name="q"), 20, settings(max_ram_gb=budget_gb))
    np.testing.assert_array_equal(result.predictions, expected[1])
    np.testing.assert_array_equal(result.distances, expected[0])
    assert result.predictions[0, :4].tolist() == [10, 1500, 2500, 4000]


def test_queries_of_several_crops_search_with_every_crop(tmp_path):
    rng = np.random.default_rng(1)
    database = rng.standard_normal((400, 8)).astype(np.float32)
    queries = rng.standard_normal((7, 5, 8)).astype(np.float32)
    expected = search.exact_search(database, queries.reshape(-1, 8), 6)
    result = search.search_descriptors(stored(tmp_path, database, 100, name="db"),
                                       stored(tmp_path, queries, 3, name="q"), 6, settings(max_ram_gb=1.0))
    np.testing.assert_array_equal(result.predictions, expected[1])
    np.testing.assert_array_equal(result.distances, expected[0])
    flat = search.FlatVectors(stored(tmp_path, queries, 3, name="q2"))
    np.testing.assert_array_equal(flat[6:23], queries.reshape(-1, 8)[6:23])  # slices across rows and shards


def test_float16_descriptors_are_searched_in_float32(tmp_path):
    rng = np.random.default_rng(2)
    database = rng.standard_normal((500, 16)).astype(np.float32)
    queries = rng.standard_normal((9, 16)).astype(np.float32)
    database_shards = stored(tmp_path, database, 128, "float16", name="db")
    assert database_shards.shard(0).dtype == np.float16
    result = search.search_descriptors(database_shards, stored(tmp_path, queries, 4, "float16", name="q"), 5,
                                       settings(max_ram_gb=1.0))
    rounded = [a.astype(np.float16).astype(np.float32) for a in (database, queries)]
    expected = search.exact_search(*rounded, 5)
    np.testing.assert_array_equal(result.predictions, expected[1])
    np.testing.assert_array_equal(result.distances, expected[0])


def test_streaming_search_reads_queries_a_chunk_at_a_time(tmp_path):
    rng = np.random.default_rng(3)
    database = rng.standard_normal((3000, 16)).astype(np.float32)
    queries = np.lib.format.open_memmap(str(tmp_path / "q.npy"), mode="w+", dtype=np.float16, shape=(101, 16))
    queries[:] = rng.standard_normal((101, 16))
    expected = search.exact_search(database, np.asarray(queries, dtype=np.float32), 12)
    streaming = search.StreamingExactSearch(queries, 12, 1024, query_chunk_size=17)
    assert streaming.query_cache is None
    for start in range(0, 3000, 500):
        streaming.add(database[start:start + 500])
    distances, predictions = streaming.result()
    np.testing.assert_array_equal(predictions, expected[1])
    np.testing.assert_array_equal(distances, expected[0])


def test_memory_of_the_stored_search_does_not_grow_with_the_database(tmp_path):
    """NumPy's allocations while searching stored descriptors, with a 96 MiB budget (32 MiB for descriptors
    after the fixed overhead): bounded by the budget, not by the database (48 MiB, then 96 MiB)."""
    dim = 256
    queries = stored(tmp_path, np.random.default_rng(1).standard_normal((50, dim)).astype(np.float32), 50,
                     name="q")
    budget_gb = 96 / 1024

    def peak_bytes(database_num):
        rng = np.random.default_rng(2)
        database = stored(tmp_path, rng.standard_normal((database_num, dim)).astype(np.float32), 8192,
                          name=f"db{database_num}")
        tracemalloc.start()
        search.search_descriptors(database, queries, 10, settings(max_ram_gb=budget_gb))
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return peak

    small, large = peak_bytes(49_152), peak_bytes(98_304)
    assert large <= search.budget_bytes(budget_gb) - search.FIXED_OVERHEAD_BYTES
    assert large < 98_304 * dim * 4 / 2
    assert large < small * 1.2
