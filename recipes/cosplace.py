"""CosPlace's classification training (--recipe cosplace; Berton et al., CVPR 2022), on a datasets_vg training split.

Classes are UTM cells of --cosplace_cell_m metres and heading bins of --cosplace_bin_deg degrees (the heading of
field 9 of the '@'-split file names, as CosPlace reads it; one bin when a name has none). Classes with fewer than
--cosplace_min_images images are dropped. A class's group is its cell indices modulo N (--cosplace_group_cells) and
its bin index modulo L (--cosplace_group_bins), so that same-group classes are at least N cells or L bins apart
(`make_groups`). Epoch e trains group e mod G (G = --cosplace_groups_num) with that group's own CosFace classifier
(`CosFace`); a batch is --cosplace_batch_size classes, each with one of its images drawn at random (class
balanced), cut from a stream of random passes over the group's classes.

The classifiers train at --cosplace_classifier_lr (CosPlace: 1e-2, the network at 1e-5) through
trained_modules(); their weights are in the recipe's state, which checkpoints keep. An epoch's batches depend on
--seed and the epoch only, so a resumed run trains on the batches an uninterrupted run would.

The training images get CosPlace's augmentation (--cosplace_color_jitter, --cosplace_crop_scale), and
--rand_augment when given. On the synthetic street (make_synthetic_dataset.py), whose queries keep the database's
colours, CosPlace's strong jitter (hue 0.5) kept a model trained from random weights from learning (test R@1
41 -> 33) where a mild one (0.2 0.2 0.2 0, crops of 0.7 to 1) learned (41 -> 60 in the same 12 epochs).

With several processes each one runs its share of every batch through the model; the descriptors of the whole
batch are gathered (with gradients, recipes.places.gather_batch) and every process computes the classifier and the
loss of the whole batch: the classifiers get the same gradients everywhere, and the network's are those of the
batch's loss after DistributedDataParallel's average (see recipes/places.py).
"""
import argparse
import logging
from dataclasses import dataclass
from typing import List, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T

import commons
import datasets_ws
import network
from commons import UserInputError
from model.parts import Option
from recipes.base import EpochSummary, LossMeter, shared_batch_error
from recipes.places import TrainingImages, epoch_rng, gather_batch, make_epoch_loader, training_split

COSINE_EPS = 1e-8  # CosPlace's clamp of the product of the norms

OPTIONS = (
    Option("cosplace_cell_m", int, 10, "Side M of the UTM cells of --recipe cosplace's classes, in metres", minimum=1),
    Option("cosplace_bin_deg", int, 30, "Width (degrees) of the heading bins of the classes (CosPlace's alpha)",
           minimum=1),
    Option("cosplace_group_cells", int, 5, "Classes of a group are at least this many cells apart (CosPlace's N)",
           minimum=1),
    Option("cosplace_group_bins", int, 2, "... or this many heading bins apart (CosPlace's L)", minimum=1),
    Option("cosplace_groups_num", int, 8, "Groups trained in turn, one per epoch: the ones with the most classes "
           "(CosPlace's 8); fewer when fewer groups have classes", minimum=1),
    Option("cosplace_min_images", int, 10, "Classes with fewer images are dropped", minimum=1),
    Option("cosplace_batch_size", int, 32, "Classes in a batch, one image each (CosPlace's 32)", minimum=1),
    Option("cosplace_iterations_per_epoch", int, 1000,
           "Batches per epoch (CosPlace: 10000, on the 5.6 M images of SF-XL)", minimum=1),
    Option("cosplace_classifier_lr", float, 0.01, "Learning rate of the CosFace classifiers (CosPlace's; the "
           "network's is --lr, 1e-5 in CosPlace)", minimum=0),
    Option("cosplace_scale", float, 30.0, "Scale s of the CosFace logits", minimum=0),
    Option("cosplace_margin", float, 0.4, "Margin m of the CosFace logits", minimum=0),
    Option("cosplace_color_jitter", float, (0.7, 0.7, 0.7, 0.5), "Colour jitter of the training images: "
           "brightness, contrast, saturation and hue (CosPlace's; hue at most 0.5)", nargs=4,
           metavar=("B", "C", "S", "H"), minimum=0),
    Option("cosplace_crop_scale", float, 0.5, "Smallest area (fraction) of the random resized crop of the training "
           "images, to --train_resize (CosPlace's 0.5; 1 keeps whole images up to the aspect ratio)", minimum=0),
)


def check(args):
    if args.cosplace_classifier_lr <= 0:
        return f"--cosplace_classifier_lr must be positive, got {args.cosplace_classifier_lr}"
    if args.cosplace_color_jitter[3] > 0.5:
        return (f"--cosplace_color_jitter's hue (the fourth value) must be at most 0.5, got "
                f"{args.cosplace_color_jitter[3]}")
    if not 0 < args.cosplace_crop_scale <= 1:
        return f"--cosplace_crop_scale must be in (0, 1], got {args.cosplace_crop_scale}"
    return None


def run_check(args, world):
    return shared_batch_error("cosplace_batch_size", args.cosplace_batch_size, world)


