"""A procedurally rendered street world, written in the datasets_vg layout, for demos and tests.

Each split is one straight street, kilometres away from the other splits' streets, lined with buildings
(per-building colour, material, window grid, shop signs), trees, lamp posts, road signs and parked cars,
drawn in perspective by a pinhole camera that looks along the street. Database cameras drive along the
street in both directions, one every DATABASE_SPACING_M metres per direction; queries stand at random
places on the street with a small change of viewpoint (position, heading, height, pitch, field of view),
under another sky, among other passing cars, with blur and noise. As the camera looks along the street, two
places 25 m apart share many of the buildings they see, while 100 m and more apart they see mostly different
ones (haze fades what is far away), so retrieval can be learned.

Queries keep the database's light and colours, so that a few minutes of training from random weights on the
CPU (the demo) learn something that holds on a street never seen in training: what identifies a place across
a change of viewpoint. Measured with ResNet-18 conv4 from random weights, 600 triplets at 96x128, on a test
street of 400 database images and 300 queries (chance R@1 about 5 %): test R@1 went from 24-34 untrained to
44-52 trained; the demo's 1,200 triplets (NetVLAD, 16 clusters) take its test street from R@1 35 to 73.
Giving each query another light and colour (exposure, contrast, saturation, white balance, gamma), or all of
them a dusk light or a colour cast, left both the untrained and the trained model near
chance on the test street, even after three times longer training: the layers that stay frozen (random)
pass the colour change on, and what is trained did not learn to undo it, though it learned to recognise the
training street's places. Halving those changes halved the gain.

Training queries "without positives": the training database has a few holes (GAP_LENGTH_M metres longer
than the usual spacing) and `train_far_queries_num` training queries stand inside them, more than 10 m
(the training positives threshold) from every database image but within 25 m of some. Every other query
has a database image within 10 m. Val and test have no holes.

File names: `@<utm_east>@<utm_north>@@@@@@@<heading>@@@@@<note>@.jpg`, the 16 `@`-separated fields of
datasets_vg with UTM east/north in metres (two decimals), the compass heading in degrees and a note
`<split>_<database|queries>_<index>`.

The output is deterministic for a seed: the same arguments give the same bytes, whatever `processes`.

Usage:
    python make_synthetic_dataset.py --datasets_folder data/datasets --dataset_name synthetic
"""
import argparse
import colorsys
import json
import math
import multiprocessing
import os
import shutil
import sys
import time
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageFilter

SPLITS = ("train", "val", "test")
SUBFOLDERS = ("database", "queries")
MARKER_NAME = ".complete"  # written last: a dataset folder without it is incomplete
FORMAT_VERSION = 2  # raise when the rendering changes, so that old sets are not silently reused
JPEG_QUALITY = 90
DEFAULT_SIZES = {"train": (600, 300), "val": (200, 100), "test": (200, 100)}  # (database, queries): the demo's set

# Camera plan (metres, local street frame: x along the street, y to the left of the +x direction)
DATABASE_SPACING_M = 5.0
LANE_OFFSET_M = 2.0  # database cameras drive in the right-hand lane of their direction
DATABASE_CAMERA_HEIGHT_M = 2.5
QUERY_LATERAL_RANGE_M = 4.0
QUERY_HEADING_STD_DEG = 8.0
QUERY_HEADING_MAX_DEG = 20.0
GAP_LENGTH_M = 40.0
GAPS_MAX_NUM = 3
FAR_QUERY_MIN_ALONG_M = 10.5  # along-street distance from a hole's edges: > 10 m from any database image
DEFAULT_FAR_QUERIES_FRACTION = 0.03
SPLITS_SEPARATION_M = 3000.0
FIRST_STREET_ORIGIN_UTM = (500000.0, 4100000.0)
STREET_MAX_ANGLE_DEG = 30.0

# World and rendering
HFOV_DEG = 75.0
VIEW_DISTANCE_M = 320.0
SPRITE_DISTANCE_M = 200.0  # farther, haze leaves little of a tree or a car
HAZE_DISTANCE_M = 120.0
ROAD_HALF_WIDTH_M = 6.0
FACADE_Y_M = 9.5
BACK_ROW_Y_M = 38.0
WALL_LAYERS = 3  # nearest walls drawn per image column: enough for taller buildings behind lower ones

SKY_PALETTES = (  # (zenith, horizon) colours
    ((0.35, 0.55, 0.85), (0.75, 0.85, 0.95)),
    ((0.55, 0.60, 0.68), (0.80, 0.82, 0.84)),
    ((0.30, 0.40, 0.70), (0.95, 0.75, 0.55)),
    ((0.45, 0.65, 0.90), (0.90, 0.93, 0.97)),
)
WINDOW_COLOURS = ((0.12, 0.16, 0.24), (0.20, 0.22, 0.24), (0.15, 0.25, 0.22), (0.45, 0.55, 0.65))
SIGN_PLATE_COLOURS = ((0.80, 0.10, 0.10), (0.10, 0.25, 0.75), (0.95, 0.80, 0.10), (0.10, 0.55, 0.25))

TREE, LAMP, SIGN, CAR = range(4)


class Camera(NamedTuple):
    x: float  # metres along the street
    y: float  # metres across the street, positive to the left of the +x direction
    heading: float  # radians, 0 looks towards +x
    height: float  # metres above the ground
    pitch: float  # horizon shift as a fraction of the image height
    hfov_deg: float


