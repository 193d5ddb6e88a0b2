"""results.json and the RESULT line: their content, atomic writing, and the one-line summary sweeps grep."""
import json
import os
from datetime import datetime
from types import SimpleNamespace

import pytest
import torch

import results


def make_args(**overrides):
    args = dict(backbone="resnet18conv4", aggregation="gem", resize=[64, 80], recall_values=[1, 5], device="cpu",
                pca_dim=None, test_method="hard_resize", seed=0)
    args.update(overrides)
    return SimpleNamespace(**args)


class TinyNet(torch.nn.Module):
    features_dim = 4

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, kernel_size=3)  # 4 * 3 * 3 * 3 + 4 = 112 parameters

    def forward(self, images):
        return self.conv(images).mean(dim=(2, 3))


DATASET = {"name": "toy", "split": "test", "database_num": 10, "queries_num": 4, "positive_dist_threshold": 25}


def test_results_hold_everything_a_table_needs(tmp_path):
    start = datetime(2024, 5, 1, 12, 0, 0)
    content = results.write_results(str(tmp_path), make_args(), TinyNet(), {"test": {1: 50.0, 5: 75.0}},
                                    {"extraction_seconds": 1.5, "search_seconds": 0.25, "total_seconds": 3.0},
                                    {"test": DATASET}, script="eval.py", start_time=start)
    with open(tmp_path / "results.json") as file:
        saved = json.load(file)
    assert saved == json.loads(json.dumps(content))
    assert saved["script"] == "eval.py" and saved["run_folder"] == str(tmp_path)
    assert saved["start_time"] == "2024-05-01T12:00:00"
    assert saved["arguments"]["resize"] == [64, 80] and saved["arguments"]["backbone"] == "resnet18conv4"
    assert saved["datasets"] == {"test": DATASET}
    assert saved["descriptor_size"] == 4
    assert saved["recalls"] == {"test": {"R@1": 50.0, "R@5": 75.0}}
    assert saved["timings"] == {"extraction_seconds": 1.5, "search_seconds": 0.25, "total_seconds": 3.0}
    assert saved["params"] == 112
    # thop counts the convolution's multiply-accumulates: 62 x 78 outputs x 4 channels x 27 (+ bias), x2
    assert saved["flops"] >= 2 * 62 * 78 * 4 * 27
    assert set(saved["versions"]) >= {"python", "torch", "torchvision", "faiss", "numpy", "sklearn"}
    assert [name for name in os.listdir(tmp_path)] == ["results.json"]  # no temporary file left behind


def test_descriptor_size_after_pca_is_the_reduced_one(tmp_path):
    content = results.write_results(str(tmp_path), make_args(pca_dim=2), TinyNet(), {"test": {1: 0.0}}, {},
                                    {"test": DATASET}, descriptor_size=2)
    assert content["descriptor_size"] == 2


def test_geo_dataset_is_summarised():
    class FakeGeoDataset:
        dataset_name, split, database_num, queries_num, positive_dist_threshold = "pitts30k", "val", 7, 3, 25
    assert results.dataset_summary(FakeGeoDataset()) == {"name": "pitts30k", "split": "val", "database_num": 7,
                                                         "queries_num": 3, "positive_dist_threshold": 25}


def test_result_line_is_one_greppable_json_line():
    content = results.build_results(make_args(), {"val": {1: 10.0, 5: 20.0}, "test": {1: 40.0, 5: 60.5}},
                                    {"extraction_seconds": 2.0}, {"val": DATASET, "test": DATASET}, 256,
                                    flops=10**9, params=5, output_folder="/runs/a", script="train.py")
    line = results.result_line(content)
    assert "\n" not in line and line.startswith("RESULT {")
    assert results.parse_result_line(line) == {
        "script": "train.py", "dataset": "toy", "split": "test", "R@1": 40.0, "R@5": 60.5, "descriptor_size": 256,
        "flops": 10**9, "extraction_seconds": 2.0, "run_folder": os.path.abspath("/runs/a")}
    with pytest.raises(ValueError, match="Not a result line"):
        results.parse_result_line("R@1: 40.0")


def test_result_line_without_recalls_names_the_folders():
    folders = {"database_folder": "/d", "queries_folder": "/q", "database_num": 3, "queries_num": 2}
    content = results.build_results(make_args(), {}, {}, {"folders": folders}, 4)
    summary = results.parse_result_line(results.result_line(content))
    assert summary["split"] is None and "R@1" not in summary
    assert content["datasets"]["folders"] == folders


def test_atomic_write_leaves_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "results.json"
    results.write_json_atomically(str(path), {"a": 1})
    with pytest.raises(TypeError):
        results.write_json_atomically(str(path), {"a": object()})
    assert json.loads(path.read_text()) == {"a": 1}
    assert os.listdir(tmp_path) == ["results.json"]
