"""The speed-ups change nothing that a model sees or computes: the same tensors (bit for bit) as the original's
image pipeline, the same descriptors and predictions with worker processes or without, the same
retrieval with several processes as with one, and scripts that leave at once still finish their work."""
import glob
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image

import commons
import datasets_ws
import extraction
import mining
import network
import parser as vg_parser
import recipes.triplets as triplets_recipe
import test as vg_test
import test_methods

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REALDATA = os.path.join(os.path.dirname(__file__), "data", "realdata")
# The original benchmark's transform of every image before any resizing
ORIGINAL_BASE_TRANSFORM = T.Compose([T.ToTensor(), T.Normalize(mean=[0.485, 0.456, 0.406],
                                                               std=[0.229, 0.224, 0.225])])


def real_images(per_dataset=4):
    """A few JPEGs of each real dataset: 160x120, 640x360, 960x540 and 1024x768 pictures."""
    paths = []
    for dataset in sorted(os.listdir(REALDATA)):
        found = sorted(glob.glob(os.path.join(REALDATA, dataset, "images", "test", "*", "*.jpg")))
        paths += found[:per_dataset // 2] + found[-(per_dataset // 2):]
    return paths


@pytest.fixture(scope="module")
def synthetic_images(tmp_path_factory):
    """JPEGs of the synthetic street world at two sizes, and PNGs of other modes (greyscale, RGBA, palette)."""
    import make_synthetic_dataset
    folder = str(tmp_path_factory.mktemp("synthetic"))
    paths = []
    for size in ((48, 64), (75, 101)):
        name = f"synthetic_{size[0]}x{size[1]}"
        make_synthetic_dataset.generate_dataset(folder, name, image_size=size, train_database_num=1,
                                                train_queries_num=1, train_far_queries_num=0, val_database_num=1,
                                                val_queries_num=1, test_database_num=2, test_queries_num=1)
        paths += sorted(glob.glob(os.path.join(folder, name, "images", "*", "*", "*.jpg")))
    rng = np.random.default_rng(0)
    for mode in ("L", "RGBA", "P"):
        path = os.path.join(folder, f"picture_{mode}.png")
        Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)).convert(mode).save(path)
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------------------------- image tensors

def test_normalised_tensor_is_the_original_transform_bit_for_bit(synthetic_images):
    paths = real_images() + synthetic_images
    assert len({Image.open(path).size for path in paths}) >= 6
    for path in paths:
        image = datasets_ws.open_image(path)
        expected = ORIGINAL_BASE_TRANSFORM(image)
        got = datasets_ws.load_image_tensor(path)
        assert got.dtype == expected.dtype and got.shape == expected.shape and got.is_contiguous()
        assert torch.equal(got, expected), path


@pytest.mark.parametrize("test_method", list(test_methods.TEST_METHODS))
def test_dataset_items_are_the_original_pipeline_bit_for_bit(test_method, synthetic_images):
    """PIL -> RGB -> ToTensor -> Normalize -> tensor resize (or the method's crops), as the original's
    test datasets, for every test method's query transform and the database's hard resize."""
    resize = [24, 40]
    transform = test_methods.get_test_method(test_method).query_transform
    paths = real_images(2) + synthetic_images[:3]
    dataset = datasets_ws.ImagesDataset(paths, transform, resize)
    for index, path in enumerate(paths):
        original = ORIGINAL_BASE_TRANSFORM(Image.open(path).convert("RGB"))
        if test_method in ("hard_resize",):
            expected = TF.resize(original, resize, antialias=True)
        elif test_method == "single_query":
            expected = TF.resize(original, min(resize), antialias=True)
        elif test_method == "central_crop":
            scale = max(resize[0] / original.shape[1], resize[1] / original.shape[2])
            expected = TF.center_crop(torch.nn.functional.interpolate(original.unsqueeze(0), scale_factor=scale)
                                      .squeeze(0), resize)
        else:
            expected = torch.stack(TF.five_crop(TF.resize(original, min(resize), antialias=True), [min(resize)] * 2))
        got, got_index = dataset[index]
        assert got_index == index and torch.equal(got, expected), (test_method, path)


