"""eval.py end to end on the real datasets of tests/data/realdata (random weights, small images): recalls in the
original's format, results.json and the RESULT line, --resume, PCA, saved predictions, pictures and descriptors,
and matching folders without coordinates."""
import csv
import json
import os
import re
import shutil
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import datasets_ws
import eval as vg_eval
import metrics
import network
import results
import test as vg_test
from commons import UserInputError

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REALDATA = os.path.join(REPO, "tests", "data", "realdata")
REAL_DATASETS = ["vprbench_corridor", "opensfm_lund", "gardenspoint_mini"]
MODEL_FLAGS = ["--pretrain", "none", "--resize", "64", "80", "--backbone", "resnet18conv4", "--aggregation", "gem",
               "--num_workers", "0", "--device", "cpu"]
RECALLS_LINE = re.compile(r"Recalls on < (\S+) - #database: (\d+); #queries: (\d+) >: (R@\d+: \d+\.\d(, )?)+$",
                          re.MULTILINE)


def run_eval(cwd, *flags, expect_success=True):
    completed = subprocess.run([sys.executable, os.path.join(REPO, "eval.py"), *MODEL_FLAGS, *flags], cwd=cwd,
                               capture_output=True, text=True, timeout=600)
    if not expect_success:
        return completed, None
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    result_lines = [line for line in completed.stdout.splitlines() if line.startswith(results.RESULT_LINE_PREFIX)]
    assert len(result_lines) == 1
    summary = results.parse_result_line(result_lines[0])
    with open(os.path.join(summary["run_folder"], results.RESULTS_FILENAME)) as file:
        run_results = json.load(file)
    return completed, run_results


def on_dataset(name):
    return ["--datasets_folder", REALDATA, "--dataset_name", name]


# Each dataset with another test method; maj_voting with --recall_values 1 5 10 crashed the original
REAL_DATASET_RUNS = {"vprbench_corridor": [], "opensfm_lund": ["--test_method", "single_query"],
                     "gardenspoint_mini": ["--test_method", "maj_voting", "--recall_values", "1", "5", "10"]}


@pytest.mark.parametrize("dataset_name", REAL_DATASETS)
def test_eval_on_each_real_dataset(tmp_path, dataset_name):
    flags = REAL_DATASET_RUNS[dataset_name]
    completed, run_results = run_eval(tmp_path, *on_dataset(dataset_name), *flags)
    dataset = datasets_ws.GeoDataset(REALDATA, dataset_name, "test")
    match = RECALLS_LINE.search(completed.stdout)
    assert match and match.group(1) == dataset_name
    assert (int(match.group(2)), int(match.group(3))) == (dataset.database_num, dataset.queries_num)
    recalls = run_results["recalls"]["test"]
    recall_keys = ["R@1", "R@5", "R@10"] + ([] if "--recall_values" in flags else ["R@20"])
    assert list(recalls) == recall_keys
    assert match.group(0).split(">: ")[1] == ", ".join(f"{key}: {recalls[key]:.1f}" for key in recall_keys)
    assert run_results["arguments"]["test_method"] == (flags[1] if flags else "hard_resize")
    assert run_results["datasets"]["test"]["database_num"] == dataset.database_num
    assert run_results["descriptor_size"] == 256  # resnet18 cut at conv4 + GeM
    assert run_results["flops"] > 0 and run_results["params"] > 0
    assert run_results["timings"]["extraction_seconds"] > 0 and run_results["timings"]["search_seconds"] >= 0
    assert run_results["run_folder"].startswith(str(tmp_path / "logs" / "default"))
    assert os.path.isfile(os.path.join(run_results["run_folder"], "info.log"))


def test_resume_loads_our_checkpoints_and_the_originals(tmp_path):
    """A model with other weights than the run's seed would give, saved in our format and in the original's
    (a bare state dict with DataParallel's "module." prefix): eval.py reproduces its in-process recalls."""
    torch.manual_seed(123)
    model = network.make_model("resnet18conv4", "gem", pretrain="none", resize=(64, 80))
    state_dict = model.state_dict()
    torch.save({"model_state_dict": state_dict, "epoch_num": 3}, tmp_path / "ours.pth")
    torch.save({f"module.{key}": value for key, value in state_dict.items()}, tmp_path / "original.pth")
    dataset = datasets_ws.GeoDataset(REALDATA, "gardenspoint_mini", "test")
    args = SimpleNamespace(device="cpu", infer_batch_size=16, num_workers=0, resize=[64, 80],
                           recall_values=[1, 5, 10, 20], majority_weight=0.01, efficient_ram_testing=False)
    queries_descriptors = {}
    evaluation = vg_test.evaluate(args, dataset, model.eval(), "central_crop", on_descriptors=lambda kind, i, d: (
        queries_descriptors.update(zip(i, d)) if kind == "queries" else None))
    # Ours, loaded as eval.py loads it
    loaded = network.make_model("resnet18conv4", "gem", pretrain="none", resize=(64, 80))
    vg_eval.load_resume(SimpleNamespace(resume=str(tmp_path / "ours.pth"), trust_checkpoint=False), loaded)
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, state_dict[key]), key
    # The original's, through the whole script
    _, run_results = run_eval(tmp_path, *on_dataset("gardenspoint_mini"), "--test_method", "central_crop",
                              "--resume", str(tmp_path / "original.pth"), "--save_descriptors")
    assert run_results["recalls"]["test"] == {f"R@{n}": recall for n, recall in evaluation.recalls.items()}
    np.testing.assert_allclose(np.load(os.path.join(run_results["run_folder"], "queries_descriptors.npy")),
                               np.stack([queries_descriptors[i] for i in range(dataset.queries_num)]), atol=1e-6)


