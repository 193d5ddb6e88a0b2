"""Descriptors on disk: streamed (sharded) extraction equals the in-memory extraction bit for bit for every kind
of query processing, an interrupted extraction resumes to the same arrays extracting only what was missing, a
folder made by another model or dataset is refused, float16 storage, memory that does not grow with the number
of images, retrieval through the store equal to the in-memory retrieval, and the saved PCA."""
import json
import os
import tracemalloc
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import descriptor_store
import extraction
import search
import test as vg_test
import test_methods
from commons import UserInputError

RESIZE = [16, 20]
plan_exact_search = search.plan_exact_search
BATCH = 4


class TinyNet(torch.nn.Module):
    """A small convolutional model with a descriptor size of its own, as the project's models report it."""

    def __init__(self, features_dim=24, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.features_dim = features_dim
        self.conv = torch.nn.Conv2d(3, features_dim, 3)

    def forward(self, images):
        return torch.nn.functional.normalize(self.conv(images).mean(dim=(2, 3)), dim=1)


def make_args(**overrides):
    args = dict(device="cpu", infer_batch_size=BATCH, num_workers=0, resize=RESIZE, recall_values=[1, 5, 10],
                majority_weight=0.01, efficient_ram_testing=False)
    args.update(overrides)
    return SimpleNamespace(**args)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """37 database images (not a whole number of shards or batches) and 6 queries of different sizes."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    database, queries = [], []
    for i in range(37):
        path = folder / f"db_{i:03d}.png"
        Image.fromarray(rng.integers(0, 256, (18, 22, 3), dtype=np.uint8)).save(path)
        database.append(str(path))
    for i, (height, width) in enumerate([(18, 22), (20, 30), (16, 16), (24, 18), (18, 40), (30, 30)]):
        path = folder / f"query_{i}.png"
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
        queries.append(str(path))
    return database, queries


def in_memory(model, paths, method, batch_size=BATCH, pca=None):
    loader = extraction.images_loader(paths, method.query_transform, RESIZE, batch_size, 0, "cpu")
    batches = extraction.descriptor_batches(model, loader, "cpu", method.mean_of_crops, pca)
    return extraction.collect_descriptors(batches, len(paths))


def stream(model, paths, folder, method, shard_rows=8, dtype="float32", fingerprint=None, on_descriptors=None,
           batch_size=BATCH, pca=None):
    fingerprint = fingerprint or {"model_sha256": extraction.model_fingerprint(model)}
    return extraction.store_descriptors(model, paths, str(folder), fingerprint, method.query_transform, RESIZE,
                                        batch_size, 0, "cpu", method.mean_of_crops, pca, dtype, shard_rows=shard_rows,
                                     on_descriptors=on_descriptors, description="test")


@pytest.mark.parametrize("test_method", ["hard_resize", "single_query", "central_crop", "five_crops",
                                         "nearest_crop"])
def test_streamed_extraction_equals_in_memory_extraction_bit_for_bit(images, tmp_path, test_method):
    database, queries = images
    model = TinyNet().eval()
    method = test_methods.get_test_method(test_method)
    paths = database if test_method == "hard_resize" else queries
    batch_size = 1 if method.one_query_per_batch else BATCH
    expected = in_memory(model, paths, method, batch_size)
    shards = stream(model, paths, tmp_path, method, shard_rows=2 * batch_size, batch_size=batch_size)
    assert shards.shards_num == -(-len(paths) // (2 * batch_size)) and shards.is_complete
    stored = shards.read_all()
    assert stored.dtype == np.float32 and stored.shape == expected.shape
    np.testing.assert_array_equal(stored, expected)
    if test_method == "nearest_crop":
        assert stored.shape[1:] == (5, model.features_dim)  # every crop kept, for the per-crop search


def test_an_interrupted_extraction_resumes_where_it_stopped_and_equals_an_uninterrupted_one(images, tmp_path):
    database, _ = images
    model = TinyNet().eval()
    method = test_methods.get_test_method("hard_resize")
    uninterrupted = stream(model, database, tmp_path / "once", method).read_all()

    batches_seen = []

    def crash_in_the_second_shard(indices, descriptors):
        batches_seen.append(indices)
        if len(batches_seen) == 3:  # shard 0 (batches 0, 1) is written, shard 1 is half done
            raise KeyboardInterrupt
    folder = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        stream(model, database, folder, method, on_descriptors=crash_in_the_second_shard)
    assert sorted(os.listdir(folder)) == ["manifest.json", "shard_00000.npy"]
    with open(folder / "manifest.json") as file:
        assert json.load(file)["complete"] is False
    # A shard being written when the process died: only its temporary file exists, never a shard file
    (folder / ("shard_00002.npy" + descriptor_store.TEMPORARY_SUFFIX)).write_bytes(b"half a shard")

    described = []
    hook = model.register_forward_hook(lambda module, inputs, output: described.append(len(inputs[0])))
    seen_rows = []
    shards = stream(model, database, folder, method, on_descriptors=lambda indices, d: seen_rows.extend(indices))
    hook.remove()
    assert sum(described) == len(database) - 8  # only the missing shards went through the model
    assert sorted(seen_rows) == list(range(len(database)))  # ... but every row was handed on, read back or new
    np.testing.assert_array_equal(shards.read_all(), uninterrupted)
    assert not [name for name in os.listdir(folder) if name.endswith(descriptor_store.TEMPORARY_SUFFIX)]
    with open(folder / "manifest.json") as file:
        manifest = json.load(file)
    assert manifest["complete"] is True and manifest["row_shape"] == [model.features_dim]

    # Complete: nothing is extracted again
    described.clear()
    hook = model.register_forward_hook(lambda module, inputs, output: described.append(len(inputs[0])))
    np.testing.assert_array_equal(stream(model, database, folder, method).read_all(), uninterrupted)
    hook.remove()
    assert described == []


def test_a_folder_made_by_another_model_or_dataset_is_refused(images, tmp_path):
    database, queries = images
    method = test_methods.get_test_method("hard_resize")
    model = TinyNet()

    def fingerprint(model, paths):
        return {"model_sha256": extraction.model_fingerprint(model),
                "paths_sha256": descriptor_store.sha256_of_strings(paths)}
    stream(model, database, tmp_path, method, fingerprint=fingerprint(model, database))
    other_model = TinyNet(seed=1)
    with pytest.raises(UserInputError, match=r"made by another model, dataset or setting \(model_sha256 differ\)"
                                             r".*Pass another --descriptors_folder, or delete this one"):
        stream(other_model, database, tmp_path, method, fingerprint=fingerprint(other_model, database))
    with pytest.raises(UserInputError, match=r"\(paths_sha256, rows differ\)"):
        stream(model, database[:-1], tmp_path, method, fingerprint=fingerprint(model, database[:-1]))
    with pytest.raises(UserInputError, match=r"\(dtype differ\)"):
        stream(model, database, tmp_path, method, dtype="float16", fingerprint=fingerprint(model, database))


def test_the_model_fingerprint_sees_weights_and_structure():
    model = TinyNet()
    same = TinyNet()
    assert extraction.model_fingerprint(model) == extraction.model_fingerprint(same)
    with torch.no_grad():
        same.conv.bias[0] += 1e-7
    assert extraction.model_fingerprint(model) != extraction.model_fingerprint(same)
    # Same weights, another layer around them (as --l2 before_pool / after_pool do)
    wrapped = torch.nn.Sequential(torch.nn.Identity(), model)
    assert extraction.model_fingerprint(wrapped) != extraction.model_fingerprint(torch.nn.Sequential(model))


def test_float16_storage(images, tmp_path):
    database, _ = images
    model = TinyNet().eval()
    method = test_methods.get_test_method("hard_resize")
    shards = stream(model, database, tmp_path, method, dtype="float16")
    assert shards.shard(0).dtype == np.float16
    assert os.path.getsize(shards.shard_path(0)) < 8 * model.features_dim * 2 + 200
    np.testing.assert_array_equal(shards.read_all(),
                                  in_memory(model, database, method).astype(np.float16).astype(np.float32))


def test_reading_across_shards(tmp_path):
    array = np.arange(23 * 3, dtype=np.float32).reshape(23, 3)
    shards = descriptor_store.open_shards(str(tmp_path), {}, 23, 5, "float32")
    for shard in range(shards.shards_num):
        shards.write_shard(shard, array[slice(*shards.shard_range(shard))])
    np.testing.assert_array_equal(shards.read(3, 17), array[3:17])
    np.testing.assert_array_equal(shards.read(20, 20), array[20:20])
    np.testing.assert_array_equal(shards.take([0, 4, 5, 19, 22]), array[[0, 4, 5, 19, 22]])
    blocks = list(shards.blocks(7, 2, 23))
    assert [start for start, _ in blocks] == [2, 9, 16]
    np.testing.assert_array_equal(np.concatenate([block for _, block in blocks]), array[2:])
    with pytest.raises(ValueError, match="Shard 1 holds rows"):
        shards.write_shard(1, array[:4])


def test_extraction_memory_does_not_grow_with_the_number_of_images(images, tmp_path):
    """NumPy's allocations during a sharded extraction hold one shard, not every descriptor (a descriptor
    of 4096 floats, so that the descriptors dominate)."""
    database, _ = images
    model = TinyNet(features_dim=4096).eval()
    method = test_methods.get_test_method("hard_resize")

    def peak_bytes(paths, folder):
        tracemalloc.start()
        stream(model, paths, folder, method, shard_rows=4)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return peak

    few, many = peak_bytes(database[:8], tmp_path / "few"), peak_bytes(database * 3, tmp_path / "many")
    all_descriptors = len(database) * 3 * 4096 * 4  # 1.8 MB, what the in-memory extraction holds
    assert many < all_descriptors / 4
    assert many < few * 1.5


@pytest.mark.parametrize("test_method", list(test_methods.TEST_METHODS))
def test_retrieval_through_the_store_equals_the_in_memory_retrieval(images, tmp_path, test_method, monkeypatch):
    """--descriptors_folder with a tiny --max_ram_gb (database and queries searched in blocks of a few rows):
    the same searched predictions and distances, bit for bit; a second run reuses every descriptor."""
    database, queries = images
    model = TinyNet().eval()
    method = test_methods.get_test_method(test_method)
    expected = vg_test.retrieve(make_args(), database, queries, model, test_method)
    # The fixed overhead, the results of every query vector (crops included), and 1500 bytes: 15 vectors
    vectors = len(queries) * extraction.vectors_per_image(method.query_transform, RESIZE, method.mean_of_crops)
    budget = (search.FIXED_OVERHEAD_BYTES + 3 * vectors * 10 * 12 + 1500) / search.GIB
    plans = []

    def recorded_plan(*args):
        plans.append(plan_exact_search(*args))
        return plans[-1]
    monkeypatch.setattr(search, "plan_exact_search", recorded_plan)
    got = vg_test.retrieve(make_args(max_ram_gb=budget), database, queries, model, test_method,
                           descriptors_folder=str(tmp_path))
    assert plans == [(6, 3)]  # blocks of 6 database rows, chunks of 3 query vectors
    np.testing.assert_array_equal(got.searched_predictions, expected.searched_predictions)
    np.testing.assert_array_equal(got.searched_distances, expected.searched_distances)
    for got_top, expected_top in zip(got.top(), expected.top()):
        np.testing.assert_array_equal(got_top, expected_top)
    assert sorted(os.listdir(tmp_path)) == ["database", f"queries_{test_method}"]

    described = []
    hook = model.register_forward_hook(lambda module, inputs, output: described.append(len(inputs[0])))
    again = vg_test.retrieve(make_args(), database, queries, model, test_method, descriptors_folder=str(tmp_path))
    hook.remove()
    assert described == []
    np.testing.assert_array_equal(again.searched_predictions, expected.searched_predictions)


def test_large_scale_flags_alone_use_a_temporary_store(images):
    database, queries = images
    model = TinyNet().eval()
    expected = vg_test.retrieve(make_args(), database, queries, model)
    got = vg_test.retrieve(make_args(faiss_index="hnsw", hnsw_ef_search=64, descriptors_dtype="float16"), database,
                           queries, model)
    # float16 descriptors, an approximate index: the same neighbours on so small a database
    np.testing.assert_array_equal(got.searched_predictions, expected.searched_predictions)
    np.testing.assert_allclose(got.searched_distances, expected.searched_distances, atol=2e-3)


def test_saved_pca_transforms_as_the_fitted_one(tmp_path):
    from sklearn.decomposition import PCA
    rng = np.random.default_rng(0)
    data = rng.standard_normal((200, 12)) @ rng.standard_normal((12, 12))
    descriptors = rng.standard_normal((30, 12)).astype(np.float32)
    for whiten in (False, True):
        pca = PCA(n_components=5).fit(data).set_params(whiten=whiten)
        path = str(tmp_path / f"pca_{whiten}.npz")
        descriptor_store.save_pca(path, pca, {"model_sha256": "abc", "whiten": whiten})
        loaded = descriptor_store.load_pca(path, {"model_sha256": "abc", "whiten": whiten})
        np.testing.assert_array_equal(loaded.transform(descriptors), pca.transform(descriptors))
    whitened = loaded.transform(data.astype(np.float32))
    np.testing.assert_allclose(whitened.std(axis=0, ddof=1), 1, rtol=1e-4)  # unit variance per component
    assert descriptor_store.pca_fingerprint(loaded) != descriptor_store.pca_fingerprint(pca.set_params(whiten=False))
    with pytest.raises(UserInputError, match=r"a PCA fit with another model or setting \(model_sha256 differ\)"):
        descriptor_store.load_pca(path, {"model_sha256": "other", "whiten": True})


def test_database_descriptors_are_shared_by_test_methods_and_queries_are_not(images, tmp_path):
    database, queries = images
    model = TinyNet().eval()
    extraction.extract_descriptors(make_args(), database, queries, model, "hard_resize",
                                   descriptors_folder=str(tmp_path))
    database_shard = os.path.join(tmp_path, extraction.DATABASE_FOLDER, "shard_00000.npy")
    written = os.stat(database_shard).st_mtime_ns
    _, five_crops = extraction.extract_descriptors(make_args(), database, queries, model, "five_crops",
                                                   descriptors_folder=str(tmp_path))
    assert os.stat(database_shard).st_mtime_ns == written
    np.testing.assert_array_equal(five_crops.read_all(),
                                  in_memory(model, queries, test_methods.get_test_method("five_crops")))
