"""Reading datasets in the datasets_vg layout: image paths, UTM coordinates, positives, image tensors.

Layout: <datasets_folder>/<dataset_name>/images/<split>/{database,queries}/**/@utm_east@utm_north@...@.jpg
"""
import logging
import os

import numpy as np
import torch
import torch.utils.data as data
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image, UnidentifiedImageError

from commons import UserInputError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SPLITS = ("train", "val", "test")
# scikit-learn's NearestNeighbors (the original's positives) searches databases smaller than this by brute force
# (its 5 default neighbours are at least half of them), whose distances round otherwise than its k-d tree's
SKLEARN_BRUTE_FORCE_BELOW = 12
# A squared distance this close (relatively) to the squared radius may be decided either way by the k-d tree,
# which compares whole nodes in distances and single points in squared distances: such cases go to scikit-learn
BOUNDARY_TOLERANCE = 1e-12
# Query-database pairs compared at once when searching positives
POSITIVES_PAIRS_PER_CHUNK = 1 << 22

base_transform = T.Compose([T.ToTensor(), T.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD)])
_IMAGENET_MEAN_TENSOR = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
_IMAGENET_STD_TENSOR = torch.tensor(IMAGENET_STD).view(3, 1, 1)


# ----------------------------------------------------------------------------------------------------------
# Files and coordinates

def find_images(folder):
    """All images under `folder` (recursively), sorted by path, as the original's sorted recursive glob."""
    paths = []
    for root, _, files in os.walk(folder, followlinks=True):
        paths.extend(os.path.join(root, name) for name in files if name.lower().endswith(IMAGE_EXTENSIONS))
    return sorted(paths)


def parse_utm(path):
    """(east, north) in metres from a datasets_vg file name `@utm_east@utm_north@...@.jpg`."""
    fields = os.path.basename(path).split("@")
    try:
        return float(fields[1]), float(fields[2])
    except (IndexError, ValueError):
        raise UserInputError(
            f"Cannot read UTM coordinates from the file name of {path}: it should look like "
            "'@<utm_east>@<utm_north>@...@.jpg' with two numbers after the first two '@'. "
            "Rename the file, or build the dataset with tools/build_dataset.py.") from None


def parse_utms(paths):
    """UTM coordinates of many paths as a float array [len(paths), 2]."""
    return np.array([parse_utm(path) for path in paths], dtype=np.float64).reshape(-1, 2)


def find_positives(database_utms, queries_utms, radius):
    """For each query, the indices (sorted) of the database images within `radius` metres (distance <= radius).

    The same sets as the original's scikit-learn NearestNeighbors.radius_neighbors, without importing
    scikit-learn (seconds of every run's start-up): its k-d tree keeps a database image when the float64 sum of
    the squared coordinate differences is <= radius * radius, which `radius_search` computes. Small databases
    (searched by brute force there), squared distances within BOUNDARY_TOLERANCE of the squared radius and
    non-finite coordinates go through scikit-learn itself.
    """
    database_utms = np.asarray(database_utms, dtype=np.float64).reshape(-1, 2)
    queries_utms = np.asarray(queries_utms, dtype=np.float64).reshape(-1, 2)
    if len(queries_utms) == 0 or len(database_utms) == 0:
        return [np.array([], dtype=np.int64) for _ in range(len(queries_utms))]
    if (len(database_utms) >= SKLEARN_BRUTE_FORCE_BELOW and radius >= 0 and np.isfinite(database_utms).all()
            and np.isfinite(queries_utms).all()):
        positives = radius_search(database_utms, queries_utms, float(radius))
        if positives is not None:
            return positives
    return sklearn_positives(database_utms, queries_utms, radius)


