"""Each training recipe learns: from random weights (--pretrain none), on the demo-sized synthetic dataset whose test
split is another street than the training one, the test R@1 rises.

The trainings run two at a time, each on one thread, so that their figures do not depend on the machine's cores
and the two cores stay busy."""
import concurrent.futures
import json
import os
import subprocess
import sys
import time

import pytest

import commons
import datasets_ws
import make_synthetic_dataset
import network
import parser as vg_parser
import test

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The dataset of tests/test_train.py's transfer test (the demo's sizes, rendered at 96x128)
UNSEEN = "train_tests_unseen_street"
COMMON_FLAGS = ["--dataset_name", UNSEEN, "--pretrain", "none", "--resize", "96", "128", "--device", "cpu",
                "--num_workers", "0", "--backbone", "resnet18conv4", "--lr", "0.001"]
# name: (flags, the gain of test R@1 asserted), the longest first (the trainings run two at a time)
RUNS = {
    # The demo's training (demo.sh) with GeM: 1,200 triplets. Measured on all the cores: 41 -> 74 in about two
    # minutes (on the demo's dataset, rendered at 240x320: 46 -> 76, 45 -> 73 and 49 -> 67 with seeds 0, 1 and 2)
    "triplets_gem": (["--recipe", "triplets", "--aggregation", "gem", "--mining", "partial", "--epochs_num", "12",
                      "--patience", "4", "--queries_per_epoch", "100", "--cache_refresh_rate", "100",
                      "--neg_samples_num", "200", "--negs_num_per_query", "4", "--train_batch_size", "4"], 15),
    # 15 epochs of 19 batches of 8 places x 4 images. Measured: 41 -> 59 in about three minutes; with --seed 1,
    # 45 -> 55 (and 45 -> 55 with 16 places per batch and 20 epochs)
    "places_gem": (["--recipe", "places", "--aggregation", "gem", "--epochs_num", "15", "--patience", "15",
                    "--places_per_batch", "8"], 15),
    # MixVPR with its default flags (1024 channels x 4 rows, depth 4: a 6 x 8 map at 96 x 128), 10 epochs of 8
    # places x 4 images. It fits the training street within a few epochs (loss 1.4 -> 0.15) and transfers less than
    # GeM. Measured: 39 -> 53 in about two and a half minutes; 39 -> 50 with 16 places per batch and 15 epochs,
    # 39 -> 48 with 8 places and --lr 0.0003
    "places_mixvpr": (["--recipe", "places", "--aggregation", "mixvpr", "--epochs_num", "10", "--patience", "10",
                       "--places_per_batch", "8"], 10),
    # 20 m cells (10 m cells hold 3 images on this street), 4 groups of 26 to 31 classes (every other cell, both
    # heading bins in a group), trained in turn with 10 batches of 32 per epoch; a mild colour jitter (CosPlace's
    # hue 0.5 stops the learning here: recipes/cosplace.py). Measured: 41 -> 72 in about three minutes
    "cosplace_gem": (["--recipe", "cosplace", "--aggregation", "gem", "--epochs_num", "20", "--patience", "20",
                      "--cosplace_cell_m", "20", "--cosplace_min_images", "5", "--cosplace_group_cells", "2",
                      "--cosplace_group_bins", "1", "--cosplace_batch_size", "32", "--cosplace_iterations_per_epoch",
                      "10", "--cosplace_color_jitter", "0.2", "0.2", "0.2", "0", "--cosplace_crop_scale", "0.7"], 15),
}


@pytest.fixture(scope="module")
def unseen_folder(request, tmp_path_factory):
    cache = getattr(request.config, "cache", None)
    folder = str(cache.mkdir("synthetic_datasets")) if cache is not None else str(tmp_path_factory.mktemp("data"))
    make_synthetic_dataset.generate_dataset(folder, UNSEEN, seed=0, image_size=(96, 128), processes=2)
    return folder


def untrained_r1(datasets_folder, flags):
    """Test R@1 of the model train.py starts from."""
    args = vg_parser.parse_arguments(["--datasets_folder", datasets_folder, *COMMON_FLAGS, *flags])
    commons.make_deterministic(args.seed)  # the same initial weights as train.py's
    test_ds = datasets_ws.GeoDataset(datasets_folder, UNSEEN, "test", args.val_positive_dist_threshold)
    return test.test(args, test_ds, network.build_model(args))[0][1]


def trained_r1(work, datasets_folder, flags, save_dir):
    """Test R@1 of the model train.py ends with (one thread), and the training's seconds."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, os.path.join(REPO, "train.py"), "--datasets_folder", datasets_folder,
                             *COMMON_FLAGS, *flags, "--save_dir", save_dir], cwd=work, capture_output=True,
                            text=True, timeout=1200, env=dict(os.environ, OMP_NUM_THREADS="1"))
    seconds = time.perf_counter() - start
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    runs = os.path.join(work, "logs", save_dir)
    (run_folder,) = [os.path.join(runs, name) for name in os.listdir(runs)]
    with open(os.path.join(run_folder, "results.json")) as file:
        return json.load(file)["recalls"]["test"]["R@1"], seconds


@pytest.fixture(scope="module")
def recalls(tmp_path_factory, unseen_folder):
    """{run: (untrained R@1, trained R@1, seconds)}: every training of RUNS, two at a time."""
    work = str(tmp_path_factory.mktemp("learning"))
    untrained = {name: untrained_r1(unseen_folder, flags) for name, (flags, _) in RUNS.items()}
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(trained_r1, work, unseen_folder, flags, name) for name, (flags, _) in RUNS.items()}
        return {name: (untrained[name], *future.result()) for name, future in futures.items()}


@pytest.mark.parametrize("name", list(RUNS))
def test_training_from_random_weights_transfers_to_a_street_it_never_saw(recalls, name):
    untrained, trained, seconds = recalls[name]
    print(f"{name}: test R@1 {untrained:.0f} -> {trained:.0f} in {seconds:.0f} s")
    assert trained >= untrained + RUNS[name][1], (untrained, trained)
