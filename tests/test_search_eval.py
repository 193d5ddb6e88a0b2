"""eval.py with the large-scale flags on a real dataset (random weights): the same recalls and predictions as the
default in-memory run, a descriptors folder reused by a later run and refused to another model, the approximate
indexes, the PCA fit once and saved, and the flags' checks."""
import csv
import os
import sys

import pytest

import eval as vg_eval
import parser as vg_parser
import predictions
import results
import search

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REALDATA = os.path.join(REPO, "tests", "data", "realdata")
MODEL_FLAGS = ["--pretrain", "none", "--resize", "64", "80", "--backbone", "resnet18conv4", "--aggregation", "gem",
               "--num_workers", "0", "--device", "cpu", "--datasets_folder", REALDATA]


def run_eval(monkeypatch, capsys, cwd, *flags):
    """eval.py in this process (no new interpreter to start): its RESULT line and console output."""
    monkeypatch.setattr(predictions, "PICTURED_QUERIES_NUM", 1)  # pictures take time and are tested elsewhere
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", ["eval.py", *MODEL_FLAGS, *flags])
    vg_eval.main()
    output = capsys.readouterr().out
    line = [line for line in output.splitlines() if line.startswith(results.RESULT_LINE_PREFIX)][-1]
    return results.parse_result_line(line), output


def predictions_of(summary):
    with open(os.path.join(summary["run_folder"], "predictions", "predictions.csv")) as file:
        return [(row["query_index"], row["database_index"], row["distance"]) for row in csv.DictReader(file)]


def test_the_store_and_the_budget_change_nothing_and_a_folder_is_reused(monkeypatch, capsys, tmp_path):
    flags = ["--dataset_name", "gardenspoint_mini", "--save_predictions", "3"]
    default, _ = run_eval(monkeypatch, capsys, tmp_path, *flags)
    folder = str(tmp_path / "descriptors")
    stored, output = run_eval(monkeypatch, capsys, tmp_path, *flags, "--descriptors_folder", folder,
                              "--max_ram_gb", "0.07", "--descriptors_dtype", "float32")
    assert "Database: extracting 1 of 1 shards" in output
    assert [stored[f"R@{n}"] for n in (1, 5, 10, 20)] == [default[f"R@{n}"] for n in (1, 5, 10, 20)]
    assert predictions_of(stored) == predictions_of(default)

    again, output = run_eval(monkeypatch, capsys, tmp_path, *flags, "--descriptors_folder", folder)
    assert "Database: extracting 0 of 1 shards" in output and "Queries: extracting 0 of 1 shards" in output
    assert predictions_of(again) == predictions_of(default)

    monkeypatch.setattr(sys, "argv", ["eval.py", *MODEL_FLAGS, *flags, "--descriptors_folder", folder,
                                      "--l2", "after_pool"])
    with pytest.raises(SystemExit) as exit_info:
        vg_eval.commons.exit_on_user_error(vg_eval.main)
    assert exit_info.value.code == 1
    error = capsys.readouterr().err
    assert "was made by another model, dataset or setting (model_sha256 differ)" in error
    assert "Pass another --descriptors_folder, or delete this one" in error


def test_approximate_indexes_that_visit_everything_give_the_exact_predictions(monkeypatch, capsys, tmp_path):
    flags = ["--dataset_name", "gardenspoint_mini", "--save_predictions", "10"]
    exact, _ = run_eval(monkeypatch, capsys, tmp_path, *flags)
    for index_flags in (["--faiss_index", "hnsw", "--hnsw_ef_search", "64"],
                        ["--faiss_index", "ivf", "--ivf_lists", "2", "--ivf_probes", "2"]):
        approximate, output = run_eval(monkeypatch, capsys, tmp_path, *flags, *index_flags)
        assert f"Built the {index_flags[1]} index" in output
        # No --descriptors_folder: the descriptors and the index are kept in the run folder
        folder = os.path.join(approximate["run_folder"], vg_eval.RUN_DESCRIPTORS_FOLDER)
        assert sorted(os.listdir(folder)) == ["database", "index", "queries_hard_resize"]
        assert [approximate[f"R@{n}"] for n in (1, 5, 10, 20)] == [exact[f"R@{n}"] for n in (1, 5, 10, 20)]
        assert [row[:2] for row in predictions_of(approximate)] == [row[:2] for row in predictions_of(exact)]


def test_pca_and_whitening_are_fit_once_and_saved_with_the_descriptors(monkeypatch, capsys, tmp_path):
    folder = str(tmp_path / "descriptors")
    flags = ["--dataset_name", "gardenspoint_mini", "--pca_dim", "8",
             "--pca_dataset_folder", "vprbench_corridor/images/test/queries",
             "--pca_whiten", "--descriptors_folder", folder, "--faiss_index", "hnsw"]
    first, output = run_eval(monkeypatch, capsys, tmp_path, *flags)
    assert "PCA saved in" in output and os.path.isfile(os.path.join(folder, vg_eval.PCA_FILENAME))
    assert first["descriptor_size"] == 8
    second, output = run_eval(monkeypatch, capsys, tmp_path, *flags)
    assert "Reusing the PCA saved in" in output and "Fitting PCA" not in output
    assert "Reusing the hnsw index" in output
    assert [second[f"R@{n}"] for n in (1, 5, 10, 20)] == [first[f"R@{n}"] for n in (1, 5, 10, 20)]
    # Without whitening the saved PCA is not the one asked for
    monkeypatch.setattr(sys, "argv", ["eval.py", *MODEL_FLAGS, *flags[:-5], "--descriptors_folder", folder])
    with pytest.raises(SystemExit):
        vg_eval.commons.exit_on_user_error(vg_eval.main)
    assert "a PCA fit with another model or setting (whiten differ)" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--faiss_index", "annoy"], "argument --faiss_index: invalid choice: 'annoy' (choose from 'flat', 'ivf', "
                                 "'ivfpq', 'hnsw')"),
    (["--hnsw_m", "0"], "--hnsw_m must be a positive integer, got 0"),
    (["--max_ram_gb", "-1"], "--max_ram_gb must be positive (gigabytes), got -1.0"),
    (["--descriptors_dtype", "int8"], "invalid choice: 'int8' (choose from 'float32', 'float16')"),
    (["--pca_whiten"], "--pca_whiten whitens the PCA components: it needs --pca_dim"),
])
def test_large_scale_flags_are_checked(capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        vg_parser.parse_arguments(["--datasets_folder", REALDATA, "--dataset_name", "opensfm_lund", *flags])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_the_flag_defaults_are_the_search_defaults():
    args = vg_parser.parse_arguments(["--datasets_folder", REALDATA, "--dataset_name", "opensfm_lund"])
    assert search.search_settings(args) == search.SearchSettings()
    assert not search.search_settings(args).uses_store