def sklearn_positives(database_utms, queries_utms, radius):
    """The original's positives: scikit-learn's NearestNeighbors.radius_neighbors, each list sorted."""
    from sklearn.neighbors import NearestNeighbors  # imported here: most runs never need it
    knn = NearestNeighbors(n_jobs=1)
    knn.fit(database_utms)
    positives = knn.radius_neighbors(queries_utms, radius=radius, return_distance=False)
    return [np.sort(p).astype(np.int64) for p in positives]


def radius_search(database_utms, queries_utms, radius):
    """For each query, the sorted indices of the database points whose squared distance, computed as
    scikit-learn's k-d tree does ((query - point) per coordinate, squared, summed east then north, in float64),
    is <= radius * radius. Candidates: the database points in a window of eastings around the query (binary
    search in the sorted eastings, a little wider than the radius). Returns None when some squared distance is
    within BOUNDARY_TOLERANCE of the squared radius, where the tree could decide either way."""
    squared_radius = radius * radius
    order = np.argsort(database_utms[:, 0], kind="stable")
    eastings = database_utms[order, 0]
    window = radius + 1e-6 * (np.abs(queries_utms[:, 0]) + radius + 1)  # far wider than any rounding
    starts = np.searchsorted(eastings, queries_utms[:, 0] - window, side="left")
    counts = np.searchsorted(eastings, queries_utms[:, 0] + window, side="right") - starts
    positives = []
    first = 0
    while first < len(queries_utms):
        # The next queries whose candidates fit in one chunk (at least one query)
        last = first + max(1, int(np.searchsorted(np.cumsum(counts[first:]), POSITIVES_PAIRS_PER_CHUNK, "right")))
        chunk_counts = counts[first:last]
        pair_query = np.repeat(np.arange(first, last), chunk_counts)
        offsets = np.arange(chunk_counts.sum()) - np.repeat(np.cumsum(chunk_counts) - chunk_counts, chunk_counts)
        pair_database = order[np.repeat(starts[first:last], chunk_counts) + offsets]
        east = queries_utms[pair_query, 0] - database_utms[pair_database, 0]
        north = queries_utms[pair_query, 1] - database_utms[pair_database, 1]
        squared = east * east + north * north
        if np.any(np.abs(squared - squared_radius) <= BOUNDARY_TOLERANCE * squared_radius):
            return None
        keep = squared <= squared_radius
        kept_counts = np.bincount(pair_query[keep] - first, minlength=last - first)
        positives += [np.sort(found).astype(np.int64)
                      for found in np.split(pair_database[keep], np.cumsum(kept_counts)[:-1])]
        first = last
    return positives


# ----------------------------------------------------------------------------------------------------------
# Images

def open_image(path):
    """Open any readable image as 8-bit RGB; an unreadable file raises an error that names it."""
    try:
        image = Image.open(path)
        image.load()
    except FileNotFoundError:
        raise UserInputError(f"Image not found: {path}. Was it moved or deleted after the dataset was read?") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise UserInputError(f"Cannot read the image {path} ({error}). The file is corrupt, truncated or not an "
                             "image: replace it or remove it from the dataset.") from None
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # 16-bit or float greyscale: PIL's convert("RGB") would clip instead of rescale
        array = np.asarray(image, dtype=np.float64)
        low, high = float(array.min()), float(array.max())
        scale = 255.0 / (high - low) if high > low else 0.0
        image = Image.fromarray(((array - low) * scale).astype(np.uint8), mode="L")
    return image.convert("RGB")


def to_normalised_tensor(image):
    """`base_transform` (ToTensor, then Normalize with the ImageNet statistics) of an RGB PIL image, bit for bit,
    in half the time: the same float32 operations in the same order, done in place on one contiguous copy
    (ToTensor's division by 255 of a contiguous [3, H, W] copy, then Normalize's subtraction and division)."""
    tensor = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).permute(2, 0, 1).contiguous()
    tensor = tensor.to(dtype=torch.get_default_dtype()).div_(255)
    return tensor.sub_(_IMAGENET_MEAN_TENSOR).div_(_IMAGENET_STD_TENSOR)