class World:
    """The static content of one street: wall segments, building parameters, sprites and crossings."""

    def __init__(self, rng, x_min, x_max):
        self.salt = int(rng.integers(1, 2**31))
        self.crossings = _make_crossings(rng, x_min, x_max)
        self.sun = _unit(rng.uniform(0, 2 * np.pi))
        self.asphalt = rng.uniform(0.28, 0.38)
        self.pavement_rgb = rng.uniform(0.55, 0.75) * np.array([1.0, 0.97, 0.92]) * rng.uniform(0.95, 1.05, 3)
        self.marking_rgb = np.array([0.92, 0.92, 0.88]) if rng.random() < 0.6 else np.array([0.92, 0.78, 0.2])
        buildings, segments = [], []
        for side in (1.0, -1.0):
            _add_front_row(rng, side, x_min, x_max, self.crossings, buildings, segments)
            _add_back_row(rng, side, x_min - 60.0, x_max + 60.0, buildings, segments)
        self.buildings = {key: _compact(np.array([b[key] for b in buildings])) for key in buildings[0]}
        self.segments = {key: np.array([s[key] for s in segments]) for key in segments[0]}
        p0, p1 = self.segments["p0"], self.segments["p1"]
        self.segments["length"] = np.linalg.norm(p1 - p0, axis=1)
        normal = self.segments["normal"]
        self.segments["shade"] = 0.72 + 0.28 * np.clip(normal @ self.sun, 0, 1)
        self.sprites = _make_sprites(rng, x_min, x_max, self.crossings)


def _compact(array):
    """float32 for per-pixel maths: half the memory traffic of float64."""
    return array.astype(np.float32) if array.dtype == np.float64 else array


def _unit(angle):
    return np.array([math.cos(angle), math.sin(angle)])


def _hsv_to_rgb(h, s, v):
    return np.array(colorsys.hsv_to_rgb(h, s, v))


def _make_crossings(rng, x_min, x_max):
    crossings, x = [], x_min + rng.uniform(20, 80)
    while x < x_max:
        width = rng.uniform(12, 16)
        crossings.append((x, x + width))
        x += width + rng.uniform(90, 180)
    return np.array(crossings).reshape(-1, 2)


def _building_params(rng, floors_range, front):
    floor_h = rng.uniform(2.9, 3.6)
    floors = int(rng.integers(*floors_range))
    win_w = rng.uniform(0.8, 1.8)
    base = _hsv_to_rgb(rng.random(), rng.uniform(0.1, 0.6), rng.uniform(0.45, 0.92))
    frame = (np.array([0.9, 0.9, 0.88]), np.array([0.15, 0.15, 0.15]), base * 0.7)[int(rng.integers(3))]
    return dict(
        height=floors * floor_h + rng.uniform(0.3, 1.0), base=base,
        kind=int(rng.integers(4)), floor_h=floor_h, win_w=win_w,
        win_h=rng.uniform(1.1, min(2.2, floor_h - 0.6)),
        win_spacing=win_w + rng.uniform(0.8, 2.5), win_offset=rng.uniform(0, 3.0),
        win_rgb=np.array(WINDOW_COLOURS[int(rng.integers(len(WINDOW_COLOURS)))]) * rng.uniform(0.8, 1.2),
        frame_rgb=frame, shop=bool(front and rng.random() < 0.5),
        sign_rgb=_hsv_to_rgb(rng.random(), rng.uniform(0.6, 1.0), rng.uniform(0.55, 1.0)),
        letter_rgb=np.array([0.95, 0.95, 0.95]) if rng.random() < 0.6 else np.array([0.08, 0.08, 0.08]),
    )


def _add_wall(segments, p0, p1, building, facade):
    direction = (np.asarray(p1) - np.asarray(p0)) / np.linalg.norm(np.asarray(p1) - np.asarray(p0))
    segments.append(dict(p0=np.asarray(p0, float), p1=np.asarray(p1, float), building=building, facade=facade,
                         normal=np.array([-direction[1], direction[0]])))


def _add_front_row(rng, side, x_min, x_max, crossings, buildings, segments):
    """Buildings along one side of the street, interrupted by crossings and the odd alley."""
    x = x_min
    while x < x_max:
        inside = (crossings[:, 0] <= x) & (x < crossings[:, 1])
        if inside.any():
            x = float(crossings[inside, 1][0])
            continue
        ahead = crossings[crossings[:, 0] > x, 0]
        width = min(rng.uniform(7, 22), (ahead[0] if len(ahead) else np.inf) - x)
        if width < 4:
            x += width
            continue
        facade_y = side * (FACADE_Y_M + (0.0 if rng.random() < 0.7 else rng.uniform(0.5, 2.5)))
        back_y = facade_y + side * rng.uniform(10, 18)
        index = len(buildings)
        buildings.append(_building_params(rng, (2, 8), front=True))
        # Walls face the street: the normal of p0 -> p1 points to its left.
        if side > 0:
            _add_wall(segments, (x + width, facade_y), (x, facade_y), index, True)
            _add_wall(segments, (x, facade_y), (x, back_y), index, False)
            _add_wall(segments, (x + width, back_y), (x + width, facade_y), index, False)
        else:
            _add_wall(segments, (x, facade_y), (x + width, facade_y), index, True)
            _add_wall(segments, (x, back_y), (x, facade_y), index, False)
            _add_wall(segments, (x + width, facade_y), (x + width, back_y), index, False)
        x += width + (rng.uniform(2, 5) if rng.random() < 0.15 else 0.0)


def _add_back_row(rng, side, x_min, x_max, buildings, segments):
    """Taller buildings behind, seen above the front row and through alleys and crossings."""
    x = x_min
    while x < x_max:
        width = rng.uniform(15, 40)
        index = len(buildings)
        buildings.append(_building_params(rng, (5, 15), front=False))
        y = side * BACK_ROW_Y_M
        ends = ((x + width, y), (x, y)) if side > 0 else ((x, y), (x + width, y))
        _add_wall(segments, *ends, index, True)
        x += width