def test_saved_predictions_pictures_and_descriptors_with_pca_and_low_ram(tmp_path):
    _, run_results = run_eval(tmp_path, *on_dataset("gardenspoint_mini"), "--save_predictions", "3",
                              "--save_descriptors", "--test_method", "five_crops", "--efficient_ram_testing",
                              "--recall_values", "1", "5", "--pca_dim", "8",
                              "--pca_dataset_folder", "vprbench_corridor/images/test/database")
    run_folder = run_results["run_folder"]
    dataset = datasets_ws.GeoDataset(REALDATA, "gardenspoint_mini", "test")
    with open(os.path.join(REALDATA, "gardenspoint_mini", "ground_truth.json")) as file:
        ground_truth = json.load(file)["positives"]
    assert run_results["descriptor_size"] == 8

    with open(os.path.join(run_folder, "predictions", "predictions.csv"), newline="") as file:
        rows = list(csv.DictReader(file))
    assert list(rows[0]) == ["query_index", "query_path", "rank", "database_index", "database_path", "distance",
                             "is_positive", "utm_distance_m"]
    assert len(rows) == dataset.queries_num * 3
    assert [int(row["rank"]) for row in rows[:6]] == [1, 2, 3, 1, 2, 3]
    for row in rows:
        query, database = os.path.basename(row["query_path"]), os.path.basename(row["database_path"])
        assert (row["is_positive"] == "True") == (database in ground_truth[query])
        east = [datasets_ws.parse_utm(p)[0] for p in (row["query_path"], row["database_path"])]
        assert float(row["utm_distance_m"]) == pytest.approx(abs(east[0] - east[1]), abs=0.01)
        assert float(row["distance"]) >= 0
    # Recall@1 from the CSV equals the reported one
    hits_at_1 = sum(row["is_positive"] == "True" for row in rows if row["rank"] == "1")
    assert run_results["recalls"]["test"]["R@1"] == pytest.approx(hits_at_1 / dataset.queries_num * 100)

    pictures = sorted(name for name in os.listdir(os.path.join(run_folder, "predictions")) if name.endswith(".png"))
    assert len(pictures) == dataset.queries_num  # all of them: fewer than the sample size
    for name in pictures[:2]:
        with Image.open(os.path.join(run_folder, "predictions", name)) as picture:
            picture.verify()
        with Image.open(os.path.join(run_folder, "predictions", name)) as picture:
            assert picture.format == "PNG" and picture.width > 3 * picture.height  # query + 3 predictions in a row

    database = np.load(os.path.join(run_folder, "database_descriptors.npy"))
    queries = np.load(os.path.join(run_folder, "queries_descriptors.npy"))
    assert database.shape == (dataset.database_num, 8) and queries.shape == (dataset.queries_num, 8)
    assert database.dtype == queries.dtype == np.float32
    with open(os.path.join(run_folder, "database_paths.txt")) as file:
        assert file.read().splitlines() == dataset.database_paths
    with open(os.path.join(run_folder, "queries_paths.txt")) as file:
        assert file.read().splitlines() == dataset.queries_paths
    # The saved descriptors give back the recalls of the run
    _, predictions = vg_test.exact_search(database, queries, 5)
    recalls = metrics.compute_recalls(predictions, dataset.soft_positives_per_query, [1, 5])
    assert list(recalls) == [run_results["recalls"]["test"]["R@1"], run_results["recalls"]["test"]["R@5"]]


def test_matching_folders_without_coordinates(tmp_path):
    corridor = os.path.join(REALDATA, "vprbench_corridor", "images", "test")
    for kind, folder, count in (("queries", "photos", 3), ("database", "reference", 6)):
        os.makedirs(tmp_path / folder / "sub")
        for i, path in enumerate(datasets_ws.find_images(os.path.join(corridor, kind))[:count]):
            shutil.copy(path, tmp_path / folder / ("sub" if i % 2 else "") / f"image {i}.jpg")  # any names
    completed, run_results = run_eval(tmp_path, "--queries_folder", "photos", "--database_folder", "reference",
                                      "--save_predictions", "2", "--test_method", "nearest_crop")
    queries = datasets_ws.find_images(str(tmp_path / "photos"))
    for q, query in enumerate(os.path.relpath(path, tmp_path) for path in queries):
        block = re.search(rf"Query {q}: {re.escape(query)}\n  1\. reference/\S.*\(distance \d+\.\d+\)\n"
                          rf".*  2\. reference/.*\(distance \d+\.\d+\)", completed.stdout)
        assert block, completed.stdout[-2000:]
    assert "R@1" not in completed.stdout
    assert run_results["recalls"] == {}
    assert run_results["datasets"]["folders"]["queries_num"] == 3
    with open(os.path.join(run_results["run_folder"], "predictions", "predictions.csv"), newline="") as file:
        rows = list(csv.DictReader(file))
    assert list(rows[0]) == ["query_index", "query_path", "rank", "database_index", "database_path", "distance"]
    assert len(rows) == 6 and all(row["database_path"].startswith("reference") for row in rows)
    pictures = [name for name in os.listdir(os.path.join(run_results["run_folder"], "predictions"))
                if name.endswith(".png")]
    assert len(pictures) == 3


def test_a_missing_checkpoint_is_a_clear_error():
    model = network.make_model("resnet18conv4", "gem", pretrain="none", resize=(64, 80))
    with pytest.raises(UserInputError, match=r"^--resume nowhere/model\.pth: no such file; check the path$"):
        vg_eval.load_resume(SimpleNamespace(resume="nowhere/model.pth", trust_checkpoint=False), model)
