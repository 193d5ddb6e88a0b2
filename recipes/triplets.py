"""The original benchmark's training (--recipe triplets): each epoch, --queries_per_epoch queries in loops of
--cache_refresh_rate; each loop recomputes the feature cache with the current model, mines (query, best positive,
hard negatives) groups (mining.py) and trains on them with the triplet or SARE losses (model/losses.py).

With several processes each one caches features and trains its share of every batch; rank 0 alone mines.
"""
import logging
import math
import time

import numpy as np
import torch
import torch.utils.data as data
import torchvision.transforms as T

import commons
import datasets_ws
import mining
from commons import UserInputError
from model.losses import LOSSES
from model.parts import Option
from recipes.base import EpochSummary, LossMeter, shared_batch_error

OPTIONS = (
    Option("criterion", str, "triplet", "Loss to be used", choices=tuple(LOSSES)),
    Option("margin", float, 0.1, "Margin of the triplet loss", minimum=0),
    Option("cache_refresh_rate", int, 1000, "Number of queries after which the feature cache is recomputed",
           minimum=1),
    Option("negs_num_per_query", int, 10, "Number of negatives per query", minimum=1),
    Option("neg_samples_num", int, 1000, "Number of database images sampled to mine negatives from", minimum=1),
    Option("mining", str, "partial", "Hard-negative mining method", choices=tuple(mining.MINING_METHODS)),
)


def check(args):
    if args.queries_per_epoch % args.cache_refresh_rate != 0:
        return (f"--queries_per_epoch ({args.queries_per_epoch}) must be a multiple of --cache_refresh_rate "
                f"({args.cache_refresh_rate}): change one of them")
    if args.mining == "msls_weighted" and args.dataset_name != "msls":
        return (f"--mining msls_weighted needs the msls dataset (it reads MSLS file-name notes), but --dataset_name "
                f"is {args.dataset_name}: use another --mining")
    return None


def run_check(args, world):
    message = shared_batch_error("train_batch_size", args.train_batch_size, world)
    if message:
        return message
    if args.cache_refresh_rate < args.train_batch_size:
        return (f"--cache_refresh_rate {args.cache_refresh_rate} is smaller than --train_batch_size "
                f"{args.train_batch_size}: no full batch could be trained. Raise the first or lower the second")
    return None


# ----------------------------------------------------------------------------------------------------------
# Triplets of (query, best positive, negatives) images
#
# Unlike evaluation (normalise, then resize the tensor), training images are resized as PIL images before ToTensor
# and normalisation, as in the original's training; queries get the augmentations first.

class TripletsDataset(datasets_ws.GeoDataset, data.Dataset):
    """The training split: GeoDataset plus hard positives, and images of triplet groups.

    Hard positives: database images within `hard_positives_dist_threshold` metres (--train_positives_dist_threshold).
    Queries without any are removed (with their coordinates and soft positives), and their count logged.
    Soft positives (within --val_positive_dist_threshold) are never used as negatives.

    An item is fetched by a triplet row (query index, positive database index, negative database indexes...),
    as the mining returns them (see mining.py): it gives the images [2 + negatives, 3, H, W] and the row.
    `images_paths` (database, then the kept queries) is what the mining's cache indexes.
    """

    def __init__(self, datasets_folder, dataset_name, split="train", *, resize, hard_positives_dist_threshold=10,
                 soft_positives_dist_threshold=25, query_transform=None):
        super().__init__(datasets_folder, dataset_name, split, soft_positives_dist_threshold)
        hard_positives = datasets_ws.find_positives(self.database_utms, self.queries_utms,
                                                    hard_positives_dist_threshold)
        keep = np.array([len(p) > 0 for p in hard_positives], dtype=bool)
        removed_num = int((~keep).sum())
        if removed_num:
            logging.info(f"There are {removed_num} queries without any positives within "
                         f"{hard_positives_dist_threshold} m in the training set. They won't be considered as "
                         "they're useless for training.")
        if not keep.any():
            raise UserInputError(f"No training query of {self.dataset_folder} has a database image within "
                                 f"{hard_positives_dist_threshold} m (--train_positives_dist_threshold): raise the "
                                 "threshold or check the coordinates in the file names")
        self.hard_positives_per_query = [p for p, k in zip(hard_positives, keep) if k]
        self.soft_positives_per_query = [p for p, k in zip(self.soft_positives_per_query, keep) if k]
        self.queries_paths = [p for p, k in zip(self.queries_paths, keep) if k]
        self.queries_utms = self.queries_utms[keep]
        self.queries_num = len(self.queries_paths)
        self.images_paths = self.database_paths + self.queries_paths
        self.resize = list(resize)
        self.query_transform = query_transform or datasets_ws.query_training_transform(resize)
        self.database_transform = datasets_ws.database_training_transform(resize)

    def __getitem__(self, triplet):
        query_index, positive_index, *negative_indexes = (int(i) for i in triplet)
        query = self.query_transform(datasets_ws.open_image(self.queries_paths[query_index]))
        others = [self.database_transform(datasets_ws.open_image(self.database_paths[i]))
                  for i in (positive_index, *negative_indexes)]
        return torch.stack([query] + others), torch.as_tensor(np.asarray(triplet, dtype=np.int64))


