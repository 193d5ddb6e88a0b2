"""Saved predictions (CSV columns and values), pictures (PNG images, frame colours) and descriptors (.npy)."""
import csv
import os

import numpy as np
from PIL import Image

import predictions


def _images(folder, count, size=(40, 30)):
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i in range(count):
        path = os.path.join(folder, f"@{10 * i}.00@0.00@@image{i}@.png")
        Image.new("RGB", size, (20 * i, 100, 200)).save(path)
        paths.append(path)
    return paths


def test_csv_and_pictures_with_positives(tmp_path):
    database_paths = _images(str(tmp_path / "database"), 4)
    queries_paths = _images(str(tmp_path / "queries"), 2, size=(30, 40))
    top = np.array([[1, 0], [3, 2]])
    squared = np.array([[0.25, 1.0], [4.0, 9.0]], dtype=np.float32)
    positives = [np.array([0]), np.array([3, 2])]
    mask = np.array([[False, True], [True, True]])
    utms = np.array([[0.0, 0.0], [10.0, 0.0], [20.0, 0.0], [30.0, 0.0]])
    folder = predictions.save_predictions(str(tmp_path / "run"), queries_paths, database_paths, top, squared, 0,
                                          positives, mask, utms[:2], utms)
    with open(os.path.join(folder, "predictions.csv"), newline="") as file:
        rows = list(csv.DictReader(file))
    fields = ("query_index", "rank", "database_index", "distance", "is_positive", "utm_distance_m")
    assert [tuple(row[field] for field in fields) for row in rows] == [
        ("0", "1", "1", "0.500000", "False", "10.00"), ("0", "2", "0", "1.000000", "True", "0.00"),
        ("1", "1", "3", "2.000000", "True", "20.00"), ("1", "2", "2", "3.000000", "True", "10.00")]
    assert rows[0]["query_path"] == queries_paths[0] and rows[0]["database_path"] == database_paths[1]

    with Image.open(os.path.join(folder, "query_00000.png")) as picture:
        assert picture.format == "PNG"
        picture = picture.convert("RGB")
        # Query tile, then the predictions: wrong (red frame), right (green frame)
        query_width = round(30 * predictions.THUMBNAIL_HEIGHT / 40) + 2 * predictions.FRAME_WIDTH
        first_x = query_width + predictions.FRAME_WIDTH
        tile_width = round(40 * predictions.THUMBNAIL_HEIGHT / 30) + 2 * predictions.FRAME_WIDTH
        assert picture.getpixel((first_x + 1, 1)) == predictions.COLOURS[False]
        assert picture.getpixel((first_x + tile_width + predictions.FRAME_WIDTH + 1, 1)) == predictions.COLOURS[True]
        assert picture.width == query_width + 2 * (tile_width + predictions.FRAME_WIDTH)
    assert sorted(os.listdir(folder)) == ["predictions.csv", "query_00000.png", "query_00001.png"]


def test_csv_without_positions_and_a_sample_of_pictures(tmp_path, monkeypatch):
    monkeypatch.setattr(predictions, "PICTURED_QUERIES_NUM", 3)
    database_paths = _images(str(tmp_path / "database"), 3)
    queries_paths = _images(str(tmp_path / "queries"), 5)
    top = np.array([[0], [1], [2], [0], [1]])
    folder = predictions.save_predictions(str(tmp_path / "run"), queries_paths, database_paths, top,
                                          np.zeros((5, 1), dtype=np.float32), 7)
    with open(os.path.join(folder, "predictions.csv"), newline="") as file:
        rows = list(csv.DictReader(file))
    assert list(rows[0]) == ["query_index", "query_path", "rank", "database_index", "database_path", "distance"]
    pictures = sorted(name for name in os.listdir(folder) if name.endswith(".png"))
    expected = sorted(np.random.default_rng(7).choice(5, 3, replace=False).tolist())
    assert pictures == [f"query_{q:05d}.png" for q in expected]
    with Image.open(os.path.join(folder, pictures[0])) as picture:
        assert picture.convert("RGB").getpixel((picture.width - 2, 1)) == predictions.COLOURS[None]


def test_descriptor_writer_fills_npy_files_batch_by_batch(tmp_path):
    writer = predictions.DescriptorWriter(str(tmp_path), ["d0", "d1", "d2"], ["q0", "q1"])
    writer("database", np.array([2]), np.full((1, 4), 2.0, dtype=np.float32))
    writer("database", np.array([0, 1]), np.array([[0.0] * 4, [1.0] * 4], dtype=np.float32))
    writer("queries", np.array([0, 1]), np.ones((2, 5, 4), dtype=np.float32))  # per-crop descriptors
    writer.close()
    database = np.load(tmp_path / "database_descriptors.npy")
    assert database.dtype == np.float32 and database.tolist() == [[0.0] * 4, [1.0] * 4, [2.0] * 4]
    assert np.load(tmp_path / "queries_descriptors.npy").shape == (2, 5, 4)
    assert (tmp_path / "database_paths.txt").read_text().splitlines() == ["d0", "d1", "d2"]
    assert (tmp_path / "queries_paths.txt").read_text().splitlines() == ["q0", "q1"]


def test_log_matches_lists_each_query_top_k(caplog):
    caplog.set_level("INFO")
    predictions.log_matches(["q.jpg"], ["a.jpg", "b.jpg"], np.array([[1, 0]]), np.array([[0.04, 1.0]]))
    assert caplog.messages == ["Query 0: q.jpg\n  1. b.jpg (distance 0.2000)\n  2. a.jpg (distance 1.0000)"]