def test_training_database_transform_is_the_original_bit_for_bit(synthetic_images):
    resize = [30, 44]
    original = T.Compose([T.Resize(resize), ORIGINAL_BASE_TRANSFORM])
    ours = datasets_ws.database_training_transform(resize)
    for path in real_images(2) + synthetic_images:
        image = datasets_ws.open_image(path)
        assert torch.equal(ours(image), original(image)), path


# ---------------------------------------------------------------------------------------------- loaders

def small_model():
    commons.make_deterministic(0)
    args = vg_parser.parse_arguments(["--datasets_folder", REALDATA, "--dataset_name", "gardenspoint_mini",
                                      "--backbone", "resnet18conv4", "--aggregation", "gem", "--pretrain", "none",
                                      "--resize", "32", "48", "--device", "cpu"])
    return network.build_model(args).eval()


def retrieval_args(num_workers, **overrides):
    values = dict(device="cpu", infer_batch_size=3, num_workers=num_workers, resize=[32, 48],
                  recall_values=[1, 5], majority_weight=0.01, efficient_ram_testing=False)
    values.update(overrides)
    return SimpleNamespace(**values)


def gardens_paths():
    folder = os.path.join(REALDATA, "gardenspoint_mini", "images", "test")
    return [sorted(glob.glob(os.path.join(folder, kind, "*.jpg"))) for kind in ("database", "queries")]


@pytest.mark.parametrize("test_method", ["hard_resize", "nearest_crop"])
def test_worker_processes_give_the_same_descriptors_and_predictions(test_method):
    database_paths, queries_paths = gardens_paths()
    model = small_model()
    seen = {}

    def keep(workers):
        def observe(kind, indices, descriptors):
            seen.setdefault((workers, kind), {}).update(zip(indices.tolist(), descriptors.copy()))
        return observe
    without = vg_test.retrieve(retrieval_args(0), database_paths, queries_paths, model, test_method,
                               on_descriptors=keep(0))
    with_workers = vg_test.retrieve(retrieval_args(2), database_paths, queries_paths, model, test_method,
                                    on_descriptors=keep(2))
    np.testing.assert_array_equal(with_workers.searched_predictions, without.searched_predictions)
    np.testing.assert_array_equal(with_workers.searched_distances, without.searched_distances)
    for kind in ("database", "queries"):
        assert seen[(0, kind)].keys() == seen[(2, kind)].keys()
        for index, descriptor in seen[(0, kind)].items():
            np.testing.assert_array_equal(seen[(2, kind)][index], descriptor)


def test_loaders_pin_memory_on_cuda_only():
    images = datasets_ws.ImagesDataset([])
    cpu = datasets_ws.make_loader(images, 2, 1, "cpu")
    assert (cpu.num_workers, cpu.pin_memory, cpu.batch_size) == (1, False, 2)
    cuda = datasets_ws.make_loader(images, 2, 4, torch.device("cuda", 0))
    assert (cuda.num_workers, cuda.pin_memory) == (4, True)


@pytest.mark.parametrize("device, cpus, expected", [("cpu", 1, 0), ("cpu", 2, 0), ("cpu", 4, 1), ("cpu", 8, 2),
                                                    ("cpu", 64, 8),
                                                    ("cuda", 2, 2), ("cuda", 16, 8)])
def test_default_num_workers_from_the_device_and_cores(device, cpus, expected):
    assert vg_parser.default_num_workers(device, cpus) == expected


# ---------------------------------------------------------------------------------------------- processes

def _sharded_retrieval(rank, world_size, init_file, output_folder, test_method):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        world = commons.DistributedContext(rank, world_size, rank, torch.device("cpu"))
        database_paths, queries_paths = gardens_paths()
        retrieval = vg_test.retrieve(retrieval_args(0), database_paths, queries_paths, small_model(), test_method,
                                     world=world)
        np.savez(os.path.join(output_folder, f"{rank}.npz"), predictions=retrieval.searched_predictions,
                 distances=retrieval.searched_distances, top=retrieval.top(5)[0])
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("test_method", ["hard_resize", "five_crops", "maj_voting"])
def test_several_processes_retrieve_as_one(tmp_path, test_method):
    """Three processes (the last with fewer images) describe their shares; each gets the one-process result."""
    world_size = 3
    # Spawned, not forked: a child forked after faiss' OpenMP threads ran in this process (the search benchmark's
    # test) hangs in its first parallel region
    mp.start_processes(_sharded_retrieval, args=(world_size, str(tmp_path / "init"), str(tmp_path), test_method),
                       nprocs=world_size, start_method="spawn")
    database_paths, queries_paths = gardens_paths()
    # One thread as the processes use: the convolutions' sums may be split otherwise with more (last-bit changes)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        expected = vg_test.retrieve(retrieval_args(0), database_paths, queries_paths, small_model(), test_method)
    finally:
        torch.set_num_threads(threads)
    for rank in range(world_size):
        got = np.load(tmp_path / f"{rank}.npz")
        np.testing.assert_array_equal(got["predictions"], expected.searched_predictions)
        np.testing.assert_array_equal(got["distances"], expected.searched_distances)
        np.testing.assert_array_equal(got["top"], expected.top(5)[0])


