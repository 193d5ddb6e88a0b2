"""Tiny datasets in the datasets_vg layout for tests that run the real scripts: noise pictures of a few pixels,
placed along one street so that each query has exactly the positives the test says."""
import os
import zlib

import numpy as np
from PIL import Image

# Database images every 100 m along the x axis (UTM east), queries 2 m after the first ones: each query has one
# positive within 25 m (and within the 10 m of training)
DATABASE_EASTINGS = tuple(range(0, 600, 100))
QUERIES_EASTINGS = (2, 102, 202)
TRAIN_DATABASE_EASTINGS = tuple(range(0, 1200, 100))
TRAIN_QUERIES_EASTINGS = (2, 102, 202, 302, 402, 502)
PICTURE_SIZE = 16


def image_name(east, north=0.0, extension=".png"):
    """A datasets_vg file name: @utm_east@utm_north@...@.png"""
    return f"@{east:.2f}@{north:.2f}@{extension}"


def noise_picture(key, size=PICTURE_SIZE):
    """A reproducible RGB noise picture [size, size, 3] uint8 for any string `key`; it holds both 0 and 255, so
    that a 16-bit copy (x 257) rescales back to exactly these values."""
    pixels = np.random.default_rng(zlib.crc32(key.encode())).integers(0, 256, (size, size, 3), dtype=np.uint8)
    pixels[0, 0], pixels[0, 1] = 0, 255
    return pixels


def write_images(folder, eastings, key):
    """One noise PNG per easting in `folder`; returns the paths."""
    os.makedirs(folder, exist_ok=True)
    paths = []
    for east in eastings:
        path = os.path.join(folder, image_name(east))
        Image.fromarray(noise_picture(f"{key}/{east}")).save(path)
        paths.append(path)
    return paths


def write_split(datasets_folder, dataset_name, split, database_eastings=DATABASE_EASTINGS,
                queries_eastings=QUERIES_EASTINGS):
    """<datasets_folder>/<dataset_name>/images/<split>/{database,queries}; returns the split's folder."""
    split_folder = os.path.join(datasets_folder, dataset_name, "images", split)
    for kind, eastings in (("database", database_eastings), ("queries", queries_eastings)):
        write_images(os.path.join(split_folder, kind), eastings, f"{dataset_name}/{split}/{kind}")
    return split_folder


def write_dataset(datasets_folder, dataset_name, splits=("test",)):
    """A dataset with the given splits; train gets a longer street (enough negatives to mine)."""
    for split in splits:
        if split == "train":
            write_split(datasets_folder, dataset_name, split, TRAIN_DATABASE_EASTINGS, TRAIN_QUERIES_EASTINGS)
        else:
            write_split(datasets_folder, dataset_name, split)
    return os.path.join(datasets_folder, dataset_name)