def load_image_tensor(path):
    """The normalised tensor [3, H, W] of an image at its own size (ToTensor + ImageNet normalisation)."""
    return to_normalised_tensor(open_image(path))


# Query transforms of the test methods; each takes a normalised tensor [3, H, W] and the target (H, W).
def hard_resize(image, resize):
    """Resize to exactly `resize` (H, W), as the original does for every database image."""
    return TF.resize(image, list(resize), antialias=True)


def resize_shorter_side(image, resize):
    """Resize so that the shorter side is min(resize), keeping the aspect ratio (single_query)."""
    return TF.resize(image, min(resize), antialias=True)


def central_crop(image, resize):
    """Scale by max(H/h, W/w) (nearest, as the original) so the image covers `resize`, then centre-crop to it."""
    _, height, width = image.shape
    scale = max(resize[0] / height, resize[1] / width)
    scaled = torch.nn.functional.interpolate(image.unsqueeze(0), scale_factor=scale).squeeze(0)
    return TF.center_crop(scaled, list(resize))


def five_crops(image, resize):
    """The 5 square crops of side min(resize) of the image resized to that shorter side: [5, 3, S, S]."""
    side = min(resize)
    resized = TF.resize(image, side, antialias=True)
    return torch.stack(TF.five_crop(resized, [side, side]))


class ImagesDataset(data.Dataset):
    """Images of a list of paths, each turned into a tensor by `transform(tensor, resize)`; yields (tensor, index)."""

    def __init__(self, paths, transform=hard_resize, resize=None):
        self.paths = list(paths)
        self.transform = transform
        self.resize = resize

    def __getitem__(self, index):
        image = load_image_tensor(self.paths[index])
        if self.resize is not None:
            image = self.transform(image, self.resize)
        return image, index

    def __len__(self):
        return len(self.paths)


# ----------------------------------------------------------------------------------------------------------
# Data loaders

def make_loader(dataset, batch_size, num_workers, device, **options):
    """The DataLoader of every loop: `num_workers` workers, pinned memory on CUDA only (useless, and warned about,
    without a GPU); `options` go to DataLoader (sampler, collate_fn, drop_last...).

    Workers keep the model's priority: niced workers (tried, so that they would only use the cores the model
    leaves idle) were starved by any other process on a shared machine, and the model then waited for them."""
    return data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                           pin_memory=torch.device(device).type == "cuda", **options)


# ----------------------------------------------------------------------------------------------------------
# A geo-tagged split: database and queries with their coordinates and positives

def split_folder(datasets_folder, dataset_name, split):
    return os.path.join(datasets_folder, dataset_name, "images", split)


class GeoDataset:
    """Database and query images of one split, their UTM coordinates, and the positives of each query.

    Index order as the original: database images first, then queries (see `images_paths`).
    `soft_positives_per_query[i]` are the database indices within `positive_dist_threshold` metres of query i.
    """

    def __init__(self, datasets_folder, dataset_name, split, positive_dist_threshold=25):
        self.dataset_name = dataset_name
        self.split = split
        self.dataset_folder = split_folder(datasets_folder, dataset_name, split)
        self.positive_dist_threshold = positive_dist_threshold
        dataset_root = os.path.join(datasets_folder, dataset_name)
        if not os.path.isdir(dataset_root):
            raise UserInputError(f"Dataset folder {dataset_root} does not exist. Check --datasets_folder and "
                                 "--dataset_name (the layout is <datasets_folder>/<dataset_name>/images/<split>/"
                                 "{database,queries}).")
        if not os.path.isdir(self.dataset_folder):
            raise UserInputError(f"The {split} split is missing: {self.dataset_folder} does not exist. "
                                 f"Create {self.dataset_folder}/database and {self.dataset_folder}/queries.")
        self.database_paths = self._read_folder("database")
        self.queries_paths = self._read_folder("queries")
        self.database_utms = parse_utms(self.database_paths)
        self.queries_utms = parse_utms(self.queries_paths)
        self.soft_positives_per_query = find_positives(self.database_utms, self.queries_utms,
                                                       positive_dist_threshold)
        self.images_paths = self.database_paths + self.queries_paths
        self.database_num = len(self.database_paths)
        self.queries_num = len(self.queries_paths)
        without_positives = sum(len(p) == 0 for p in self.soft_positives_per_query)
        if without_positives:
            logging.info(f"{self}: {without_positives} of {self.queries_num} queries have no database image within "
                         f"{positive_dist_threshold} m; in evaluation they count as misses.")

    def _read_folder(self, kind):
        folder = os.path.join(self.dataset_folder, kind)
        if not os.path.isdir(folder):
            raise UserInputError(f"Missing folder {folder}: a split needs both database/ and queries/ folders.")
        paths = find_images(folder)
        if not paths:
            raise UserInputError(f"No images in {folder} (looked for {', '.join(IMAGE_EXTENSIONS)} files, "
                                 "recursively). Put the images there or fix --datasets_folder / --dataset_name.")
        return paths

    def __repr__(self):
        return f"< {self.dataset_name} - #database: {self.database_num}; #queries: {self.queries_num} >"