def triplets_collate_fn(batch):
    """Stack B groups of images into [B * (2 + negatives), 3, H, W] (each group contiguous: query, positive,
    negatives) and their rows into [B, 2 + negatives]."""
    images = torch.cat([images for images, _ in batch])
    triplets = torch.stack([triplet for _, triplet in batch])
    return images, triplets


def split_triplets_features(features, groups_num):
    """Model outputs of a triplets batch [B * (2 + N), D] -> queries [B, D], positives [B, D], negatives [B, N, D]."""
    features = features.view(groups_num, -1, features.shape[-1])
    return features[:, 0], features[:, 1], features[:, 2:]


def process_share_of_batches(triplets, batch_size, rank, world_size):
    """The triplet rows process `rank` trains on: of each batch of `batch_size` consecutive rows (an
    incomplete last batch is dropped), its contiguous batch_size / world_size rows, as tuples."""
    local_size = batch_size // world_size
    rows = []
    for start in range(0, len(triplets) - batch_size + 1, batch_size):
        share = triplets[start + rank * local_size:start + (rank + 1) * local_size]
        rows.extend(tuple(int(i) for i in row) for row in share)
    return rows


# ----------------------------------------------------------------------------------------------------------
# One refresh: sample, cache, mine; then train on the mined groups

def refresh_triplets(miner, extractor, model, queries_count, images_num, world, timings=None):
    """Sample queries, cache the features the mining needs (shared among the processes) and mine.
    Rank 0 samples and mines; the triplets [queries_count, 2 + negs] reach every process.
    `timings` (a dict), when given, receives cache_seconds, mining_seconds and cached_images."""
    plan = commons.broadcast_object(miner.plan(queries_count) if world.rank == 0 else None, world)
    cache_start = time.perf_counter()
    features = extractor(model, plan.cache_indexes, model.features_dim)
    mining_start = time.perf_counter()
    triplets = None
    if world.rank == 0:
        cache = mining.FeatureCache(plan.cache_indexes, features, images_num)
        triplets = miner.mine(plan, cache)
    triplets = commons.broadcast_object(triplets, world)
    if timings is not None:
        timings.update(cache_seconds=mining_start - cache_start, mining_seconds=time.perf_counter() - mining_start,
                       cached_images=len(plan.cache_indexes))
    return triplets


def train_on_triplets(model, loader, step, loss_function, margin, horizontal_flip, device, amp_dtype):
    """One pass over the mined groups. Returns the LossMeter of its batches."""
    model.train()
    meter = LossMeter(device)
    for images, triplets in commons.progress_bar(loader, "Training"):
        if horizontal_flip:
            images = T.RandomHorizontalFlip()(images)  # all the groups of the batch, or none
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            features = model(images.to(device, non_blocking=True))
        queries, positives, negatives = split_triplets_features(features.float(), len(triplets))
        loss = loss_function(queries, positives, negatives, margin)
        step(loss)
        meter.add(loss)
    return meter


