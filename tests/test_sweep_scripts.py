"""scripts/*.sh: every sweep runs end to end in its smoke mode (tiny synthetic dataset, one short epoch) and leaves
its table (Markdown and CSV, also on stdout) and plot, one row per value of its loops."""
import concurrent.futures
import csv
import glob
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

import network
from model import zoo

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(REPO, "scripts")
SWEEP_NAME = "smoke"
SWEEPS = ("backbones_aggregations", "mining", "resize", "test_methods", "augmentation", "pca", "off_the_shelf",
          "todays_methods", "recipes")


def _environment(**variables):
    # PY: the interpreter running the tests (no .venv set-up); one OpenMP thread: two sweeps run side by side
    return dict(os.environ, PY=sys.executable, OMP_NUM_THREADS="1", **variables)


def _run(work, name, *args, **variables):
    return subprocess.run(["bash", os.path.join(SCRIPTS, f"{name}.sh"), *args], cwd=work, capture_output=True,
                          text=True, timeout=900, env=_environment(**variables))


def _stand_in_off_the_shelf_model(work):
    """A radenovic_sfm ResNet-50 file with freshly initialised weights, where a downloaded one would go (what a
    user without network does with the real file): the smoke sweep then runs offline."""
    torch.manual_seed(0)
    model = network.make_model("resnet50conv5", "gem", l2="after_pool", fc_output_dim=2048, pretrain="none")
    state_dict = {f"features.{index}": value for index, value in enumerate(model.state_dict().values())}
    folder = os.path.join(work, network.WEIGHTS_FOLDER, zoo.OFF_THE_SHELF_SUBFOLDER)
    os.makedirs(folder, exist_ok=True)
    url = zoo.OFF_THE_SHELF_RADENOVIC_URLS[("resnet50conv5", "sfm")]
    torch.save({"state_dict": state_dict}, os.path.join(folder, os.path.basename(url)))


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory):
    """Every sweep in smoke mode, in one work folder. test_methods goes first (it generates the smoke dataset and
    trains the model that pca then evaluates through --resume); the others run two at a time."""
    work = str(tmp_path_factory.mktemp("sweeps"))
    first = subprocess.Popen(["bash", os.path.join(SCRIPTS, "test_methods.sh"), "--smoke", "--sweep_name", SWEEP_NAME],
                             cwd=work, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_environment())
    _stand_in_off_the_shelf_model(work)
    stdout, stderr = first.communicate(timeout=900)
    completed = {"test_methods": subprocess.CompletedProcess(first.args, first.returncode, stdout, stderr)}
    assert first.returncode == 0, stderr[-3000:]
    reference = glob.glob(os.path.join(work, "logs", "sweeps", "test_methods", SWEEP_NAME, "reference", "*",
                                       "best_model.pth"))
    assert len(reference) == 1
    arguments = {"mining": ["--eval_datasets", "smoke"], "pca": ["--resume", reference[0]]}
    others = [name for name in SWEEPS if name != "test_methods"]
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(_run, work, name, "--smoke", "--sweep_name", SWEEP_NAME,
                                     *arguments.get(name, [])) for name in others}
        completed.update({name: future.result() for name, future in futures.items()})
    return work, completed


def _table(work, name):
    folder = os.path.join(work, "logs", "sweeps", name, SWEEP_NAME)
    with open(os.path.join(folder, "table.csv"), newline="") as file:
        rows = list(csv.DictReader(file))
    return folder, sorted(rows, key=lambda row: row["run"])


