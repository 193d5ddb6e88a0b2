"""Saving what a test found, for people and other tools: per-query top-K predictions as CSV, pictures of a
sample of queries with their top-K, and the descriptors as .npy with their image paths."""
import csv
import logging
import os

import numpy as np
from numpy.lib.format import open_memmap
from PIL import Image, ImageDraw, ImageFont

import datasets_ws
from commons import progress_bar

PREDICTIONS_FOLDER = "predictions"
PREDICTIONS_CSV = "predictions.csv"
PICTURED_QUERIES_NUM = 20
THUMBNAIL_HEIGHT = 160
FRAME_WIDTH = 6
CAPTION_HEIGHT = 18
COLOURS = {True: (0, 170, 0), False: (210, 0, 0), None: (128, 128, 128)}  # right, wrong, unknown
DESCRIPTOR_FILES = {"database": ("database_descriptors.npy", "database_paths.txt"),
                    "queries": ("queries_descriptors.npy", "queries_paths.txt")}


def l2_distances(squared_distances):
    """faiss returns squared L2 distances; people read plain ones (tiny negative rounding errors become 0)."""
    return np.sqrt(np.maximum(squared_distances, 0))


def prediction_rows(queries_paths, database_paths, predictions, distances, positives_per_query=None,
                    queries_utms=None, database_utms=None):
    """One dict per (query, rank): query_index, query_path, rank (from 1), database_index, database_path,
    distance (L2 between descriptors) and, when positives are known, is_positive and utm_distance_m."""
    with_positions = positives_per_query is not None
    for q, query_path in enumerate(queries_paths):
        positives = set(np.asarray(positives_per_query[q]).tolist()) if with_positions else None
        for rank, (d, distance) in enumerate(zip(predictions[q], l2_distances(distances[q])), start=1):
            row = {"query_index": q, "query_path": query_path, "rank": rank, "database_index": int(d),
                   "database_path": database_paths[d], "distance": f"{distance:.6f}"}
            if with_positions:
                row["is_positive"] = int(d) in positives
                row["utm_distance_m"] = f"{np.hypot(*(queries_utms[q] - database_utms[d])):.2f}"
            yield row


def write_predictions_csv(path, rows):
    rows = list(rows)
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]) if rows else ["query_index"])
        writer.writeheader()
        writer.writerows(rows)


def sample_queries(queries_num, seed, sample_size=None):
    """A seeded sample of `sample_size` (default PICTURED_QUERIES_NUM) query indices, all of them when there are
    few, in order."""
    sample_size = sample_size or PICTURED_QUERIES_NUM
    if queries_num <= sample_size:
        return list(range(queries_num))
    return sorted(np.random.default_rng(seed).choice(queries_num, sample_size, replace=False).tolist())


def _thumbnail(path, colour):
    image = datasets_ws.open_image(path)
    width = max(1, round(image.width * THUMBNAIL_HEIGHT / image.height))
    image = image.resize((width, THUMBNAIL_HEIGHT))
    framed = Image.new("RGB", (width + 2 * FRAME_WIDTH, THUMBNAIL_HEIGHT + 2 * FRAME_WIDTH), colour)
    framed.paste(image, (FRAME_WIDTH, FRAME_WIDTH))
    return framed


def prediction_picture(query_path, predicted_paths, correct, captions):
    """The query (blue frame) followed by its predictions, each framed green when right, red when wrong,
    grey when unknown, with a caption under each."""
    tiles = [_thumbnail(query_path, (40, 90, 220))]
    tiles += [_thumbnail(path, COLOURS[is_right]) for path, is_right in zip(predicted_paths, correct)]
    captions = ["query"] + list(captions)
    picture = Image.new("RGB", (sum(t.width for t in tiles) + FRAME_WIDTH * (len(tiles) - 1),
                                tiles[0].height + CAPTION_HEIGHT), (255, 255, 255))
    draw = ImageDraw.Draw(picture)
    font = ImageFont.load_default()
    x = 0
    for tile, caption in zip(tiles, captions):
        picture.paste(tile, (x, 0))
        draw.text((x + 2, tile.height + 2), caption, fill=(0, 0, 0), font=font)
        x += tile.width + FRAME_WIDTH
    return picture