class TripletsRecipe:
    """See recipes/base.py for what train.py calls."""
    loss_name = "triplet"
    details_name = "refresh_timings"  # seconds of caching, mining and training of each refresh, in results.json

    def __init__(self, args, world, device, amp_dtype):
        self.args, self.world, self.device, self.amp_dtype = args, world, device, amp_dtype
        query_transform = datasets_ws.query_training_transform(
            args.train_resize, args.brightness, args.contrast, args.saturation, args.hue, args.rand_perspective,
            args.random_resized_crop, args.random_rotation, args.rand_augment)
        self.dataset = TripletsDataset(
            args.datasets_folder, args.dataset_name, "train", resize=args.train_resize,
            hard_positives_dist_threshold=args.train_positives_dist_threshold,
            soft_positives_dist_threshold=args.val_positive_dist_threshold, query_transform=query_transform)
        logging.info(f"Train query set: {self.dataset}")
        self.images_dataset = datasets_ws.ImagesDataset(self.dataset.images_paths, datasets_ws.hard_resize,
                                                        args.train_resize)
        self.miner = mining.make_miner(args.mining, self.dataset, args.negs_num_per_query, args.neg_samples_num)
        self.queries_per_refresh = args.cache_refresh_rate
        if self.queries_per_refresh > self.dataset.queries_num:
            logging.warning(f"--cache_refresh_rate {args.cache_refresh_rate} is larger than the "
                            f"{self.dataset.queries_num} training queries: each refresh uses all of them")
            self.queries_per_refresh = self.dataset.queries_num
        self.extractor = mining.FeatureExtractor(self.images_dataset, args.infer_batch_size, args.num_workers, device,
                                                 world, amp_dtype)
        self.sampler = datasets_ws.ListSampler()
        self.loss_function = LOSSES[args.criterion]

    def trained_modules(self):
        return []

    def _loader(self, epoch_num):
        # Its own seeded generator: worker seeds depend on the seed and the epoch only, so a resumed run draws the
        # same augmentations as an uninterrupted one
        generator = torch.Generator().manual_seed(self.args.seed * 100003 + epoch_num)
        return datasets_ws.make_loader(self.dataset, self.args.train_batch_size // self.world.world_size,
                                       self.args.num_workers, self.device, sampler=self.sampler,
                                       collate_fn=triplets_collate_fn, drop_last=True, generator=generator,
                                       persistent_workers=self.args.num_workers > 0)

    def train_epoch(self, model, raw_model, step, epoch_num):
        args, world = self.args, self.world
        loops_num = math.ceil(args.queries_per_epoch / args.cache_refresh_rate)
        loss_sum, batches_num, refreshes = 0.0, 0, []
        loader = self._loader(epoch_num)
        for loop_num in range(loops_num):
            logging.debug(f"Cache: {loop_num} / {loops_num}")
            refresh = {"epoch": epoch_num, "loop": loop_num}
            triplets = refresh_triplets(self.miner, self.extractor, raw_model, self.queries_per_refresh,
                                        len(self.dataset.images_paths), world, refresh)
            self.sampler.items = process_share_of_batches(triplets, args.train_batch_size, world.rank,
                                                          world.world_size)
            training_start = time.perf_counter()
            meter = train_on_triplets(model, loader, step, self.loss_function, args.margin, args.horizontal_flip,
                                      self.device, self.amp_dtype)
            # Images of every process (each trained on its share of the same batches)
            refresh.update(training_seconds=time.perf_counter() - training_start,
                           trained_images=meter.batches_num * args.train_batch_size * triplets.shape[1])
            refreshes.append(refresh)
            logging.debug(f"Refresh {loop_num}: {refresh['cached_images']} images cached in "
                          f"{refresh['cache_seconds']:.1f} s, mined in {refresh['mining_seconds']:.2f} s, "
                          f"{refresh['trained_images']} images trained in {refresh['training_seconds']:.1f} s")
            # Every process trained on its share of the same batches: their mean is the batches' loss
            loss_sum += commons.all_reduce_mean(meter.sum.item(), world)
            batches_num += meter.batches_num
            logging.debug(f"Epoch[{epoch_num:02d}]({loop_num}/{loops_num}): current batch triplet loss = "
                          f"{commons.all_reduce_mean(meter.last.item(), world):.4f}, average epoch triplet loss = "
                          f"{loss_sum / max(batches_num, 1):.4f}")
        del loader  # ends its worker processes
        return EpochSummary(loss_sum / max(batches_num, 1), batches_num, refreshes)

    def state_dict(self):
        return {"mining": self.args.mining, "mining_state": self.miner.state_dict()}

    def load_state_dict(self, state):
        if state.get("mining") == self.args.mining and state.get("mining_state"):
            self.miner.load_state_dict(state["mining_state"])