# ----------------------------------------------------------------------------------------------------------
# Training transforms
#
# Unlike the evaluation above (normalise, then resize the tensor), training images are resized as PIL images
# before ToTensor and normalisation, as in the original's training; queries get the augmentations first.

def database_training_transform(resize, rand_augment=None):
    """Database images in training: resize (PIL, bilinear) to `resize` (H, W), [RandAugment of `rand_augment`
    (operations, magnitude), bilinear, as the GSV-Cities methods], ToTensor, normalise."""
    augment = [T.RandAugment(*rand_augment, interpolation=T.InterpolationMode.BILINEAR)] if rand_augment else []
    return T.Compose([T.Resize(list(resize))] + augment + [to_normalised_tensor])


def query_training_transform(resize, brightness=0, contrast=0, saturation=0, hue=0, rand_perspective=0,
                             random_resized_crop=0, random_rotation=0, rand_augment=None):
    """Queries in training, in the original's order: colour jitters (brightness, contrast, saturation, hue, one
    at a time), RandomPerspective, RandomResizedCrop to `resize` with scale (1 - random_resized_crop, 1),
    RandomRotation, then as the database images. A jitter, perspective or rotation of 0 would leave the image
    unchanged and is left out; RandomResizedCrop always runs (with scale 1 it still crops images whose aspect
    ratio is outside [3/4, 4/3], as the original does)."""
    steps = [T.ColorJitter(**{name: value}) for name, value in
             (("brightness", brightness), ("contrast", contrast), ("saturation", saturation), ("hue", hue)) if value]
    if rand_perspective:
        steps.append(T.RandomPerspective(rand_perspective))
    steps.append(T.RandomResizedCrop(size=list(resize), scale=(1 - random_resized_crop, 1)))
    if random_rotation:
        steps.append(T.RandomRotation(degrees=random_rotation))
    return T.Compose(steps + [database_training_transform(resize, rand_augment)])


class ListSampler(data.Sampler):
    """Yields the items of a list that can be replaced between passes, so that one DataLoader (and its
    worker processes) serves every refresh of a training cache."""

    def __init__(self, items=()):
        self.items = list(items)

    def __iter__(self):
        return iter(self.items)

    def __len__(self):
        return len(self.items)


def parse_headings(paths):
    """Headings in degrees, a float array [len(paths)], from field 9 of the '@'-split file names (datasets_vg's
    heading, where CosPlace reads it); None when some name has none there (an empty or missing field, or no
    number)."""
    headings = []
    for path in paths:
        fields = os.path.basename(path).split("@")
        try:
            headings.append(float(fields[9]))
        except (IndexError, ValueError):
            return None
    return np.array(headings, dtype=np.float64)
