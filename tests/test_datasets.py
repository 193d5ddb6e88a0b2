"""Reading the datasets_vg layout: paths, coordinates, positives, images and the query transforms."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import datasets_ws
from commons import UserInputError

REALDATA = os.path.join(os.path.dirname(__file__), "data", "realdata")
REAL_DATASETS = ["vprbench_corridor", "opensfm_lund", "gardenspoint_mini"]


def _write_image(path, size=(32, 24), color=(200, 100, 50), mode="RGB"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new(mode, size, color).save(path)


def _make_split(root, split, database_utms, queries_utms):
    for kind, utms in (("database", database_utms), ("queries", queries_utms)):
        for i, (east, north) in enumerate(utms):
            _write_image(os.path.join(root, "images", split, kind, f"@{east:.2f}@{north:.2f}@@@@@@@@@@@@{kind}{i}@.jpg"))


# ---------------------------------------------------------------------------------------------- coordinates

def test_parse_utm_reads_the_two_first_fields():
    assert datasets_ws.parse_utm("/a/b/@0500010.50@4000000.25@33@U@@@@@@@@@x@.jpg") == (500010.5, 4000000.25)


def test_parse_utm_ignores_at_signs_in_folders():
    assert datasets_ws.parse_utm("/data@home/x/@1@2@.jpg") == (1.0, 2.0)


@pytest.mark.parametrize("name", ["photo.jpg", "@12.5@.jpg", "@east@north@.jpg", "@1@@.jpg"])
def test_parse_utm_bad_names_name_the_file(name):
    with pytest.raises(UserInputError, match=name.replace(".", r"\.") + ".*@<utm_east>@<utm_north>"):
        datasets_ws.parse_utm(f"/data/{name}")


def test_find_positives_equals_plain_loop_including_the_boundary():
    rng = np.random.default_rng(0)
    database = rng.uniform(0, 100, size=(200, 2)).round()
    queries = rng.uniform(0, 100, size=(50, 2)).round()
    queries[0] = database[0] + [3, 4]  # exactly 5 m away: on the boundary, counts as positive
    radius = 5
    got = datasets_ws.find_positives(database, queries, radius)
    for q, query in enumerate(queries):
        expected = [d for d, db in enumerate(database) if np.hypot(*(db - query)) <= radius]
        assert got[q].tolist() == expected
    assert 0 in got[0].tolist()


# ---------------------------------------------------------------------------------------------- folders

def test_find_images_is_recursive_sorted_and_filters_extensions(tmp_path):
    for name in ["b/@1@1@.jpg", "a/@2@2@.JPEG", "@3@3@.png", "notes.txt", "c/d/@4@4@.jpg"]:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
    found = [os.path.relpath(p, tmp_path) for p in datasets_ws.find_images(str(tmp_path))]
    assert found == ["@3@3@.png", "a/@2@2@.JPEG", "b/@1@1@.jpg", "c/d/@4@4@.jpg"]


def test_geo_dataset_on_a_small_split(tmp_path):
    _make_split(str(tmp_path / "toy"), "test", [(0, 0), (10, 0), (100, 0)], [(1, 0), (500, 0)])
    dataset = datasets_ws.GeoDataset(str(tmp_path), "toy", "test", positive_dist_threshold=25)
    assert dataset.database_num == 3 and dataset.queries_num == 2
    assert dataset.images_paths == dataset.database_paths + dataset.queries_paths
    assert [p.tolist() for p in dataset.soft_positives_per_query] == [[0, 1], []]
    np.testing.assert_array_equal(dataset.queries_utms, [[1, 0], [500, 0]])


@pytest.mark.parametrize("dataset_name", REAL_DATASETS)
def test_real_datasets_positives_match_their_ground_truth(dataset_name):
    dataset = datasets_ws.GeoDataset(REALDATA, dataset_name, "test", positive_dist_threshold=25)
    with open(os.path.join(REALDATA, dataset_name, "ground_truth.json")) as file:
        ground_truth = json.load(file)["positives"]
    assert len(ground_truth) == dataset.queries_num
    for query_path, positives in zip(dataset.queries_paths, dataset.soft_positives_per_query):
        got = sorted(os.path.basename(dataset.database_paths[i]) for i in positives)
        assert got == sorted(ground_truth[os.path.basename(query_path)])


@pytest.mark.parametrize("broken,message", [
    ("no_dataset", "Dataset folder .* does not exist"),
    ("no_split", "The test split is missing"),
    ("no_database", "Missing folder .*database"),
    ("empty_queries", "No images in .*queries"),
    ("bad_name", "Cannot read UTM coordinates from the file name of .*photo.jpg"),
])
def test_geo_dataset_errors_name_the_path(tmp_path, broken, message):
    root = tmp_path / "toy"
    if broken != "no_dataset":
        _make_split(str(root), "val", [(0, 0)], [(0, 0)])
    if broken not in ("no_dataset", "no_split"):
        _make_split(str(root), "test", [(0, 0)], [(0, 0)])
    if broken == "no_database":
        for path in (root / "images/test/database").iterdir():
            path.unlink()
        (root / "images/test/database").rmdir()
    if broken == "empty_queries":
        for path in (root / "images/test/queries").iterdir():
            path.unlink()
    if broken == "bad_name":
        _write_image(str(root / "images/test/queries/photo.jpg"))
    with pytest.raises(UserInputError, match=message):
        datasets_ws.GeoDataset(str(tmp_path), "toy", "test")


# ---------------------------------------------------------------------------------------------- images

@pytest.mark.parametrize("content", [b"", b"not an image at all", "truncated"])
def test_unreadable_images_name_the_file(tmp_path, content):
    path = tmp_path / "@1@2@.jpg"
    if content == "truncated":
        _write_image(str(tmp_path / "full.jpg"), size=(200, 200))
        content = (tmp_path / "full.jpg").read_bytes()[:300]
    path.write_bytes(content)
    with pytest.raises(UserInputError, match=r"Cannot read the image .*@1@2@\.jpg"):
        datasets_ws.open_image(str(path))


@pytest.mark.parametrize("mode,color", [("L", 128), ("RGBA", (10, 20, 30, 40)), ("P", 3), ("CMYK", (0, 0, 0, 0))])
def test_other_image_modes_become_rgb(tmp_path, mode, color):
    path = str(tmp_path / "image.png") if mode != "CMYK" else str(tmp_path / "image.jpg")
    _write_image(path, mode=mode, color=color)
    image = datasets_ws.open_image(path)
    assert image.mode == "RGB" and image.size == (32, 24)


def test_sixteen_bit_greyscale_is_rescaled_not_clipped(tmp_path):
    array = np.array([[0, 1000], [30000, 65535]], dtype=np.uint16)
    path = str(tmp_path / "depth.png")
    Image.fromarray(array).save(path)
    image = np.asarray(datasets_ws.open_image(path))
    assert image.shape == (2, 2, 3)
    assert image[0, 0, 0] == 0 and image[1, 1, 0] == 255 and 100 < image[1, 0, 0] < 130


def test_load_image_tensor_normalises_with_imagenet_statistics(tmp_path):
    path = str(tmp_path / "grey.png")
    _write_image(path, color=(255, 0, 128), mode="RGB")
    tensor = datasets_ws.load_image_tensor(path)
    assert tensor.shape == (3, 24, 32)
    expected = [(1 - 0.485) / 0.229, (0 - 0.456) / 0.224, (128 / 255 - 0.406) / 0.225]
    assert torch.allclose(tensor[:, 0, 0], torch.tensor(expected), atol=1e-5)


# ---------------------------------------------------------------------------------------------- query transforms

def test_transform_shapes():
    image = torch.rand(3, 480, 800)
    assert datasets_ws.hard_resize(image, (240, 320)).shape == (3, 240, 320)
    assert datasets_ws.resize_shorter_side(image, (240, 320)).shape == (3, 240, 400)
    assert datasets_ws.central_crop(image, (240, 320)).shape == (3, 240, 320)
    assert datasets_ws.five_crops(image, (240, 320)).shape == (5, 3, 240, 240)


def test_central_crop_scales_by_the_larger_ratio_then_crops_the_centre():
    # 4x8 image, target 4x4: scale 1, keep columns 2..5
    image = torch.arange(32, dtype=torch.float32).view(1, 4, 8).expand(3, -1, -1).contiguous()
    assert torch.equal(datasets_ws.central_crop(image, (4, 4)), image[:, :, 2:6])
    # 2x2 image, target 4x4: nearest upscale by 2
    small = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).expand(3, -1, -1)
    expected = torch.tensor([[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4], [3, 3, 4, 4]], dtype=torch.float32)
    assert torch.equal(datasets_ws.central_crop(small, (4, 4))[0], expected)


def test_five_crops_order_is_tl_tr_bl_br_centre():
    image = torch.arange(36, dtype=torch.float32).view(1, 6, 6).expand(3, -1, -1).contiguous()
    # a square image at the crop size: every crop is the whole image
    crops = datasets_ws.five_crops(image, (6, 6))
    assert all(torch.equal(crop, image) for crop in crops)
    wide = torch.arange(24, dtype=torch.float32).view(1, 4, 6).expand(3, -1, -1).contiguous()
    crops = datasets_ws.five_crops(wide, (4, 8))  # shorter side 4: no resize, 4x4 crops of a 4x6 image
    assert torch.equal(crops[0], wide[:, :, 0:4]) and torch.equal(crops[1], wide[:, :, 2:6])
    assert torch.equal(crops[4], wide[:, :, 1:5])


def test_images_dataset_yields_tensor_and_index(tmp_path):
    paths = []
    for i in range(3):
        paths.append(str(tmp_path / f"@{i}@0@.jpg"))
        _write_image(paths[-1], size=(40, 30))
    dataset = datasets_ws.ImagesDataset(paths, datasets_ws.hard_resize, (12, 16))
    image, index = dataset[2]
    assert image.shape == (3, 12, 16) and index == 2 and len(dataset) == 3
