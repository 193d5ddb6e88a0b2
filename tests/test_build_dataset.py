"""tools/build_dataset.py: EXIF GPS and CSV positions -> datasets_vg names and folders."""
import csv
import math
import os
import shutil
import subprocess
import sys

import pytest
import utm
from PIL import Image
from PIL.TiffImagePlugin import IFDRational

from commons import UserInputError
from datasets_ws import find_images, parse_utm
from tools import build_dataset as bd

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LUND = os.path.join(REPO, "tests", "data", "realdata", "opensfm_lund")
LUND_SPLIT = os.path.join(LUND, "images", "test")


def _dms(degrees):
    """(d, m, s) rationals as cameras write them (seconds to 1/100)."""
    d = int(degrees)
    m = int((degrees - d) * 60)
    s = round(((degrees - d) * 60 - m) * 60 * 100)
    return (IFDRational(d, 1), IFDRational(m, 1), IFDRational(s, 100))


def _write_photo(path, lat=None, lon=None, time=None, size=(24, 16)):
    """A small JPEG, with EXIF GPS when lat/lon are given and DateTimeOriginal when time is given."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    exif = Image.Exif()
    if lat is not None:
        exif[bd.GPS_IFD] = {1: "N" if lat >= 0 else "S", 2: _dms(abs(lat)),
                            3: "E" if lon >= 0 else "W", 4: _dms(abs(lon))}
    if time is not None:
        exif[bd.EXIF_IFD] = {bd.DATE_TIME_ORIGINAL: time}
    Image.new("RGB", size, (90, 120, 200)).save(path, exif=exif)


def _lund_sources(folder):
    """The Lund photos under their original OpenSfM names 01.jpg .. 29.jpg (the note's number)."""
    os.makedirs(folder)
    for path in find_images(LUND_SPLIT):
        number = os.path.basename(path).split("@")[-2].replace("lund_", "")
        shutil.copyfile(path, os.path.join(folder, f"{number}.jpg"))
    return folder


def _relative_names(split_folder):
    return sorted(os.path.relpath(p, split_folder) for p in find_images(split_folder))


# ---------------------------------------------------------------------------------------------- the Lund photos

def test_lund_rebuilt_from_exif_has_the_same_names_and_coordinates(tmp_path, capsys):
    sources = _lund_sources(str(tmp_path / "photos"))
    bd.main(["--photos_folder", sources, "--output_folder", str(tmp_path / "out"), "--dataset_name", "lund",
             "--queries_every", "2", "--note_prefix", "lund_"])
    built = str(tmp_path / "out" / "lund" / "images" / "test")
    # Same file names in the same folders (odd photos database, even queries): the coordinates are identical
    assert _relative_names(built) == _relative_names(LUND_SPLIT)
    for relative in _relative_names(LUND_SPLIT):
        east, north = parse_utm(relative)
        new_east, new_north = parse_utm(os.path.join(built, relative))
        assert math.hypot(east - new_east, north - new_north) < 1.0
        assert (east, north) == (new_east, new_north)
    first = "database/@0386581.59@6173962.88@33@U@055.69817@013.19539@@@@@@@@lund_01@.jpg"
    with open(os.path.join(built, first), "rb") as new, open(os.path.join(LUND_SPLIT, first), "rb") as old:
        assert new.read() == old.read()  # copied byte for byte
    assert f"Wrote 29 images to {built}: 15 database, 14 queries; UTM zone 33;" in capsys.readouterr().out


def test_read_exif_gps_matches_the_lund_coords_csv():
    with open(os.path.join(LUND, "coords.csv")) as file:
        rows = list(csv.DictReader(file))
    for row in rows[:5]:
        lat, lon = bd.read_exif_gps(os.path.join(LUND_SPLIT, row["split"], row["file"]))
        assert abs(lat - float(row["lat"])) < 1e-7 and abs(lon - float(row["lon"])) < 1e-7


def test_refuses_to_overwrite_and_links_when_asked(tmp_path):
    sources = _lund_sources(str(tmp_path / "photos"))
    flags = ["--photos_folder", sources, "--output_folder", str(tmp_path / "out"), "--dataset_name", "lund",
             "--subfolder", "database", "--link"]
    summary = bd.main(flags)
    source, destination = summary.written[0]
    assert os.path.islink(destination) and os.readlink(destination) == os.path.abspath(source)
    with pytest.raises(UserInputError, match="29 of the images already exist.*refusing to overwrite"):
        bd.main(flags)


# ---------------------------------------------------------------------------------------------- names and zones

def test_utm_of_a_published_point_and_its_name():
    # The `utm` package's documented example: from_latlon(51.2, 7.5) = (395201.3103811303, 5673135.241182375, 32, 'U')
    east, north, zone_number, zone_letter = bd.latlon_to_utm(51.2, 7.5)
    assert (round(east, 2), round(north, 2), zone_number, zone_letter) == (395201.31, 5673135.24, 32, "U")
    name = bd.latlon_to_vg_name(51.2, 7.5, "a")
    assert name == "@0395201.31@5673135.24@32@U@051.20000@007.50000@@@@@@@@a@.jpg"
    assert len(name.split("@")) == 16  # '' + 14 fields + extension, as the VPR-datasets-downloader names


def test_southern_and_western_names_keep_signs_and_padding():
    name = bd.latlon_to_vg_name(-33.8568, -70.5, "santiago", extension=".png")
    fields = name.split("@")
    assert fields[3:7] == ["19", "H", "-033.85680", "-070.50000"] and fields[-2:] == ["santiago", ".png"]
    lat, lon = utm.to_latlon(float(fields[1]), float(fields[2]), 19, "H")
    assert abs(lat + 33.8568) < 1e-6 and abs(lon + 70.5) < 1e-6


def test_photos_across_two_zones_are_put_in_the_zone_of_the_majority():
    latlons = [(50.0, 5.999), (50.0, 6.001), (50.0, 6.0015)]  # zone 31, then 32 twice (the boundary is 6 deg E)
    zone_number, force_northern, message = bd.choose_zone(latlons)
    assert zone_number == 32 and force_northern is None and "several UTM zones" in message
    (e1, n1, z1, _), (e2, n2, z2, _) = (bd.latlon_to_utm(lat, lon, zone_number) for lat, lon in latlons[:2])
    assert z1 == z2 == 32
    # 0.002 deg of longitude at 50 deg N: 143.3 m on the ellipsoid (N = 6390.7 km there)
    expected = math.radians(0.002) * 6_390_700 * math.cos(math.radians(50.0))
    assert abs(math.hypot(e2 - e1, n2 - n1) - expected) < 1.0
    (e1, n1, _, _), (e2, n2, _, _) = (bd.latlon_to_utm(lat, lon) for lat, lon in latlons[:2])
    assert math.hypot(e2 - e1, n2 - n1) > 400_000  # each in its own zone the distance is meaningless
    assert bd.choose_zone(latlons, utm_zone=31)[0] == 31
    assert bd.choose_zone([(1.0, 7.0), (2.0, 7.0), (-1.0, 7.0)])[1] is True  # both hemispheres: northern forced


def test_exif_gps_forms(tmp_path):
    _write_photo(str(tmp_path / "sw.jpg"), lat=-33.8568, lon=-70.5)
    lat, lon = bd.read_exif_gps(str(tmp_path / "sw.jpg"))
    assert abs(lat + 33.8568) < 1e-5 and abs(lon + 70.5) < 1e-5
    _write_photo(str(tmp_path / "none.jpg"))
    assert bd.read_exif_gps(str(tmp_path / "none.jpg")) is None
    _write_photo(str(tmp_path / "zero.jpg"), lat=0.0, lon=0.0)  # a camera without a fix
    assert bd.read_exif_gps(str(tmp_path / "zero.jpg")) is None
    exif = Image.Exif()
    exif[bd.GPS_IFD] = {1: "N", 2: IFDRational(5575, 100), 3: "E", 4: (IFDRational(13, 1), IFDRational(30, 1))}
    Image.new("RGB", (8, 8)).save(str(tmp_path / "decimal.jpg"), exif=exif)
    assert bd.read_exif_gps(str(tmp_path / "decimal.jpg")) == (55.75, 13.5)


# ---------------------------------------------------------------------------------------------- photos folder

def test_photos_without_gps_are_listed_and_skipped(tmp_path, capsys):
    photos = tmp_path / "photos"
    _write_photo(str(photos / "a.jpg"), 51.2, 7.5)
    _write_photo(str(photos / "sub" / "b.jpg"), 51.2001, 7.5)
    _write_photo(str(photos / "c.jpg"))
    (photos / "d.jpg").write_bytes(b"not a jpeg")
    summary = bd.main(["--photos_folder", str(photos), "--output_folder", str(tmp_path / "out"),
                       "--dataset_name", "toy", "--split", "val", "--queries_every", "2"])
    assert summary.without_gps == [str(photos / "c.jpg")]
    assert [path for path, _ in summary.unreadable] == [str(photos / "d.jpg")]
    out = capsys.readouterr().out
    assert "skipped 1 photos without a position: " + str(photos / "c.jpg") in out
    assert "unreadable file" in out and "d.jpg" in out
    val = str(tmp_path / "out" / "toy" / "images" / "val")
    assert _relative_names(val) == [
        "database/@0395201.31@5673135.24@32@U@051.20000@007.50000@@@@@@@@a@.jpg",
        f"queries/{bd.latlon_to_vg_name(51.2001, 7.5, 'b')}"]


def test_no_photo_with_gps_is_an_error(tmp_path):
    _write_photo(str(tmp_path / "photos" / "c.jpg"))
    with pytest.raises(UserInputError, match="None of the 1 photos.*no GPS in their EXIF.*c.jpg"):
        bd.main(["--photos_folder", str(tmp_path / "photos"), "--output_folder", str(tmp_path / "out"),
                 "--dataset_name", "toy", "--subfolder", "queries"])
    assert not (tmp_path / "out").exists()


def test_time_order_decides_the_queries(tmp_path):
    photos = tmp_path / "photos"
    times = {"a": "2020:01:01 10:00:03", "b": "2020:01:01 10:00:01", "c": "2020:01:01 10:00:02",
             "d": "2020:01:01 10:00:04"}
    for i, (stem, time) in enumerate(times.items()):
        _write_photo(str(photos / f"{stem}.jpg"), 45.0 + i * 1e-4, 9.0, time=time)
    flags = ["--photos_folder", str(photos), "--output_folder", str(tmp_path / "out"), "--queries_every", "2"]
    summary = bd.main(flags + ["--dataset_name", "by_time", "--order", "time"])
    queries = sorted(os.path.basename(src) for src, dst in summary.written if "/queries/" in dst)
    assert queries == ["c.jpg", "d.jpg"]  # time order b, c, a, d: the 2nd and 4th are queries
    summary = bd.main(flags + ["--dataset_name", "by_name"])
    assert sorted(os.path.basename(src) for src, dst in summary.written if "/queries/" in dst) == ["b.jpg", "d.jpg"]
    _write_photo(str(photos / "e.jpg"), 45.0, 9.0)
    with pytest.raises(UserInputError, match="1 photos have no EXIF date.*e.jpg.*--order name"):
        bd.main(flags + ["--dataset_name", "again", "--order", "time"])


# ---------------------------------------------------------------------------------------------- CSV

def test_csv_with_header_relative_and_absolute_paths(tmp_path):
    for stem in ("p1", "p2", "p3"):
        _write_photo(str(tmp_path / "imgs" / f"{stem}.jpg"))  # no EXIF: the CSV gives the positions
    absolute = str(tmp_path / "imgs" / "p3.jpg")
    (tmp_path / "list.csv").write_text("longitude,note,file,latitude\n"
                                       "7.5,first,imgs/p1.jpg,51.2\n"
                                       f"-70.5,x,{absolute},-33.8568\n"
                                       ",no position,imgs/p2.jpg,\n")
    summary = bd.main(["--csv", str(tmp_path / "list.csv"), "--output_folder", str(tmp_path / "out"),
                       "--dataset_name", "toy", "--subfolder", "database", "--utm_zone", "32"])
    assert summary.without_gps == [str(tmp_path / "imgs" / "p2.jpg")]
    names = sorted(os.path.basename(dst) for _, dst in summary.written)
    assert names[1] == "@0395201.31@5673135.24@32@U@051.20000@007.50000@@@@@@@@p1@.jpg"
    assert names[0] == bd.latlon_to_vg_name(-33.8568, -70.5, "p3", force_zone_number=32, force_northern=True)
    assert "put in UTM zone 32 as asked" in summary.zone_message and "both hemispheres" in summary.zone_message


def test_csv_without_header(tmp_path):
    _write_photo(str(tmp_path / "p1.jpg"))
    (tmp_path / "list.csv").write_text("# file,latitude,longitude\np1.jpg,51.2,7.5\n")
    assert bd.read_locations_csv(str(tmp_path / "list.csv")) == {str(tmp_path / "p1.jpg"): (51.2, 7.5)}


@pytest.mark.parametrize("content, message", [
    ("file,latitude,longitude\np1.jpg,north,7.5\n", r"line 2: latitude and longitude must be decimal degrees"),
    ("p1.jpg,151.2,7.5\n", r"line 1: .*out of range.*swapped"),
    ("p1.jpg,51.2,7.5\nmissing.jpg,51.2,7.5\n", r"line 2: the photo .*missing.jpg does not exist"),
    ("p1.jpg,51.2,7.5\np1.jpg,51.3,7.5\n", r"line 2: p1.jpg is listed twice"),
    ("name,lat,lon\np1.jpg,51.2,7.5\n", r"lacks a file, latitude or longitude column"),
    ("p1.jpg,51.2\n", r"line 1: expected file,latitude,longitude"),
])
def test_bad_csv_names_the_line(tmp_path, content, message):
    _write_photo(str(tmp_path / "p1.jpg"))
    (tmp_path / "list.csv").write_text(content)
    with pytest.raises(UserInputError, match="list.csv.*" + message if "line" in message else message):
        bd.read_locations_csv(str(tmp_path / "list.csv"))


def test_two_photos_with_the_same_name_and_place_are_refused(tmp_path):
    _write_photo(str(tmp_path / "a" / "p.jpg"))
    _write_photo(str(tmp_path / "b" / "p.jpg"))
    (tmp_path / "list.csv").write_text("a/p.jpg,51.2,7.5\nb/p.jpg,51.2,7.5\n")
    with pytest.raises(UserInputError, match="names would be used by several photos.*a/p.jpg and .*b/p.jpg"):
        bd.main(["--csv", str(tmp_path / "list.csv"), "--output_folder", str(tmp_path / "out"),
                 "--dataset_name", "toy", "--subfolder", "database"])


# ---------------------------------------------------------------------------------------------- command line

@pytest.mark.parametrize("flags", [
    ["--queries_every", "1"],
    ["--queries_every", "2", "--subfolder", "database"],
    [],  # neither --queries_every nor --subfolder
    ["--subfolder", "database", "--utm_zone", "61"],
    ["--subfolder", "database", "--split", "training"],
])
def test_bad_flags_exit_with_status_2(tmp_path, flags):
    with pytest.raises(SystemExit) as exit_info:
        bd.main(["--photos_folder", str(tmp_path), "--output_folder", str(tmp_path), "--dataset_name", "x"] + flags)
    assert exit_info.value.code == 2


def test_cli_runs_from_another_folder_and_reports_errors_in_one_line(tmp_path):
    _write_photo(str(tmp_path / "photos" / "c.jpg"))
    result = subprocess.run([sys.executable, os.path.join(REPO, "tools", "build_dataset.py"), "--photos_folder",
                             "photos", "--output_folder", "out", "--dataset_name", "x", "--queries_every", "2"],
                            cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: None of the 1 photos of photos (no GPS in their EXIF) has a position: photos/c.jpg."]