def _make_sprites(rng, x_min, x_max, crossings):
    """Trees, lamp posts, road signs and parked cars: kind, position, sizes and two colours each."""
    sprites = []

    def free(x):
        return not ((crossings[:, 0] - 2 <= x) & (x <= crossings[:, 1] + 2)).any()

    for side in (1.0, -1.0):
        x = x_min + rng.uniform(0, 10)
        while x < x_max:  # trees
            if free(x):
                crown = _hsv_to_rgb(rng.uniform(0.2, 0.38) if rng.random() < 0.85 else rng.uniform(0.03, 0.12),
                                    rng.uniform(0.45, 0.8), rng.uniform(0.3, 0.6))
                sprites.append((TREE, x, side * 8.3, (rng.uniform(1.3, 2.6), rng.uniform(1.6, 3.0),
                                                      rng.uniform(3.8, 5.5), rng.uniform(0.2, 0.4)),
                                crown, np.array([0.35, 0.25, 0.15]) * rng.uniform(0.7, 1.2)))
            x += rng.uniform(8, 30)
        x = x_min + rng.uniform(0, 10)
        while x < x_max:  # parked cars
            if free(x) and rng.random() < 0.5:
                body = _hsv_to_rgb(rng.random(), rng.uniform(0, 0.9), rng.uniform(0.2, 0.95))
                sprites.append((CAR, x, side * 4.9, (rng.uniform(1.7, 1.95), rng.uniform(1.4, 1.6), 0, 0),
                                body, np.array([0.1, 0.12, 0.15])))
            x += rng.uniform(5.5, 12)
        x = x_min + rng.uniform(0, 60)
        while x < x_max:  # road signs
            if free(x):
                sprites.append((SIGN, x, side * 6.6, (rng.uniform(0.5, 0.9), rng.uniform(2.0, 2.8),
                                                      float(rng.integers(2)), 0),
                                np.array(SIGN_PLATE_COLOURS[int(rng.integers(len(SIGN_PLATE_COLOURS)))]),
                                np.array([0.6, 0.6, 0.6])))
            x += rng.uniform(30, 90)
    x, side = x_min, 1.0
    while x < x_max:  # lamp posts, alternating sides
        sprites.append((LAMP, x, side * 6.5, (rng.uniform(6.5, 8.0), 0.16, 0, 0),
                        np.array([0.25, 0.25, 0.27]), np.array([0.95, 0.92, 0.7])))
        x += rng.uniform(22, 32)
        side = -side
    sprites.sort(key=lambda sprite: sprite[1])
    return dict(kind=np.array([s[0] for s in sprites]), x=np.array([s[1] for s in sprites]),
                y=np.array([s[2] for s in sprites]), size=np.array([s[3] for s in sprites]),
                rgb=np.array([s[4] for s in sprites]), rgb2=np.array([s[5] for s in sprites]))


# ----------------------------------------------------------------------------------------------------------
# Rendering

def _hash01(salt, *keys):
    """Deterministic pseudo-random values in [0, 1) for integer keys: a place always looks the same."""
    h = np.full(np.shape(keys[0]), salt & 0xFFFFFFFF, dtype=np.uint32)
    for key in keys:
        h ^= np.asarray(key).astype(np.int64).astype(np.uint32)
        h *= np.uint32(0x9E3779B1)
        h ^= h >> np.uint32(16)
        h *= np.uint32(0x85EBCA6B)
        h ^= h >> np.uint32(13)
    return (h >> np.uint32(8)).astype(np.float32) / np.float32(1 << 24)


def _detail(size_m, footprint_m):
    """How much of a pattern of `size_m` metres survives at `footprint_m` metres per pixel (cheap anti-aliasing)."""
    return np.clip(size_m / footprint_m - 1.0, 0.0, 1.0)


def _facade_colours(world, building, segment, u, z, footprint):
    """Colours of wall points: u metres along the wall from its start, z metres above the ground."""
    B, salt = world.buildings, world.salt
    kind, floor_h, height = B["kind"][building], B["floor_h"][building], B["height"][building]
    # Material (bricks, siding, panels), floor bands and the parapet darken the base colour
    brick = ((z % 0.3) < 0.05) | (((u + 0.35 * (np.floor(z / 0.3) % 2)) % 0.7) < 0.06)
    pattern = np.where(kind == 1, brick, np.where(kind == 2, (z % 0.45) < 0.07, (kind == 3) & ((u % 1.6) < 0.12)))
    factor = 0.88 + 0.24 * _hash01(salt, building, np.floor(u), np.floor(z))
    factor *= 1.0 - 0.3 * pattern * _detail(0.08, footprint)
    factor *= 1.0 - 0.15 * ((z % floor_h) < 0.25) * _detail(0.25, footprint)
    factor *= 1.0 - 0.25 * (z > height - 0.5)
    rgb = B["base"][building] * factor[:, None]

    # Window grid, with a per-window brightness (curtains, lights) that belongs to the place
    length = world.segments["length"][segment]
    allowed = (z >= floor_h) & (z < height - 1.0) & (u > 0.6) & (u < length - 0.6)
    i = np.nonzero(allowed)[0]
    b, ui, zi = building[i], u[i], z[i]
    win_w, spacing, fh, half_h = B["win_w"][b], B["win_spacing"][b], floor_h[i], B["win_h"][b] / 2
    floor_index = np.floor(zi / fh)
    u_grid = ui - B["win_offset"][b]
    column = np.floor(u_grid / spacing)
    du = np.abs(u_grid - (column + 0.5) * spacing)
    dz = np.abs(zi - (floor_index + 0.55) * fh)
    window = (du < win_w / 2) & (dz < half_h)
    frame = ~window & (du < win_w / 2 + 0.12) & (dz < half_h + 0.12)
    light = _hash01(salt + 1, b, floor_index, column)
    window_rgb = B["win_rgb"][b] * (0.55 + 0.9 * light)[:, None]
    window_rgb[light > 0.88] = (0.95, 0.85, 0.55)
    wall_rgb = rgb[i]
    detailed = wall_rgb.copy()
    detailed[window] = window_rgb[window]
    detailed[frame] = B["frame_rgb"][b[frame]]
    area = ((win_w * 2 * half_h) / (spacing * fh))[:, None]
    average = wall_rgb * (1 - area) + B["win_rgb"][b] * area
    rgb[i] = average + _detail(win_w / 2, footprint[i])[:, None] * (detailed - average)

    # Ground floor of street facades: a shop (window, sign with "lettering") or a door
    ground_floor = world.segments["facade"][segment] & (z < 3.5)
    i = np.nonzero(ground_floor)[0]
    b, ui, zi, li = building[i], u[i], z[i], length[i]
    shop = B["shop"][b] & (ui > 0.5) & (ui < li - 0.5)
    shop_window = shop & (zi > 0.4) & (zi < 2.5) & ((ui % 4.0) > 0.4)
    sign = shop & (zi > 2.7)
    letters = sign & (zi > 2.85) & (zi < 3.3) & ((ui % 0.35) > 0.08) & (
        _hash01(salt + 2, b, np.floor(ui / 0.35)) > 0.45)
    door = ~B["shop"][b] & (np.abs(ui - li / 2) < 0.65) & (zi < 2.2)
    part = rgb[i]
    part[shop_window] = B["win_rgb"][b[shop_window]] * 0.8
    part[sign] = B["sign_rgb"][b[sign]]
    part[letters] = B["letter_rgb"][b[letters]]
    part[door] = B["base"][b[door]] * 0.35
    rgb[i] = part
    return rgb * world.segments["shade"][segment][:, None]