def save_prediction_pictures(folder, query_indices, queries_paths, database_paths, predictions, distances,
                             positives_mask=None, queries_utms=None, database_utms=None):
    """One PNG per query of `query_indices`: query_<index>.png. Returns the paths written."""
    written = []
    for q in progress_bar(query_indices, "Prediction pictures", unit="queries"):
        correct = positives_mask[q] if positives_mask is not None else [None] * len(predictions[q])
        captions = []
        for rank, (d, distance) in enumerate(zip(predictions[q], l2_distances(distances[q])), start=1):
            caption = f"{rank}. d={distance:.3f}"
            if queries_utms is not None:
                caption += f", {np.hypot(*(queries_utms[q] - database_utms[d])):.0f} m"
            captions.append(caption)
        picture = prediction_picture(queries_paths[q], [database_paths[d] for d in predictions[q]],
                                     [None if c is None else bool(c) for c in correct], captions)
        path = os.path.join(folder, f"query_{q:05d}.png")
        picture.save(path)
        written.append(path)
    return written


def save_predictions(output_folder, queries_paths, database_paths, predictions, distances, seed,
                     positives_per_query=None, positives_mask=None, queries_utms=None, database_utms=None):
    """<output_folder>/predictions/: predictions.csv (every query) and query_<index>.png (a sample).
    Returns the predictions folder."""
    folder = os.path.join(output_folder, PREDICTIONS_FOLDER)
    os.makedirs(folder, exist_ok=True)
    write_predictions_csv(os.path.join(folder, PREDICTIONS_CSV),
                          prediction_rows(queries_paths, database_paths, predictions, distances,
                                          positives_per_query, queries_utms, database_utms))
    pictured = sample_queries(len(queries_paths), seed)
    save_prediction_pictures(folder, pictured, queries_paths, database_paths, predictions, distances,
                             positives_mask, queries_utms, database_utms)
    logging.info(f"Predictions of {len(queries_paths)} queries saved in {folder}/{PREDICTIONS_CSV}, pictures of "
                 f"{len(pictured)} of them in {folder}/")
    return folder


def log_matches(queries_paths, database_paths, predictions, distances):
    """Each query's top-K matches, nearest first, on the console and in info.log."""
    for q, query_path in enumerate(queries_paths):
        lines = [f"Query {q}: {query_path}"]
        lines += [f"  {rank}. {database_paths[d]} (distance {distance:.4f})"
                  for rank, (d, distance) in enumerate(zip(predictions[q], l2_distances(distances[q])), start=1)]
        logging.info("\n".join(lines))


class DescriptorWriter:
    """Callback for test.retrieve(on_descriptors=...): writes database_descriptors.npy and queries_descriptors.npy
    (float32, row i = image i of the paths files database_paths.txt / queries_paths.txt) batch by batch, through
    memory-mapped files, so that the low-RAM test stays low-RAM. Crop methods that search with every crop
    (nearest_crop, maj_voting) save queries as [queries_num, crops_num, dim]."""

    def __init__(self, folder, database_paths, queries_paths):
        self.folder = folder
        self.paths = {"database": list(database_paths), "queries": list(queries_paths)}
        self.arrays = {}
        for kind, (_, paths_file) in DESCRIPTOR_FILES.items():
            with open(os.path.join(folder, paths_file), "w") as file:
                file.writelines(path + "\n" for path in self.paths[kind])

    def __call__(self, kind, indices, descriptors):
        if kind not in self.arrays:
            self.arrays[kind] = open_memmap(os.path.join(self.folder, DESCRIPTOR_FILES[kind][0]), mode="w+",
                                            dtype=np.float32, shape=(len(self.paths[kind]),) + descriptors.shape[1:])
        self.arrays[kind][indices] = descriptors

    def close(self):
        for array in self.arrays.values():
            array.flush()
        self.arrays.clear()
        logging.info(f"Descriptors saved in {self.folder}/{DESCRIPTOR_FILES['database'][0]} and "
                     f"{DESCRIPTOR_FILES['queries'][0]}, their image paths in the .txt files beside them")
