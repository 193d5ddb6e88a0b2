"""tools/gather_results.py: many results.json files into one Markdown / CSV table."""
import csv
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

import results

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))
import gather_results  # noqa: E402  (a tool script, imported from its folder)


def _write_run(folder, recalls_by_split, backbone="resnet18conv4", lr=1e-5, flops=2_000_000_000, script="eval.py"):
    os.makedirs(folder)
    args = SimpleNamespace(backbone=backbone, aggregation="netvlad", fc_output_dim=None, pca_dim=None,
                           test_method="hard_resize", resize=[480, 640], lr=lr)
    datasets = {split: {"name": "pitts30k", "split": split, "database_num": 10, "queries_num": 5}
                for split in recalls_by_split}
    content = results.build_results(args, recalls_by_split, {"extraction_seconds": 12.34, "search_seconds": 0.5,
                                                             "total_seconds": 20.0},
                                    datasets, 16384, flops=flops, params=11_000_000, output_folder=folder,
                                    script=script)
    results.write_json_atomically(os.path.join(folder, "results.json"), content)


@pytest.fixture
def runs(tmp_path):
    _write_run(str(tmp_path / "sweep" / "a" / "2024-01-01_00-00-00"), {"test": {1: 40.0, 5: 60.0, 10: 70.0}})
    _write_run(str(tmp_path / "sweep" / "b" / "2024-01-02_00-00-00"), {"val": {1: 55.0, 5: 65.0},
                                                                       "test": {1: 50.0, 5: 66.6666}},
               backbone="resnet50conv4", lr=1e-4, flops=None, script="train.py")
    (tmp_path / "sweep" / "broken").mkdir()
    (tmp_path / "sweep" / "broken" / "results.json").write_text("{ not json")  # a run killed mid-write (old tools)
    return tmp_path


def test_one_row_per_run_with_flags_recalls_and_costs(runs):
    rows = gather_results.main([str(runs / "sweep"), "--columns", "lr", "--output", str(runs / "table")])
    assert len(rows) == 2
    first, second = rows
    assert first["backbone"] == "resnet18conv4" and second["backbone"] == "resnet50conv4"
    assert first["resize"] == "480x640" and first["lr"] == 1e-5 and second["lr"] == 1e-4
    assert (first["R@1"], first["R@5"], first["R@10"]) == (40.0, 60.0, 70.0)
    assert (second["split"], second["R@1"], second["R@5"], second["R@10"]) == ("test", 50.0, 66.67, "")
    assert first["GFLOPs"] == 2.0 and second["GFLOPs"] == "" and first["params_M"] == 11.0
    assert first["descriptor_size"] == 16384 and first["extraction_s"] == 12.3 and first["search_s"] == 0.5

    with open(runs / "table.csv", newline="") as file:
        table = list(csv.DictReader(file))
    assert [row["R@1"] for row in table] == ["40.0", "50.0"]
    assert list(table[0])[:4] == ["run", "script", "dataset", "split"]
    markdown = (runs / "table.md").read_text().splitlines()
    assert markdown[0].startswith("| run | script | dataset | split | backbone |") and "| R@1 |" in markdown[0]
    assert markdown[1].startswith("|---|") and len(markdown) == 4


def test_split_and_sort(runs):
    rows = gather_results.main([str(runs / "sweep"), "--split", "val", "--sort", "R@1"])
    assert [(row["backbone"], row["R@1"]) for row in rows] == [("resnet50conv4", 55.0), ("resnet18conv4", "")]


def test_bad_sort_column_and_missing_folder_are_clear_errors(runs, capsys):
    with pytest.raises(SystemExit):
        gather_results.main([str(runs / "sweep"), "--sort", "R@2"])
    assert "--sort R@2: no such column" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gather_results.main([str(runs / "nowhere")])
    assert "is neither a folder nor a results file" in capsys.readouterr().err