def _ground_colours(world, x, y, footprint):
    """Colours of ground points: road with markings and crossings, pavement with tiles and kerbs."""
    abs_y = np.abs(y)
    starts, ends = world.crossings[:, 0], world.crossings[:, 1]
    following = np.searchsorted(starts, x, side="right")  # index of the first crossing ahead
    if len(starts):
        previous_end = np.where(following > 0, ends[np.maximum(following - 1, 0)], -np.inf)
        next_start = np.where(following < len(starts), starts[np.minimum(following, len(starts) - 1)], np.inf)
    else:
        previous_end, next_start = np.full_like(x, -np.inf), np.full_like(x, np.inf)
    in_crossing = x < previous_end
    zebra_zone = ((x - previous_end >= 1) & (x - previous_end < 4)) | ((next_start - x > 1) & (next_start - x <= 4))
    road = (abs_y < ROAD_HALF_WIDTH_M) | in_crossing
    salt = world.salt
    asphalt = world.asphalt * (0.95 + 0.1 * _hash01(salt + 3, np.floor(x / 0.5), np.floor(y / 0.5)))
    asphalt *= 1.0 - 0.15 * (_hash01(salt + 4, np.floor(x / 4), np.floor(y / 2)) > 0.9)  # repairs
    rgb = np.repeat(asphalt[:, None], 3, axis=1)
    centre = ~in_crossing & ~zebra_zone & (abs_y < 0.1) & ((x % 9.0) < 4.5)
    edge = ~in_crossing & (np.abs(abs_y - (ROAD_HALF_WIDTH_M - 0.35)) < 0.09)
    zebra = zebra_zone & (abs_y < ROAD_HALF_WIDTH_M) & ((y % 1.0) < 0.5)
    marking = (centre | edge | zebra) & road
    paint = (marking * _detail(0.1, footprint))[:, None]
    rgb = rgb * (1 - paint) + world.marking_rgb * paint
    tiles = ((x % 0.6) < 0.04) | ((y % 0.6) < 0.04)
    pavement = world.pavement_rgb * (0.92 + 0.16 * _hash01(salt + 5, np.floor(x / 0.6), np.floor(y / 0.6)))[:, None]
    pavement *= (1.0 - 0.2 * tiles * _detail(0.04, footprint))[:, None]
    kerb = abs_y < ROAD_HALF_WIDTH_M + 0.25
    pavement = np.where(kerb[:, None], world.pavement_rgb * 1.15, pavement)
    return np.where(road[:, None], rgb, pavement)


def _paint_box(view, distance, rows, cols, rgb, mask=None):
    """Paint an axis-aligned pixel box (clipped to the image) at `distance`, behind anything nearer."""
    r0, r1 = max(int(math.floor(rows[0])), 0), min(int(math.ceil(rows[1])), view.height)
    c0, c1 = max(int(math.floor(cols[0])), 0), min(int(math.ceil(cols[1])), view.width)
    if r0 >= r1 or c0 >= c1:
        return
    visible = view.depth[r0:r1, c0:c1] > distance
    if mask is not None:
        visible &= mask(np.arange(r0, r1)[:, None] + 0.5, np.arange(c0, c1)[None, :] + 0.5)
    view.image[r0:r1, c0:c1][visible] = rgb
    view.depth[r0:r1, c0:c1][visible] = distance


def _draw_sprite(view, salt, kind, size, rgb, rgb2, index, distance, lateral):
    """Draw one billboard facing the camera, `distance` metres ahead and `lateral` metres to the right."""
    scale = view.focal / distance  # pixels per metre
    column = view.cx + lateral * scale

    def box(x0, x1, z0, z1, colour, mask=None):
        rows = (view.row_of(z1, distance), view.row_of(z0, distance))
        _paint_box(view, distance, rows, (column + x0 * scale, column + x1 * scale), colour, mask)

    if kind == TREE:
        radius_x, radius_z, centre_z, trunk = size
        box(-trunk / 2, trunk / 2, 0, centre_z, rgb2)
        centre_row, cell = view.row_of(centre_z, distance), max(0.35 * scale, 1.0)

        def leaves(rows, cols, key):  # the same leaf pattern from any viewpoint
            return _hash01(salt + key + index, np.floor((cols - column) / cell) + 0 * rows,
                           np.floor((rows - centre_row) / cell))

        def crown(rows, cols):
            dx, dz = (cols - column) / scale, (centre_row - rows) / scale
            return (dx / radius_x) ** 2 + (dz / radius_z) ** 2 < 1.0 - 0.3 * leaves(rows, cols, 6)

        box(-radius_x, radius_x, centre_z - radius_z, centre_z + radius_z, rgb, crown)
        box(-radius_x * 0.5, radius_x * 0.1, centre_z, centre_z + radius_z * 0.6, rgb * 1.25,
            lambda rows, cols: crown(rows, cols) & (leaves(rows, cols, 7) > 0.5))  # sunlit leaves
    elif kind == LAMP:
        pole_height, pole_width = size[0], size[1]
        box(-pole_width / 2, pole_width / 2, 0, pole_height, rgb)
        box(-0.45, 0.45, pole_height - 0.25, pole_height, rgb2)
    elif kind == SIGN:
        plate, plate_z, round_plate = size[0], size[1], size[2]
        box(-0.04, 0.04, 0, plate_z, rgb2)
        centre_row = view.row_of(plate_z + plate / 2, distance)

        def disc(rows, cols):
            return (cols - column) ** 2 + (rows - centre_row) ** 2 < (plate * scale / 2) ** 2

        box(-plate / 2, plate / 2, plate_z, plate_z + plate, rgb, disc if round_plate else None)
        box(-plate / 4, plate / 4, plate_z + plate * 0.4, plate_z + plate * 0.6, np.array([0.95, 0.95, 0.95]),
            disc if round_plate else None)
    elif kind == CAR:
        width, height = size[0], size[1]
        wheel, light = np.array([0.05, 0.05, 0.05]), np.array([0.8, 0.1, 0.1])
        box(-width / 2, width / 2, 0.3, height * 0.6, rgb)
        box(-width * 0.42, width * 0.42, height * 0.6, height, rgb2)
        box(-width * 0.45, -width * 0.2, 0.0, 0.35, wheel)
        box(width * 0.2, width * 0.45, 0.0, 0.35, wheel)
        box(-width * 0.48, -width * 0.36, height * 0.42, height * 0.52, light)
        box(width * 0.36, width * 0.48, height * 0.42, height * 0.52, light)


