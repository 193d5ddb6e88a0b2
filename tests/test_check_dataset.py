"""tools/check_dataset.py: each kind of problem is found and named, real datasets pass, exit statuses."""
import json
import os
import runpy
import sys

import numpy as np
import pytest
from PIL import Image

from tools import check_dataset as cd

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REALDATA = os.path.join(REPO, "tests", "data", "realdata")


def _name(east, north, note, zone=""):
    return f"@{east:010.2f}@{north:010.2f}@{zone}@{'U' if zone else ''}@@@@@@@@@@{note}@.jpg"


def _image(path, size=(32, 24)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, (10, 200, 30)).save(path)


def _split(root, split, database, queries, size=(32, 24)):
    """database / queries: lists of (east, north) -> images named db<i> / q<i>."""
    for kind, utms, prefix in (("database", database, "db"), ("queries", queries, "q")):
        for i, (east, north) in enumerate(utms):
            _image(os.path.join(root, "images", split, kind, _name(east, north, f"{prefix}{i}")), size)


def _kinds(items):
    return sorted(item["kind"] for item in items)


@pytest.fixture
def broken(tmp_path):
    """A test split with one of each problem: a corrupt image, a bad name, a duplicate, a query without positives."""
    root = str(tmp_path / "broken")
    _split(root, "test", [(500000, 4000000), (500010, 4000000), (500020, 4000000)],
           [(500005, 4000000), (500300, 4000000)])
    database = os.path.join(root, "images", "test", "database")
    with open(os.path.join(database, _name(500030, 4000000, "corrupt")), "wb") as file:
        file.write(b"\xff\xd8 this is not a jpeg")
    _image(os.path.join(database, "IMG_0001.jpg"))
    duplicate = _name(500010, 4000000, "db1")  # the database image db1 also among the queries
    _image(os.path.join(root, "images", "test", "queries", "sub", duplicate))
    return root


def test_broken_dataset_reports_each_problem(broken, tmp_path, capsys):
    report_path = str(tmp_path / "report.json")
    assert cd.main(["--dataset_folder", broken, "--json", report_path]) == 1
    with open(report_path) as file:
        report = json.load(file)
    problems = {item["kind"]: item for item in report["problems"]}
    assert sorted(problems) == ["duplicate_names", "queries_without_positives", "unparsable_names",
                                "unreadable_images"]
    assert problems["unreadable_images"]["examples"][0].startswith("Cannot read the image ") and \
        "corrupt@.jpg" in problems["unreadable_images"]["examples"][0]
    assert problems["unparsable_names"]["examples"][0].startswith("images/test/database/IMG_0001.jpg: Cannot read "
                                                                  "UTM coordinates")
    assert problems["duplicate_names"]["examples"] == [
        f"images/test/database/{_name(500010, 4000000, 'db1')} and images/test/queries/sub/"
        f"{_name(500010, 4000000, 'db1')}"]
    assert problems["queries_without_positives"]["examples"] == [
        f"images/test/queries/{_name(500300, 4000000, 'q1')}"]
    assert "1 of 3 queries have no database image within 25 m" in problems["queries_without_positives"]["message"]
    test = report["splits"]["test"]
    # 5 database files (one unparsable), 3 queries; the corrupt one is counted but not sized
    assert test["database"]["count"] == 5 and test["queries"]["count"] == 3
    assert test["database"]["image_sizes"] == {"32x24": 4} and test["database"]["unreadable"] == 1
    assert test["database"]["coordinates"] == {"east_min": 500000.0, "east_max": 500030.0, "north_min": 4000000.0,
                                               "north_max": 4000000.0, "east_extent_m": 30.0, "north_extent_m": 0.0}
    # Queries at 500005, 500300, 500010; database at 500000, 500010, 500020, 500030 (the corrupt one still has a
    # position): 4 within 25 m (500030 on the boundary), none, 4
    assert test["positives_per_query"] == {"min": 0, "mean": pytest.approx(8 / 3), "max": 4}
    out = capsys.readouterr().out
    assert "4 problems found." in out and "queries without positives: 1" in out


def test_skip_images_skips_the_unreadable_check(broken):
    report = cd.check_dataset(broken, check_images=False)
    assert "unreadable_images" not in _kinds(report["problems"])
    assert report["splits"]["test"]["database"]["image_sizes"] is None