def test_runs_as_a_script(runs):
    completed = subprocess.run([sys.executable, os.path.join(REPO, "tools", "gather_results.py"), "sweep"],
                               cwd=runs, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    lines = completed.stdout.splitlines()
    assert len(lines) == 4 and "sweep/a/2024-01-01_00-00-00" in lines[2]
    assert "Skipping" in completed.stderr and "broken" in completed.stderr


# ----------------------------------------------------------------------------------------------------------
# --plot: R@1 against the descriptor size or the FLOPs, one labelled point per run

def test_plot_has_one_point_per_run_with_both_numbers(runs, caplog):
    from PIL import Image
    plot = runs / "plot.png"
    rows = gather_results.main([str(runs / "sweep"), "--plot", str(plot), "--plot_x", "GFLOPs"])
    # The second run has no FLOPs: it is in the table but not on the plot, and the log says so
    points, skipped = gather_results.plot_points(rows, "GFLOPs", "R@1")
    assert points == [("a", 2.0, 40.0, "pitts30k")]  # named by its folder below the one the runs share
    assert skipped == [rows[1]["run"]] and rows[1]["run"] in caplog.text and "Not on the plot" in caplog.text
    with Image.open(plot) as image:
        assert image.format == "PNG" and image.size == (800, 550)


def test_point_labels():
    def row(run, **values):
        return dict({"run": run, "dataset": "pitts30k", "backbone": "resnet18conv4", "pca_dim": ""}, **values)
    columns = ("dataset", "backbone", "aggregation", "pca_dim")
    # A sweep: each run in its own folder, named by its path below the sweep's folder
    sweep = [row("logs/sweep/gem/2024-01-01"), row("logs/sweep/netvlad/2024-01-02"),
             row("logs/sweep/netvlad/on_msls/2024-01-03", dataset="msls")]
    assert gather_results.point_labels(sweep, columns) == ["gem", "netvlad", os.path.join("netvlad", "on_msls")]
    # Runs of one --save_dir: what varies among them, numbers with their name
    same_folder = [row("logs/default/2024-01-01", pca_dim=256, aggregation="gem"),
                   row("logs/default/2024-01-02", pca_dim=512, aggregation="netvlad")]
    assert gather_results.point_labels(same_folder, columns) == ["gem pca_dim=256", "netvlad pca_dim=512"]
    assert gather_results.point_labels(same_folder, ("backbone",)) == ["default", "default"]  # nothing varies
    points, skipped = gather_results.plot_points([dict(r, size=1, **{"R@5": 9.5}) for r in same_folder], "size",
                                                 "R@5", extra_flags=("lr",))
    assert points == [("gem pca_dim=256", 1, 9.5, "pitts30k"), ("netvlad pca_dim=512", 1, 9.5, "pitts30k")]
    assert skipped == []


def test_labels_of_runs_at_one_place_are_stacked_and_kept_inside():
    points = [("gem", 256, 62.5, "smoke"), ("gem_partial", 256, 62.5, "smoke"), ("netvlad", 2048, 75.0, "smoke"),
              ("netvlad", 2048, 75.0, "msls"), ("vgg", 1024, 70.0, "smoke")]
    assert gather_results.annotations(points, log_x=False) == [
        ("gem\ngem_partial", 256, 62.5, False), ("netvlad", 2048, 75.0, True), ("netvlad", 2048, 75.0, True),
        ("vgg", 1024, 70.0, False)]  # 1024 is left of the middle, 1152
    # On a log axis the middle is the geometric mean (724): 1024 is on the right, its label goes to the left
    assert gather_results.annotations(points, log_x=True)[3] == ("vgg", 1024, 70.0, True)
    assert gather_results.annotations(points[:1], log_x=False) == [("gem", 256, 62.5, False)]


def test_plot_flags_are_checked(runs, capsys):
    with pytest.raises(SystemExit):
        gather_results.main([str(runs / "sweep"), "--plot", str(runs / "plot.jpg")])
    assert "plot.jpg: the plot is a PNG file, give a name ending in .png" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gather_results.main([str(runs / "sweep"), "--plot", str(runs / "plot.png"), "--plot_x", "flops"])
    assert "--plot_x flops: no such column" in capsys.readouterr().err
    assert not (runs / "plot.png").exists()