class _View:
    """A camera's projection: rays per image column, image rows per height, and the buffers drawn into."""

    def __init__(self, camera, image_size):
        self.camera = camera
        self.height, self.width = image_size
        self.focal = (self.width / 2) / math.tan(math.radians(camera.hfov_deg) / 2)
        self.cx, self.cy = self.width / 2, self.height / 2 + camera.pitch * self.height
        self.origin = np.array([camera.x, camera.y])
        self.forward = _unit(camera.heading)
        self.right = np.array([self.forward[1], -self.forward[0]])
        slopes = (np.arange(self.width) + 0.5 - self.cx) / self.focal  # lateral metres per forward metre
        self.rays = self.forward[None, :] + slopes[:, None] * self.right[None, :]
        self.rows = np.arange(self.height)[:, None] + 0.5
        self.image = np.zeros((self.height, self.width, 3), dtype=np.float32)
        self.depth = np.full((self.height, self.width), np.inf)  # forward distance of what each pixel shows
        self.filled = np.zeros((self.height, self.width), dtype=bool)

    def row_of(self, z, distance):
        """Image row of a point z metres above the ground at `distance` metres ahead."""
        return self.cy - (z - self.camera.height) * self.focal / distance


def _draw_walls(view, world):
    """Intersect every column's ray with the wall segments ahead; draw the nearest few walls per column."""
    seg = world.segments
    ahead_0, ahead_1 = (seg["p0"] - view.origin) @ view.forward, (seg["p1"] - view.origin) @ view.forward
    near = np.nonzero((np.maximum(ahead_0, ahead_1) > 0.3) & (np.minimum(ahead_0, ahead_1) < VIEW_DISTANCE_M))[0]
    edge, offset = seg["p1"][near] - seg["p0"][near], seg["p0"][near] - view.origin
    rays = view.rays
    denominator = rays[:, None, 0] * edge[None, :, 1] - rays[:, None, 1] * edge[None, :, 0]
    with np.errstate(divide="ignore", invalid="ignore"):
        s = (offset[None, :, 0] * edge[None, :, 1] - offset[None, :, 1] * edge[None, :, 0]) / denominator
        v = (offset[None, :, 0] * rays[:, None, 1] - offset[None, :, 1] * rays[:, None, 0]) / denominator
    s = np.where((denominator != 0) & (s > 0.3) & (v >= 0) & (v <= 1), s, np.inf)  # forward distance of hits
    layers = min(WALL_LAYERS, len(near))
    order = np.argpartition(s, layers - 1, axis=1)[:, :layers] if layers < len(near) else np.argsort(s, axis=1)
    order = np.take_along_axis(order, np.argsort(np.take_along_axis(s, order, axis=1), axis=1), axis=1)
    for layer in range(layers):  # nearest first: a pixel belongs to the first wall that covers it
        hit = order[:, layer]
        distance = s[np.arange(view.width), hit]
        segment = near[hit]
        top = view.row_of(world.buildings["height"][seg["building"][segment]], distance)
        span = (view.rows >= top) & (view.rows < view.row_of(0.0, distance)) & np.isfinite(distance) & ~view.filled
        rr, cc = np.nonzero(span)
        distance, segment = distance[cc], segment[cc]
        z = view.camera.height + (view.cy - rr - 0.5) * distance / view.focal
        u = v[cc, hit[cc]] * seg["length"][segment]
        view.image[rr, cc] = _facade_colours(world, seg["building"][segment], segment, u.astype(np.float32),
                                             z.astype(np.float32), (distance / view.focal).astype(np.float32))
        view.depth[rr, cc] = distance
        view.filled |= span


def _draw_ground_and_sky(view, world, zenith, horizon):
    """The ground plane below the horizon where no wall stands, and a sky gradient above."""
    ground = (view.rows > view.cy) & ~view.filled
    rr, cc = np.nonzero(ground)
    distance = view.camera.height * view.focal / (rr + 0.5 - view.cy)
    points = (view.origin[None, :] + distance[:, None] * view.rays[cc]).astype(np.float32)
    footprint = distance ** 2 / (view.focal * view.camera.height)  # metres per pixel along the ground
    view.image[rr, cc] = _ground_colours(world, points[:, 0], points[:, 1], footprint.astype(np.float32))
    view.depth[rr, cc] = distance
    blend = np.clip((view.cy - view.rows) / max(view.cy, 1.0), 0, 1)[:, :, None]
    sky = np.broadcast_to(horizon * (1 - blend) + zenith * blend, view.image.shape)
    sky_mask = ~view.filled & ~ground
    view.image[sky_mask] = sky[sky_mask]