# ----------------------------------------------------------------------------------------------------------
# Classes and groups (pure functions)

def class_keys(utms, headings, cell_m, bin_deg):
    """CosPlace's class of each image, int64 [n, 3]: (east, north) rounded down to the cell of `cell_m` metres, and
    the heading (degrees, taken modulo 360) rounded down to its bin of `bin_deg` degrees; heading 0 for all when
    `headings` is None."""
    utms = np.asarray(utms, dtype=np.float64).reshape(-1, 2)
    headings = np.zeros(len(utms)) if headings is None else np.mod(np.asarray(headings, dtype=np.float64), 360)
    return np.stack([np.floor_divide(utms[:, 0], cell_m) * cell_m, np.floor_divide(utms[:, 1], cell_m) * cell_m,
                     np.floor_divide(headings, bin_deg) * bin_deg], axis=1).astype(np.int64)


def group_keys(keys, cell_m, bin_deg, group_cells, group_bins):
    """CosPlace's group of classes `keys` [n, 3]: (east mod (M N)) / M, (north mod (M N)) / M,
    (heading mod (alpha L)) / alpha, int64 [n, 3]."""
    keys = np.asarray(keys, dtype=np.int64).reshape(-1, 3)
    return np.stack([keys[:, 0] % (cell_m * group_cells) // cell_m, keys[:, 1] % (cell_m * group_cells) // cell_m,
                     keys[:, 2] % (bin_deg * group_bins) // bin_deg], axis=1)


@dataclass
class ClassGroup:
    """The classes of a group: their keys (sorted; a class's label is its position) and the indices of their
    images."""
    key: Tuple[int, int, int]
    classes: List[Tuple[int, int, int]]
    images: List[np.ndarray]


def make_groups(utms, headings, cell_m, bin_deg, group_cells, group_bins, min_images):
    """The groups of the classes with at least `min_images` images, sorted by key (groups without such a class are
    left out)."""
    keys = class_keys(utms, headings, cell_m, bin_deg)
    if len(keys) == 0:
        return []
    unique, inverse, counts = np.unique(keys, axis=0, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    kept = np.flatnonzero(counts >= min_images)
    groups = {}
    for class_index in kept:  # np.unique's order: sorted keys
        group = tuple(int(g) for g in group_keys(unique[class_index], cell_m, bin_deg, group_cells, group_bins)[0])
        entry = groups.setdefault(group, ClassGroup(group, [], []))
        entry.classes.append(tuple(int(k) for k in unique[class_index]))
        entry.images.append(np.flatnonzero(inverse == class_index))
    return [groups[key] for key in sorted(groups)]


def trained_groups(groups, groups_num):
    """The `groups_num` groups with the most classes (ties: by key), in that order."""
    return sorted(groups, key=lambda group: (-len(group.classes), group.key))[:groups_num]


def epoch_batches(group, batch_size, iterations, rng):
    """(images, labels), int64 [iterations, batch_size] each: classes cut from a stream of random passes over the
    group's classes (each class once per pass), one random image of each."""
    classes_num = len(group.classes)
    needed = batch_size * iterations
    labels = np.concatenate([rng.permutation(classes_num) for _ in range(-(-needed // classes_num))])[:needed]
    images = np.array([group.images[label][rng.integers(len(group.images[label]))] for label in labels],
                      dtype=np.int64)
    return images.reshape(iterations, batch_size), labels.astype(np.int64).reshape(iterations, batch_size)


def cosface_logits(descriptors, weight, labels, scale, margin, eps=COSINE_EPS):
    """CosFace's logits [n, classes]: s (cos(descriptor, W_c) - m [c = label]), the cosine divided by the product of
    the norms clamped at `eps` (CosPlace's MarginCosineProduct)."""
    cosine = descriptors @ weight.t() / torch.outer(descriptors.norm(dim=1), weight.norm(dim=1)).clamp(min=eps)
    one_hot = F.one_hot(labels, weight.shape[0]).to(cosine.dtype)
    return scale * (cosine - margin * one_hot)


class CosFace(nn.Module):
    """A group's classifier: weights [classes, D], Xavier-uniform from `generator`."""

    def __init__(self, features_dim, classes_num, scale=30.0, margin=0.4, generator=None):
        super().__init__()
        self.scale, self.margin = scale, margin
        self.weight = nn.Parameter(torch.empty(classes_num, features_dim))
        nn.init.xavier_uniform_(self.weight, generator=generator)

    def forward(self, descriptors, labels):
        return cosface_logits(descriptors, self.weight, labels, self.scale, self.margin)


def descriptor_dim(args):
    """The size of the model's descriptors, from a model built on the meta device: no memory, no weights, no random
    numbers drawn (train.py builds the model after the recipe)."""
    if args.fc_output_dim is not None:
        return args.fc_output_dim
    meta_args = argparse.Namespace(**{**vars(args), "pretrain": "none", "off_the_shelf": "imagenet"})
    with torch.device("meta"):
        return network.build_model(meta_args).features_dim


# ----------------------------------------------------------------------------------------------------------
# The recipe

class CosPlaceRecipe:
    """See recipes/base.py for what train.py calls. The state a checkpoint keeps: the classifiers' weights and the
    batches trained so far (the batches of an epoch follow from --seed and the epoch)."""
    loss_name = "cosface"
    details_name = "cosplace_epochs"  # group, batches and classes of each epoch, in results.json

    def __init__(self, args, world, device, amp_dtype):
        self.args, self.world, self.device, self.amp_dtype = args, world, device, amp_dtype
        paths, utms = training_split(args)
        headings = datasets_ws.parse_headings(paths)
        if headings is None:
            logging.info("Some training file names have no heading (field 9): one heading bin for every image")
        groups = make_groups(utms, headings, args.cosplace_cell_m, args.cosplace_bin_deg, args.cosplace_group_cells,
                             args.cosplace_group_bins, args.cosplace_min_images)
        if not groups:
            raise UserInputError(f"No class (UTM cell of --cosplace_cell_m {args.cosplace_cell_m} m and heading bin "
                                 f"of {args.cosplace_bin_deg} degrees) has --cosplace_min_images "
                                 f"{args.cosplace_min_images} training images: lower it or raise --cosplace_cell_m")
        self.groups = trained_groups(groups, args.cosplace_groups_num)
        if len(self.groups) < args.cosplace_groups_num:
            logging.warning(f"Only {len(self.groups)} groups have classes, fewer than --cosplace_groups_num "
                            f"{args.cosplace_groups_num}: training them in turn")
        classes_num = sum(len(group.classes) for group in groups)
        logging.info(f"{classes_num} classes of at least {args.cosplace_min_images} images in {len(groups)} groups; "
                     f"training the classes of {len(self.groups)} groups: "
                     f"{', '.join(str(len(group.classes)) for group in self.groups)}")
        features_dim = descriptor_dim(args)
        # Their own generator: the model's initial weights stay those of the seed
        generator = torch.Generator().manual_seed(args.seed)
        self.classifiers = nn.ModuleList(CosFace(features_dim, len(group.classes), args.cosplace_scale,
                                                 args.cosplace_margin, generator) for group in self.groups)
        self.images_dataset = datasets_ws.ImagesDataset(paths, datasets_ws.hard_resize, args.train_resize)
        brightness, contrast, saturation, hue = args.cosplace_color_jitter
        augment = [T.ColorJitter(brightness, contrast, saturation, hue),
                   T.RandomResizedCrop(list(args.train_resize), scale=(args.cosplace_crop_scale, 1))]
        if args.rand_augment:
            augment.append(T.RandAugment(*args.rand_augment, interpolation=T.InterpolationMode.BILINEAR))
        self.training_images = TrainingImages(paths, T.Compose(augment + [datasets_ws.to_normalised_tensor]))
        self.batches_done = 0

    def trained_modules(self):
        return [(classifier, self.args.cosplace_classifier_lr) for classifier in self.classifiers]

    def train_epoch(self, model, raw_model, step, epoch_num):
        args, device = self.args, self.device
        group_num = epoch_num % len(self.groups)
        group, classifier = self.groups[group_num], self.classifiers[group_num]
        images, labels = epoch_batches(group, args.cosplace_batch_size, args.cosplace_iterations_per_epoch,
                                       epoch_rng(args.seed, epoch_num))
        loader = make_epoch_loader(self.training_images, images, args, self.world, device, epoch_num)
        model.train()
        meter = LossMeter(device)
        batches = zip(labels, commons.progress_bar(loader, "Training", total=len(labels)))
        for batch_labels, (batch_images, _) in batches:
            with torch.autocast(device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                local = model(batch_images.to(device, non_blocking=True))
            descriptors = gather_batch(local.float(), self.world)
            logits = classifier(descriptors, torch.as_tensor(batch_labels, device=device))
            loss = F.cross_entropy(logits, torch.as_tensor(batch_labels, device=device))
            step(loss)
            meter.add(loss)
        del loader
        self.batches_done += meter.batches_num
        details = {"epoch": epoch_num, "group": list(group.key), "classes": len(group.classes),
                   "batches": meter.batches_num, "batches_done": self.batches_done}
        logging.debug(f"Epoch[{epoch_num:02d}]: group {group.key} ({len(group.classes)} classes), "
                      f"{meter.batches_num} batches")
        # Every process computed the loss of the whole batches: its own mean is the epoch's
        return EpochSummary(meter.mean, meter.batches_num, [details])

    def state_dict(self):
        return {"batches_done": self.batches_done, "groups": [list(group.key) for group in self.groups],
                "classes_num": [len(group.classes) for group in self.groups],
                "classifiers": [classifier.state_dict() for classifier in self.classifiers]}

    def load_state_dict(self, state):
        self.batches_done = int(state.get("batches_done", 0))
        if "classifiers" not in state:
            return
        if (state.get("groups") != [list(group.key) for group in self.groups]
                or state.get("classes_num") != [len(group.classes) for group in self.groups]):
            logging.warning("The checkpoint's CosPlace groups differ from this training split's (another dataset or "
                            "other --cosplace_* flags): the classifiers start afresh")
            return
        for classifier, weights in zip(self.classifiers, state["classifiers"]):
            classifier.load_state_dict(weights)