@pytest.mark.parametrize("dataset_name", ["opensfm_lund", "gardenspoint_mini", "vprbench_corridor"])
def test_real_datasets_have_no_problem(dataset_name, capsys):
    assert cd.main(["--datasets_folder", REALDATA, "--dataset_name", dataset_name]) == 0
    assert capsys.readouterr().out.endswith("No problems found.\n")


def test_lund_report_figures():
    report = cd.check_dataset(os.path.join(REALDATA, "opensfm_lund"))
    test = report["splits"]["test"]
    assert (test["database"]["count"], test["queries"]["count"]) == (15, 14)
    assert test["database"]["image_sizes"] == {"1024x768": 15} and test["utm_zones"] == {"33U": 29}
    with open(os.path.join(REALDATA, "opensfm_lund", "ground_truth.json")) as file:
        counts = [len(p) for p in json.load(file)["positives"].values()]
    assert test["positives_per_query"] == {"min": min(counts), "mean": pytest.approx(np.mean(counts)),
                                           "max": max(counts)}
    assert test["queries"]["coordinates"]["east_min"] == 386529.88


def test_train_queries_without_positives_are_a_warning_and_overlapping_splits_a_problem(tmp_path):
    root = str(tmp_path / "data")
    _split(root, "train", [(500000, 4000000), (500100, 4000000)], [(500002, 4000000), (500050, 4000000)])
    _split(root, "test", [(500120, 4000000)], [(500121, 4000000)])  # 20 m from the train database
    report = cd.check_dataset(root, val_positive_dist_threshold=25, train_positives_dist_threshold=10)
    assert _kinds(report["warnings"]) == ["queries_without_positives"]
    assert report["warnings"][0]["message"].startswith("train: 1 of 2 queries have no database image within 10 m")
    assert _kinds(report["problems"]) == ["splits_overlap"]
    between = report["between_splits"]
    assert len(between) == 1 and between[0]["splits"] == ["train", "test"]
    assert between[0]["min_distance_m"] == pytest.approx(20.0) and between[0]["test_images_within_threshold"] == 2
    assert between[0]["closest_pair"] == [f"images/train/database/{_name(500100, 4000000, 'db1')}",
                                          f"images/test/database/{_name(500120, 4000000, 'db0')}"]
    # 30 m apart with a 25 m threshold: no overlap
    assert cd.check_dataset(root, val_positive_dist_threshold=19)["problems"] == []


def test_missing_folder_several_zones_and_ignored_files(tmp_path):
    root = str(tmp_path / "data")
    _image(os.path.join(root, "images", "val", "database", _name(500000, 4000000, "a", zone="32")))
    _image(os.path.join(root, "images", "val", "database", _name(500001, 4000000, "b", zone="33")))
    with open(os.path.join(root, "images", "val", "database", "photo.heic"), "wb") as file:
        file.write(b"")
    report = cd.check_dataset(root)
    assert _kinds(report["problems"]) == ["missing_folder", "several_utm_zones"]
    assert "images/val/queries is missing" in report["problems"][0]["message"]
    assert _kinds(report["warnings"]) == ["ignored_files"]
    assert report["warnings"][0]["examples"] == ["images/val/database/photo.heic"]


def test_latitude_longitude_instead_of_utm_is_a_warning(tmp_path):
    root = str(tmp_path / "data")
    _split(root, "test", [(55.69817, 13.19539)], [(55.69824, 13.19520)])
    assert _kinds(cd.check_dataset(root)["warnings"]) == ["implausible_utm", "implausible_utm"]


@pytest.mark.parametrize("flags", [
    ["--dataset_folder", "/nonexistent/dataset"],
    ["--dataset_folder", REALDATA + "/opensfm_lund", "--dataset_name", "opensfm_lund"],
    ["--datasets_folder", REALDATA],
    ["--dataset_folder", REALDATA + "/opensfm_lund", "--val_positive_dist_threshold", "0"],
])
def test_bad_flags_exit_with_status_2(flags):
    with pytest.raises(SystemExit) as exit_info:
        cd.main(flags)
    assert exit_info.value.code == 2


def test_script_exit_status(broken, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["check_dataset.py", "--dataset_folder", broken, "--skip_images"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(os.path.join(REPO, "tools", "check_dataset.py"), run_name="__main__")
    assert exit_info.value.code == 1
    assert "Images not opened (--skip_images)" in capsys.readouterr().out