def _passing_cars(rng, camera):
    """Cars of this moment (not of the place), ahead in either lane: (x, y, kind, size, colour, colour 2, id)."""
    direction = 1.0 if math.cos(camera.heading) >= 0 else -1.0
    cars = []
    for k in range(int(rng.integers(0, 4))):
        x = camera.x + direction * rng.uniform(8, 70)
        y = LANE_OFFSET_M * (1.0 if rng.random() < 0.5 else -1.0)
        body = _hsv_to_rgb(rng.random(), rng.uniform(0, 0.9), rng.uniform(0.2, 0.95))
        cars.append((x, y, CAR, (rng.uniform(1.7, 1.95), rng.uniform(1.4, 1.6), 0, 0), body,
                     np.array([0.1, 0.12, 0.15]), -1 - k))
    return cars


def _draw_sprites(view, world, rng):
    """Trees, lamps, signs, parked and passing cars, far to near, hidden behind nearer walls."""
    sprites = world.sprites
    lo, hi = np.searchsorted(sprites["x"], [view.camera.x - SPRITE_DISTANCE_M, view.camera.x + SPRITE_DISTANCE_M])
    items = [(sprites["x"][i], sprites["y"][i], sprites["kind"][i], sprites["size"][i], sprites["rgb"][i],
              sprites["rgb2"][i], i) for i in range(lo, hi)]
    items += _passing_cars(rng, view.camera)
    relative = np.array([item[:2] for item in items]).reshape(-1, 2) - view.origin
    ahead, lateral = relative @ view.forward, relative @ view.right
    half_width = view.width / 2 / view.focal
    visible = (ahead > 1.0) & (ahead < SPRITE_DISTANCE_M) & (np.abs(lateral) < ahead * half_width + 5)
    for i in sorted(np.nonzero(visible)[0], key=lambda i: -ahead[i]):
        _draw_sprite(view, world.salt, *items[i][2:], ahead[i], lateral[i])


def render_view(world, camera, image_size, rng):
    """Render the world seen from `camera` as a float32 array [H, W, 3] in [0, 1].

    `rng` draws what is not part of the place: the sky and the passing cars.
    """
    view = _View(camera, image_size)
    zenith, horizon = (np.array(colour) for colour in SKY_PALETTES[int(rng.integers(len(SKY_PALETTES)))])
    tint = rng.uniform(0.92, 1.08, 3)
    _draw_walls(view, world)
    _draw_ground_and_sky(view, world, zenith * tint, horizon * tint)
    _draw_sprites(view, world, rng)
    # Haze: far things fade into the horizon colour
    haze = 1.0 - np.exp(-np.where(np.isfinite(view.depth), view.depth, 0.0) / HAZE_DISTANCE_M)
    haze = haze.astype(np.float32)[:, :, None]
    image = view.image * (1 - haze) + (horizon * tint).astype(np.float32) * haze
    return np.clip(image, 0, 1, out=image)


def degrade_query(image, rng):
    """Another camera: blur and noise (not another light or colour: see the module's docstring)."""
    blur_radius = rng.uniform(0, 1.6) * image.shape[1] / 320 if rng.random() < 0.7 else 0.0
    if blur_radius > 0.2:
        pil = Image.fromarray(_to_uint8(image)).filter(ImageFilter.GaussianBlur(blur_radius))
        image = np.asarray(pil, dtype=np.float32) / 255
    return image + rng.standard_normal(image.shape, dtype=np.float32) * rng.uniform(0.01, 0.04)


def _to_uint8(image):
    return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)


# ----------------------------------------------------------------------------------------------------------
# Where the cameras stand

class SplitPlan(NamedTuple):
    database: list  # of Camera
    queries: list
    origin_utm: tuple  # UTM of the street's local (0, 0)
    angle: float  # direction of the street's +x axis, radians counter-clockwise from east
    x_range: tuple  # extent of the world to build (metres along the street)


def _gap_slots(slots_num, gaps_num):
    """Slots after which the database coverage has a hole, evenly spread, each with cameras on both sides."""
    return sorted({int(round((g + 1) * slots_num / (gaps_num + 1))) - 1 for g in range(gaps_num)}
                  & set(range(slots_num - 1)))


def plan_split(rng, database_num, queries_num, far_queries_num):
    """Database cameras along the street (both directions), queries near them, far queries in holes."""
    forward_num = (database_num + 1) // 2
    gaps = _gap_slots(forward_num, min(GAPS_MAX_NUM, far_queries_num)) if far_queries_num else []
    if far_queries_num and not gaps:
        raise ValueError("The training database is too small to leave a hole for queries without positives: "
                         "pass --train_database_num 3 or more, or --train_far_queries_num 0.")

    def slot_x(slot):
        return slot * DATABASE_SPACING_M + GAP_LENGTH_M * sum(slot > gap for gap in gaps)

    database, runs = [], []
    for index in range(database_num):
        slot, backward = index // 2, index % 2 == 1
        x = slot_x(slot) + (DATABASE_SPACING_M / 2 if backward else 0.0)
        database.append(Camera(x, LANE_OFFSET_M if backward else -LANE_OFFSET_M, math.pi if backward else 0.0,
                               DATABASE_CAMERA_HEIGHT_M, 0.0, HFOV_DEG))
        runs.append(sum(slot > gap for gap in gaps))
    # Stretches of the street covered without holes, and the free middle of each hole for the far queries
    xs, runs = np.array([camera.x for camera in database]), np.array(runs)
    covered = [(xs[runs == run].min(), xs[runs == run].max()) for run in range(len(gaps) + 1)]
    holes = [(covered[i][1] + FAR_QUERY_MIN_ALONG_M, covered[i + 1][0] - FAR_QUERY_MIN_ALONG_M)
             for i in range(len(gaps))]

    queries = []
    lengths = np.array([hi - lo for lo, hi in covered])
    for index in range(queries_num):
        if index < far_queries_num:
            lo, hi = holes[index % len(holes)]
        elif lengths.sum() > 0:
            lo, hi = covered[int(rng.choice(len(covered), p=lengths / lengths.sum()))]
        else:
            lo, hi = covered[0]
        backward = rng.random() < 0.5
        heading = np.clip(rng.normal(0, QUERY_HEADING_STD_DEG), -QUERY_HEADING_MAX_DEG, QUERY_HEADING_MAX_DEG)
        queries.append(Camera(rng.uniform(lo, hi), rng.uniform(-QUERY_LATERAL_RANGE_M, QUERY_LATERAL_RANGE_M),
                              (math.pi if backward else 0.0) + math.radians(heading), rng.uniform(1.6, 2.6),
                              rng.uniform(-0.04, 0.04), HFOV_DEG * rng.uniform(0.9, 1.1)))
    order = rng.permutation(queries_num)  # far queries anywhere in the numbering
    queries = [queries[i] for i in order]
    return database, queries, (float(xs.min()) - VIEW_DISTANCE_M, float(xs.max()) + VIEW_DISTANCE_M)