# Per sweep: the column its loop changes, and its values in the rows (sorted by run folder, i.e. by label)
EXPECTED_ROWS = {
    "backbones_aggregations": ("aggregation", ["gem", "netvlad"]),
    "mining": ("mining", ["partial", "partial", "random", "random"]),  # each training, then its best model on smoke
    "resize": ("resize", ["24x32", "32x48"]),
    "test_methods": ("test_method", ["hard_resize", "nearest_crop"]),
    "augmentation": ("horizontal_flip", ["True", "False"]),  # labels horizontal_flip, none
    "pca": ("pca_dim", ["", "8"]),  # labels no_pca, pca_8
    "off_the_shelf": ("off_the_shelf", ["radenovic_sfm"]),
    "todays_methods": ("aggregation", ["boq", "convap", "gem", "megaloc", "mixvpr", "salad"]),
    "recipes": ("recipe", ["cosplace", "places", "triplets"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", SWEEPS)
def test_sweep_runs_in_smoke_mode_and_gathers_its_table_and_plot(sweeps, name):
    work, completed = sweeps
    result = completed[name]
    assert result.returncode == 0, result.stderr[-3000:]
    folder, rows = _table(work, name)
    column, values = EXPECTED_ROWS[name]
    assert [row[column] for row in rows] == values
    assert all(row["dataset"] == "smoke" and row["split"] == "test" and row["R@1"] != "" for row in rows)
    with open(os.path.join(folder, "table.md")) as file:
        markdown = file.read()
    assert result.stdout == markdown  # the sweep's stdout is its table; the runs' logs go to stderr
    assert len(markdown.splitlines()) == 2 + len(values)
    with Image.open(os.path.join(folder, "plot.png")) as image:
        assert image.format == "PNG"
    assert f"{len(values)} runs plotted" in result.stderr


@pytest.mark.slow
def test_what_the_sweeps_measure(sweeps):
    work = sweeps[0]
    _, rows = _table(work, "backbones_aggregations")
    # GeM gives the backbone's channels (256 for ResNet-18 conv4), NetVLAD clusters x channels (8 in smoke mode)
    assert [row["descriptor_size"] for row in rows] == ["256", "2048"]
    _, rows = _table(work, "resize")
    assert float(rows[0]["GFLOPs"]) < float(rows[1]["GFLOPs"])  # 24x32 costs less than 32x48
    _, rows = _table(work, "pca")
    assert [row["descriptor_size"] for row in rows] == ["2048", "8"]
    _, rows = _table(work, "off_the_shelf")
    assert (rows[0]["backbone"], rows[0]["l2"], rows[0]["fc_output_dim"]) == ("resnet50conv5", "after_pool", "2048")
    # today's methods at toy sizes: each its own descriptor (boq 64 x 4, convap 16 x 2 x 2, megaloc's FC 16, ...)
    _, rows = _table(work, "todays_methods")
    assert [row["descriptor_size"] for row in rows] == ["256", "64", "32", "16", "32", "40"]
    # test_methods: the model trained first is not a row; both rows evaluate it
    _, rows = _table(work, "test_methods")
    assert [row["script"] for row in rows] == ["eval.py", "eval.py"]
    # mining --eval_datasets smoke: eval.py on each best model gives the recalls train.py tested it with
    _, rows = _table(work, "mining")
    trainings = [row for row in rows if row["script"] == "train.py"]
    evaluations = [row for row in rows if row["script"] == "eval.py"]
    assert len(trainings) == len(evaluations) == 2
    for training, evaluation in zip(trainings, evaluations):
        assert evaluation["run"].startswith(os.path.dirname(training["run"]) + os.sep + "on_smoke")
        assert [evaluation[f"R@{n}"] for n in (1, 5, 10, 20)] == [training[f"R@{n}"] for n in (1, 5, 10, 20)]


def test_help_shows_the_script_header_and_the_shared_options():
    result = subprocess.run(["bash", os.path.join(SCRIPTS, "mining.sh"), "--help"], capture_output=True, text=True,
                            timeout=60, env=_environment())
    assert result.returncode == 0
    assert result.stdout.startswith("Table 4 of the paper")
    assert "--smoke" in result.stdout and "--eval_datasets" in result.stdout and "--sweep_name" in result.stdout
    assert "Sourced by" not in result.stdout  # the maintainers' notes of common.sh


@pytest.mark.parametrize("name,args,variables,message", [
    ("mining", ["--sweep_name", "a/b"], {}, "--sweep_name a/b: give a plain folder name"),
    ("mining", ["--sweep_name"], {}, "--sweep_name needs a value"),
    ("resize", [], {"RESIZES": "384x512 big"}, "RESIZES: big is not HxW"),
    ("mining", [], {"ARCHITECTURES": "resnet18conv4"}, "ARCHITECTURES: resnet18conv4 is not backbone:aggregation"),
    ("augmentation", [], {"AUGMENTATIONS": "sharpness=2"},
     "unknown augmentation 'sharpness'; valid names: brightness contrast"),
    ("off_the_shelf", [], {"OFF_THE_SHELF": "delf"}, "OFF_THE_SHELF: unknown model 'delf'"),
    ("todays_methods", [], {"RELEASES": "salad-dinov2-8448 netvlad-2021"}, "RELEASES: unknown release 'netvlad-2021'"),
    ("todays_methods", ["--smoke"], {"METHODS": "salad anyloc"}, "METHODS: unknown method 'anyloc'"),
    ("recipes", [], {"RECIPES": "triplets contrastive"}, "RECIPES: unknown recipe 'contrastive'"),
])
def test_bad_sweep_arguments_stop_before_any_run(tmp_path, name, args, variables, message):
    result = _run(str(tmp_path), name, *args, **variables)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert not os.path.exists(tmp_path / "logs" / "sweeps" / name)


def test_every_sweep_script_is_tested_and_shares_common_sh():
    scripts = sorted(os.path.basename(path)[:-len(".sh")] for path in glob.glob(os.path.join(SCRIPTS, "*.sh")))
    assert scripts == sorted([*SWEEPS, "common"])
    for name in SWEEPS:
        with open(os.path.join(SCRIPTS, f"{name}.sh")) as file:
            text = file.read()
        assert text.startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in text
        assert 'source "$(dirname "$0")/common.sh"' in text and "gather_sweep" in text
        assert os.access(os.path.join(SCRIPTS, f"{name}.sh"), os.X_OK)