def test_one_process_world_is_the_plain_retrieval():
    database_paths, queries_paths = gardens_paths()
    model = small_model()
    world = commons.DistributedContext(0, 1, 0, torch.device("cpu"))
    np.testing.assert_array_equal(extraction.gather_descriptors(model, database_paths, datasets_ws.hard_resize,
                                                                [32, 48], 4, 0, world),
                                  extraction.collect_descriptors(extraction.descriptor_batches(
                                      model, extraction.images_loader(database_paths, datasets_ws.hard_resize, [32, 48],
                                                                 4, 0, "cpu"), "cpu"), len(database_paths)))


def test_exit_now_runs_the_exit_handlers_and_keeps_the_status(tmp_path):
    script = ("import atexit, logging, sys; sys.path.insert(0, sys.argv[1]); import commons\n"
              "logging.basicConfig(filename=sys.argv[2], level=logging.INFO)\n"
              "atexit.register(lambda: open(sys.argv[3], 'w').write('handler ran'))\n"
              "logging.info('logged before leaving'); print('printed before leaving', end='')\n"
              "commons.exit_now(3)\n")
    log, marker = tmp_path / "run.log", tmp_path / "marker"
    result = subprocess.run([sys.executable, "-c", script, REPO, str(log), str(marker)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 3
    assert result.stdout == "printed before leaving"
    assert marker.read_text() == "handler ran"
    assert "logged before leaving" in log.read_text()


# ---------------------------------------------------------------------------------------------- training timings

def test_refresh_reports_its_timings_and_images():
    rng = np.random.default_rng(0)
    database_num, queries_num, dim = 30, 6, 4
    dataset = SimpleNamespace(
        database_num=database_num, queries_num=queries_num,
        hard_positives_per_query=[np.array([q]) for q in range(queries_num)],
        soft_positives_per_query=[np.array([q, q + 1]) for q in range(queries_num)])
    features = rng.standard_normal((database_num + queries_num, dim)).astype(np.float32)
    miner = mining.make_miner("partial", dataset, 2, 10)
    asked = []

    def extractor(model, indexes, features_dim):
        asked.append(np.asarray(indexes))
        return features[indexes]
    world = commons.DistributedContext(0, 1, 0, torch.device("cpu"))
    timings = {}
    np.random.seed(0)
    triplets = triplets_recipe.refresh_triplets(miner, extractor, SimpleNamespace(features_dim=dim), 4,
                                                database_num + queries_num, world, timings)
    assert triplets.shape == (4, 4)
    assert timings["cached_images"] == len(asked[0])
    assert timings["cache_seconds"] >= 0 and timings["mining_seconds"] >= 0
    np.random.seed(0)
    assert np.array_equal(triplets_recipe.refresh_triplets(miner, extractor, SimpleNamespace(features_dim=dim), 4,
                                                           database_num + queries_num, world), triplets)


# ---------------------------------------------------------------------------------------------- positives

def coordinates(kind, rng, database_num, queries_num):
    if kind == "utm":  # two decimals, along a street, as datasets_vg file names
        base = np.array([500000.0, 4100000.0])
        return (np.round(base + np.stack([rng.uniform(0, 400, database_num), rng.uniform(-5, 5, database_num)], 1), 2),
                np.round(base + np.stack([rng.uniform(-30, 430, queries_num), rng.uniform(-20, 20, queries_num)], 1),
                         2))
    if kind == "grid":  # integer metres: many distances exactly on the radius (3-4-5 triangles)
        return (rng.integers(0, 40, (database_num, 2)).astype(float) * 5,
                rng.integers(0, 40, (queries_num, 2)).astype(float) * 5)
    database = np.stack([np.full(database_num, 7.5), rng.uniform(0, 300, database_num)], 1)  # a north-south street
    return database, np.concatenate([database[:queries_num // 2], rng.uniform(0, 300, (queries_num - queries_num // 2,
                                                                                      2))])


@pytest.mark.parametrize("kind", ["utm", "grid", "street"])
def test_positives_are_scikit_learn_s_without_importing_it(kind):
    rng = np.random.default_rng(0)
    exact_searches = 0
    for database_num, queries_num in ((5, 7), (11, 3), (12, 9), (150, 40), (400, 60)):
        database_utms, queries_utms = coordinates(kind, rng, database_num, queries_num)
        for radius in (0, 7.5, 10, 25, 100):
            got = datasets_ws.find_positives(database_utms, queries_utms, radius)
            expected = datasets_ws.sklearn_positives(database_utms, queries_utms, radius)
            assert len(got) == queries_num
            for found, wanted in zip(got, expected):
                assert found.dtype == np.int64
                np.testing.assert_array_equal(found, wanted)
            exact_searches += datasets_ws.radius_search(database_utms, queries_utms, float(radius)) is not None
    assert exact_searches > 0  # not everything fell back to scikit-learn


def test_positives_on_the_radius_go_to_scikit_learn():
    database_utms = np.stack([np.arange(20) * 5.0, np.zeros(20)], 1)
    queries_utms = np.array([[3.0, 4.0]])  # 5 m from the first image, sqrt(20) m from the second
    assert datasets_ws.radius_search(database_utms, queries_utms, 5.0) is None
    np.testing.assert_array_equal(datasets_ws.find_positives(database_utms, queries_utms, 5.0)[0], [0, 1])
    np.testing.assert_array_equal(datasets_ws.radius_search(database_utms, queries_utms, 4.5)[0], [1])


def test_the_scripts_start_without_scikit_learn():
    code = "import sys; sys.path.insert(0, sys.argv[1]); import eval, train; print('sklearn' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code, REPO], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "False", result.stderr[-2000:]


# ---------------------------------------------------------------------------------------------- the benchmark

def test_speed_benchmark_runs_and_writes_its_table(tmp_path):
    """The floor, layers and mining parts of benchmarks/benchmark_speed.py at --quick sizes (the evaluation
    and training parts run whole scripts: the tests of eval.py and train.py cover those)."""
    output = tmp_path / "speed.json"
    result = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "benchmark_speed.py"), "--quick",
                             "--device", "cpu", "--skip", "evaluation", "training", "--work_folder",
                             str(tmp_path / "work"), "--output", str(output)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads(output.read_text())
    parts = [row["part"] for row in report["rows"]]
    assert parts.count("floor") == 3 and parts.count("layers") == 2 and parts.count("mining") == 4
    for row in report["rows"]:
        if "speedup" in row:  # target ">= 10x": met when the speed-up reaches it
            assert row["met"] == ("yes" if row["speedup"] >= float(row["target"][3:-1]) else "no"), row
    assert report["table"] in result.stdout and report["machine"]["device"] == "cpu"


# ---------------------------------------------------------------------------------------------- mining

def test_blocked_pairwise_distances_are_faiss_exact_search_distances():
    """Several blocks of candidate columns (and padding): each distance is what an exact faiss search of the
    query among its candidates gives, as the original's one index per query."""
    import faiss
    rng = np.random.default_rng(0)
    features = rng.standard_normal((500, 24)).astype(np.float32)
    columns = 2 * mining.CANDIDATES_PER_BLOCK + 7
    candidate_rows = np.stack([np.sort(rng.choice(400, columns, replace=False)) for _ in range(9)])
    candidate_rows[3, -10:] = -1  # padding of a query with fewer candidates
    query_rows = np.arange(400, 409)
    distances = mining.pairwise_distances(features, query_rows, candidate_rows)
    for query, rows, got in zip(query_rows, candidate_rows, distances):
        valid = rows >= 0
        index = faiss.IndexFlatL2(features.shape[1])
        index.add(features[rows[valid]])
        expected, order = index.search(features[query:query + 1], int(valid.sum()))
        np.testing.assert_array_equal(got[valid][order[0]], expected[0])