def _plan_dataset(seed, sizes, far_queries_num):
    """Cameras of every split and where each street lies in UTM: splits are kilometres apart."""
    plans, north = {}, FIRST_STREET_ORIGIN_UTM[1]
    previous_half = 0.0
    for split_index, split in enumerate(SPLITS):
        rng = np.random.default_rng([seed, split_index, 0])
        database, queries, x_range = plan_split(rng, sizes[split][0], sizes[split][1],
                                                far_queries_num if split == "train" else 0)
        angle = math.radians(rng.uniform(-STREET_MAX_ANGLE_DEG, STREET_MAX_ANGLE_DEG))
        length = x_range[1] - x_range[0]
        if split_index:
            north += previous_half + SPLITS_SEPARATION_M + length / 2
        previous_half = length / 2
        centre = (x_range[0] + x_range[1]) / 2
        origin = (FIRST_STREET_ORIGIN_UTM[0] - centre * math.cos(angle), north - centre * math.sin(angle))
        plans[split] = SplitPlan(database, queries, origin, angle, x_range)
    return plans


def camera_utm(plan, camera):
    cos, sin = math.cos(plan.angle), math.sin(plan.angle)
    return (plan.origin_utm[0] + camera.x * cos - camera.y * sin,
            plan.origin_utm[1] + camera.x * sin + camera.y * cos)


def image_name(east, north, heading_deg, note):
    """A datasets_vg file name: 16 `@`-separated fields, UTM east/north with 2 decimals, heading, note."""
    fields = [f"{east:010.2f}", f"{north:010.2f}"] + [""] * 6 + [f"{heading_deg:05.1f}"] + [""] * 4 + [note]
    return "@" + "@".join(fields) + "@.jpg"


# ----------------------------------------------------------------------------------------------------------
# Writing the dataset

_WORLDS = {}  # per process: the world of each split, built once


def _world(seed, split_index, x_range):
    key = (seed, split_index, x_range)
    if key not in _WORLDS:
        _WORLDS.clear()
        _WORLDS[key] = World(np.random.default_rng([seed, split_index, 1]), *x_range)
    return _WORLDS[key]


def _render_task(task):
    """Render and save one image; everything random comes from the task's own seed (process-independent)."""
    seed, split_index, x_range, camera, image_size, is_query, index, path = task
    rng = np.random.default_rng([seed, split_index, 2 + int(is_query), index])
    image = render_view(_world(seed, split_index, x_range), camera, image_size, rng)
    if is_query:
        image = degrade_query(image, rng)
    else:  # a little sensor noise, so that database images are not perfectly clean either
        image = image + rng.standard_normal(image.shape, dtype=np.float32) * 0.008
    Image.fromarray(_to_uint8(image)).save(path, quality=JPEG_QUALITY)


def _parameters(seed, sizes, image_size, far_queries_num):
    """What defines the dataset: stored in the completion marker and compared on the next call."""
    parameters = {"format_version": FORMAT_VERSION, "seed": seed}
    for split in SPLITS:
        parameters[f"{split}_database_num"], parameters[f"{split}_queries_num"] = sizes[split]
    parameters["train_far_queries_num"] = far_queries_num
    parameters["image_size"] = list(image_size)
    return parameters


def _check_arguments(sizes, image_size, processes, far_queries_num, dataset_name):
    for split in SPLITS:
        for kind, value in zip(SUBFOLDERS, sizes[split]):
            flag = f"--{split}_{kind}_num"
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{flag} must be a positive integer, got {value!r}.")
    if len(image_size) != 2 or min(image_size) < 16:
        raise ValueError(f"--image_size must be two integers H W, each at least 16, got {list(image_size)}.")
    if processes < 1:
        raise ValueError(f"--processes must be at least 1, got {processes}.")
    if not 0 <= far_queries_num <= sizes["train"][1]:
        raise ValueError(f"--train_far_queries_num must be between 0 and --train_queries_num "
                         f"({sizes['train'][1]}), got {far_queries_num}.")
    if not dataset_name or os.path.basename(dataset_name) != dataset_name or dataset_name.startswith("."):
        raise ValueError(f"--dataset_name must be a plain folder name (no '/', not starting with '.'), "
                         f"got {dataset_name!r}.")


def _read_marker(folder):
    try:
        with open(os.path.join(folder, MARKER_NAME)) as file:
            return json.load(file)
    except (OSError, ValueError):
        return None


def generate_dataset(datasets_folder: str, dataset_name: str = "synthetic", *, seed: int = 0,
                     train_database_num: int = DEFAULT_SIZES["train"][0],
                     train_queries_num: int = DEFAULT_SIZES["train"][1],
                     val_database_num: int = DEFAULT_SIZES["val"][0], val_queries_num: int = DEFAULT_SIZES["val"][1],
                     test_database_num: int = DEFAULT_SIZES["test"][0],
                     test_queries_num: int = DEFAULT_SIZES["test"][1],
                     image_size: tuple[int, int] = (240, 320), processes: int = 1, overwrite: bool = False,
                     train_far_queries_num: int | None = None) -> str:
    """Generate the synthetic dataset at <datasets_folder>/<dataset_name> and return that folder.

    A complete dataset with the same parameters is kept as it is. One with other parameters is an error
    unless `overwrite`. A folder without the completion marker (an interrupted run), or one that an older
    version of this script rendered with the same parameters, is generated again.
    `train_far_queries_num` (None: 3 % of the training queries, at least one) training queries have no
    database image within 10 m.
    """
    sizes = {"train": (train_database_num, train_queries_num), "val": (val_database_num, val_queries_num),
             "test": (test_database_num, test_queries_num)}
    image_size = tuple(int(side) for side in image_size)
    if train_far_queries_num is None:
        train_far_queries_num = min(train_queries_num, max(1, round(DEFAULT_FAR_QUERIES_FRACTION * train_queries_num)))
    _check_arguments(sizes, image_size, processes, train_far_queries_num, dataset_name)
    parameters = _parameters(seed, sizes, image_size, train_far_queries_num)
    folder = os.path.join(datasets_folder, dataset_name)

    if os.path.exists(folder):
        existing = _read_marker(folder)
        if existing == parameters:
            return folder
        # Rendered by an older version of this script with the same parameters: stale, so replaced
        outdated = existing is not None and {**existing, "format_version": FORMAT_VERSION} == parameters
        if existing is not None and not overwrite and not outdated:
            changed = sorted(key for key in set(existing) | set(parameters) if existing.get(key) != parameters.get(key))
            raise ValueError(f"{folder} already holds a synthetic dataset generated with other parameters "
                             f"({', '.join(changed)} differ). Pass --overwrite (overwrite=True) to replace it, "
                             f"or choose another --dataset_name.")
        if existing is None and not overwrite and set(os.listdir(folder)) - {"images"}:
            raise ValueError(f"{folder} exists but is not a synthetic dataset (no {MARKER_NAME} marker and other "
                             f"content than images/). Move it away, choose another --dataset_name, or pass "
                             f"--overwrite to replace it.")

    # Write everything into a temporary folder, marker last, then rename: never a half dataset that looks complete
    os.makedirs(datasets_folder, exist_ok=True)
    temporary = os.path.join(datasets_folder, f".{dataset_name}.incomplete")
    shutil.rmtree(temporary, ignore_errors=True)  # left by an interrupted run
    try:
        plans = _plan_dataset(seed, sizes, train_far_queries_num)
        tasks = []
        for split_index, split in enumerate(SPLITS):
            plan = plans[split]
            for subfolder, cameras in zip(SUBFOLDERS, (plan.database, plan.queries)):
                target = os.path.join(temporary, "images", split, subfolder)
                os.makedirs(target)
                for index, camera in enumerate(cameras):
                    east, north = camera_utm(plan, camera)
                    compass = (90.0 - math.degrees(plan.angle + camera.heading)) % 360.0
                    name = image_name(east, north, compass, f"{split}_{subfolder}_{index:05d}")
                    tasks.append((seed, split_index, plan.x_range, camera, image_size, subfolder == "queries",
                                  index, os.path.join(target, name)))
        if processes == 1:
            for task in tasks:
                _render_task(task)
        else:
            # fork on Linux: no re-import of the caller's main script, which need not be guarded
            method = "fork" if sys.platform.startswith("linux") else "spawn"
            with multiprocessing.get_context(method).Pool(processes) as pool:
                for _ in pool.imap_unordered(_render_task, tasks, chunksize=16):
                    pass
        with open(os.path.join(temporary, MARKER_NAME), "w") as file:
            json.dump(parameters, file, indent=1)
        if os.path.exists(folder):
            shutil.rmtree(folder)
        os.replace(temporary, folder)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return folder


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Generate the synthetic street-world dataset (datasets_vg layout).",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--datasets_folder", type=str, default="data/datasets", help="parent folder of the dataset")
    parser.add_argument("--dataset_name", type=str, default="synthetic", help="folder name of the dataset")
    parser.add_argument("--seed", type=int, default=0, help="same seed and sizes give the same bytes")
    for split, (database_num, queries_num) in DEFAULT_SIZES.items():
        parser.add_argument(f"--{split}_database_num", type=int, default=database_num,
                            help=f"database images of the {split} split")
        parser.add_argument(f"--{split}_queries_num", type=int, default=queries_num,
                            help=f"queries of the {split} split")
    parser.add_argument("--train_far_queries_num", type=int, default=None,
                        help="training queries with no database image within 10 m (default: 3 %% of them, "
                             "at least one)")
    parser.add_argument("--image_size", type=int, nargs=2, default=[240, 320], metavar=("H", "W"),
                        help="image height and width in pixels")
    parser.add_argument("--processes", type=int, default=min(4, os.cpu_count() or 1),
                        help="rendering processes (the output does not depend on it)")
    parser.add_argument("--overwrite", action="store_true", help="replace a dataset generated with other parameters")
    args = parser.parse_args(argv)

    start = time.time()
    marker = os.path.join(args.datasets_folder, args.dataset_name, MARKER_NAME)
    marker_before = os.stat(marker).st_mtime_ns if os.path.exists(marker) else None
    try:
        folder = generate_dataset(
            args.datasets_folder, args.dataset_name, seed=args.seed,
            train_database_num=args.train_database_num, train_queries_num=args.train_queries_num,
            val_database_num=args.val_database_num, val_queries_num=args.val_queries_num,
            test_database_num=args.test_database_num, test_queries_num=args.test_queries_num,
            image_size=tuple(args.image_size), processes=args.processes, overwrite=args.overwrite,
            train_far_queries_num=args.train_far_queries_num)
    except ValueError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    kept = marker_before is not None and os.stat(marker).st_mtime_ns == marker_before
    action = "Kept the complete dataset (same parameters)" if kept else "Wrote the dataset"
    print(f"{action} {folder} in {time.time() - start:.1f} s")
    for split in SPLITS:
        counts = [len(os.listdir(os.path.join(folder, "images", split, subfolder))) for subfolder in SUBFOLDERS]
        print(f"  images/{split}: {counts[0]} database, {counts[1]} queries")


if __name__ == "__main__":
    main()
