"""The GSV-Cities training of MixVPR, Conv-AP, BoQ and SALAD (--recipe places), on a datasets_vg training split.

A place is a group of training images (database and queries) around one spot (`build_places`); a batch holds
--places_per_batch places x --images_per_place images of each; pytorch-metric-learning's Multi-Similarity miner
(epsilon 0.1) and loss (alpha 1, beta 50, base 0) train on the pairs of the batch.

GSV-Cities' places are 100 m apart, so the authors label pairs by place id. Ours may be neighbours: a pair's label
comes from the distance of its images (`pair_masks`): positive within --train_positives_dist_threshold, negative
beyond --val_positive_dist_threshold, ignored in between, so that two places 12 m apart are never pushed apart.
Where the file names give headings (field 9), a near pair is positive only when its headings are within
--places_max_heading_diff degrees, and ignored otherwise (never negative); a place's images face the same way. Two
views of one spot looking in opposite directions share little, and asking for them to match stopped the learning
(measured on the synthetic street, whose cameras look both ways along it, ResNet-18 conv4 + GeM from random
weights, 10 epochs of 16 x 4: test R@1 41 -> 26 with distances alone, 41 -> 53 with headings within 45 degrees).

An epoch is one pass over the places in a random order (as the authors' epochs over GSV-Cities), the last
incomplete batch dropped; each place gives K of its images drawn at random. The order and the images depend on
--seed and the epoch only, so a resumed run trains on the batches an uninterrupted run would.

With several processes each one runs its share of the places of every batch through the model; the descriptors of
the whole batch are gathered from every process (with their gradients) before the miner and the loss, so each
process computes the loss of the whole batch. all_gather's backward sums every process's gradient of its share,
and DistributedDataParallel averages the processes' gradients: the result is the gradient of the batch's loss, as
one process would compute it.
"""
import logging
import warnings

import numpy as np
import torch
import torch.utils.data as data

import commons
import datasets_ws
from commons import UserInputError
from model.parts import Option
from recipes.base import EpochSummary, LossMeter, shared_batch_error

# The four authors' settings (training.md, section 3)
MINER_EPSILON = 0.1
LOSS_ALPHA, LOSS_BETA, LOSS_BASE = 1.0, 50.0, 0.0

OPTIONS = (
    Option("places_per_batch", int, 16,
           "Places P in a batch of --recipe places (P x --images_per_place images); an epoch is one pass over the "
           "places (--queries_per_epoch is not used). The authors use 120 (MixVPR), 100 (Conv-AP), 60 (SALAD) and "
           "128 (BoQ); 16 keeps a CPU batch small", minimum=1),
    Option("images_per_place", int, 4,
           "Images K drawn from each place in a batch; places with fewer images are left out (the authors' 4)",
           minimum=2),
    Option("places_max_heading_diff", float, 45.0,
           "Where the file names give headings (field 9): images within --train_positives_dist_threshold are "
           "positives only when their headings differ by at most this many degrees (ignored pairs otherwise), and a "
           "place's images too; 180 uses the distances alone", minimum=0),
)


def check(args):
    if args.val_positive_dist_threshold < args.train_positives_dist_threshold:
        return (f"--recipe places labels pairs within --train_positives_dist_threshold "
                f"({args.train_positives_dist_threshold} m) positive and beyond --val_positive_dist_threshold "
                f"({args.val_positive_dist_threshold} m) negative: the second must not be smaller than the first")
    return None


def run_check(args, world):
    return shared_batch_error("places_per_batch", args.places_per_batch, world)


# ----------------------------------------------------------------------------------------------------------
# Places, batches and pair labels (pure functions)

def pairwise_distances(utms):
    """Distances in metres [n, n] between the rows of `utms` [n, 2] (float64)."""
    utms = np.asarray(utms, dtype=np.float64).reshape(-1, 2)
    return np.sqrt(((utms[:, None, :] - utms[None, :, :]) ** 2).sum(-1))


def heading_differences(headings):
    """Angles in degrees [n, n] (0 to 180) between the headings [n] (degrees)."""
    headings = np.asarray(headings, dtype=np.float64).reshape(-1)
    difference = np.mod(headings[:, None] - headings[None, :], 360)
    return np.minimum(difference, 360 - difference)


def build_places(utms, radius, min_images, headings=None, max_heading_diff=180.0):
    """Greedy places over images at `utms` [n, 2]: seeds taken west to east (then south to north); a seed's place
    grows with the free images nearest to it that are within `radius` metres of every image already in it (and,
    with `headings` [n] in degrees, whose heading is within `max_heading_diff` of theirs), so all the distances
    inside a place are <= radius. A place of fewer than `min_images` images is given up: its seed joins no place,
    the others stay free for later places. Each image is in at most one place.
    Returns the places as sorted int64 arrays of image indices, in the order they were built."""
    utms = np.asarray(utms, dtype=np.float64).reshape(-1, 2)
    if len(utms) == 0:
        return []
    neighbours = datasets_ws.find_positives(utms, utms, radius)
    free = np.ones(len(utms), dtype=bool)
    places = []
    for seed in np.lexsort((utms[:, 1], utms[:, 0])):
        if not free[seed]:
            continue
        candidates = np.array([j for j in neighbours[seed] if free[j] and j != seed], dtype=np.int64)
        members = [int(seed)]
        if len(candidates):
            from_seed = np.sqrt(((utms[candidates] - utms[seed]) ** 2).sum(1))
            for j in candidates[np.argsort(from_seed, kind="stable")]:
                near = np.all(np.sqrt(((utms[members] - utms[j]) ** 2).sum(1)) <= radius)
                if near and (headings is None or
                             np.all(heading_differences(headings[members + [j]])[-1] <= max_heading_diff)):
                    members.append(int(j))
        free[seed] = False
        if len(members) >= min_images:
            free[members] = False
            places.append(np.sort(np.array(members, dtype=np.int64)))
    return places


def epoch_rng(seed, epoch_num, salt=0):
    """The NumPy generator of an epoch's draws: a function of --seed and the epoch only."""
    return np.random.default_rng([abs(int(seed)), int(seed < 0), int(epoch_num), int(salt)])


def epoch_batches(places, places_per_batch, images_per_place, rng):
    """One pass over `places` in a random order: [batches, P * K] image indices, each batch's places contiguous
    (the K images of its first place first), K images of each place drawn without replacement; the places left
    after the last full batch are not trained this epoch."""
    order = rng.permutation(len(places))
    batches_num = len(places) // places_per_batch
    rows = [rng.choice(places[place], images_per_place, replace=False)
            for place in order[:batches_num * places_per_batch]]
    return np.array(rows, dtype=np.int64).reshape(batches_num, places_per_batch * images_per_place)


def process_share(batches, rank, world_size):
    """The columns of `batches` [B, N] that process `rank` runs: its contiguous N / world_size of each batch (whole
    places when N is a multiple of K x world_size), so that the shares gathered in rank order are the batch."""
    local = batches.shape[1] // world_size
    return batches[:, rank * local:(rank + 1) * local]


def pair_masks(utms, positive_radius, negative_radius, headings=None, max_heading_diff=180.0):
    """(positives, negatives), boolean [n, n] over the images at `utms` [n, 2]: positive within `positive_radius`
    metres (and, with `headings` [n] in degrees, headings within `max_heading_diff`), negative farther than
    `negative_radius`, neither otherwise; an image is never paired with itself."""
    distances = pairwise_distances(utms)
    positives = distances <= positive_radius
    if headings is not None:
        positives &= heading_differences(headings) <= max_heading_diff
    np.fill_diagonal(positives, False)
    negatives = distances > negative_radius
    np.fill_diagonal(negatives, False)
    return positives, negatives


# ----------------------------------------------------------------------------------------------------------
# The miner and the loss of pytorch-metric-learning, given pair masks

def mine_pairs(miner, descriptors, positives, negatives):
    """pytorch-metric-learning's `miner` (MultiSimilarityMiner) with pair masks [n, n] instead of labels: it is given
    one anchor at a time, against the images that are its positives (label 1) or negatives (label 0), so that the
    ignored pairs take no part. Anchors without a positive or without a negative keep no pair, as the library's.
    Returns (anchors, positives, anchors, negatives) indices into `descriptors`, as the library's miners."""
    positives, negatives = np.asarray(positives, dtype=bool), np.asarray(negatives, dtype=bool)
    device = descriptors.device
    anchor_label = torch.ones(1, dtype=torch.long, device=device)
    parts = ([], [], [], [])
    for anchor in np.flatnonzero(positives.any(1) & negatives.any(1)):
        columns = np.flatnonzero(positives[anchor] | negatives[anchor])
        labels = torch.as_tensor(positives[anchor, columns].astype(np.int64), device=device)
        _, positive, _, negative = miner(descriptors[anchor:anchor + 1], anchor_label,
                                         descriptors[torch.as_tensor(columns, device=device)], labels)
        positive, negative = positive.cpu().numpy(), negative.cpu().numpy()
        parts[0].append(np.full(len(positive), anchor))
        parts[1].append(columns[positive])
        parts[2].append(np.full(len(negative), anchor))
        parts[3].append(columns[negative])
    return tuple(torch.as_tensor(np.concatenate(part) if part else np.zeros(0), dtype=torch.long, device=device)
                 for part in parts)


def multi_similarity_loss(miner, loss_function, descriptors, positives, negatives):
    """The loss of a batch: the mined pairs (`mine_pairs`), then pytorch-metric-learning's `loss_function`
    (MultiSimilarityLoss) over them, the mean over every descriptor. Returns (loss, mined pairs)."""
    pairs = mine_pairs(miner, descriptors, positives, negatives)
    return loss_function(descriptors, indices_tuple=pairs), pairs


def gather_batch(local, world):
    """Every process's rows `local` concatenated in rank order, with gradients flowing back to each process's own
    rows (torch.distributed.nn's all_gather); `local` itself with one process."""
    if world.world_size == 1:
        return local
    from torch.distributed.nn.functional import all_gather
    with warnings.catch_warnings():
        # Deprecated in favour of a private module (torch.distributed._functional_collectives); same gradients
        warnings.filterwarnings("ignore", "torch.distributed.nn.functional.all_gather is deprecated", FutureWarning)
        return torch.cat(all_gather(local.contiguous()))


class TrainingImages(data.Dataset):
    """Training images of a list of paths through a PIL `transform`; items (tensor, index)."""

    def __init__(self, paths, transform):
        self.paths, self.transform = list(paths), transform

    def __getitem__(self, index):
        return self.transform(datasets_ws.open_image(self.paths[index])), index

    def __len__(self):
        return len(self.paths)


def training_split(args):
    """The training split's images (database, then queries) and their UTMs [n, 2]."""
    dataset = datasets_ws.GeoDataset(args.datasets_folder, args.dataset_name, "train", args.val_positive_dist_threshold)
    logging.info(f"Train set: {dataset}")
    return dataset.images_paths, np.concatenate([dataset.database_utms, dataset.queries_utms])


def make_epoch_loader(dataset, batches, args, world, device, epoch_num):
    """The DataLoader of this process's share of `batches` [B, N]: one batch of N / world_size images each. Its
    own seeded generator: worker seeds depend on the seed and the epoch only, so a resumed run draws the same
    augmentations as an uninterrupted one."""
    share = process_share(batches, world.rank, world.world_size)
    generator = torch.Generator().manual_seed(args.seed * 100003 + epoch_num)
    return datasets_ws.make_loader(dataset, max(share.shape[1], 1), args.num_workers, device,
                                   sampler=datasets_ws.ListSampler(share.reshape(-1).tolist()), generator=generator)


# ----------------------------------------------------------------------------------------------------------
# The recipe

class PlacesRecipe:
    """See recipes/base.py for what train.py calls. The state a checkpoint keeps: the batches trained so far (the
    batches of an epoch follow from --seed and the epoch)."""
    loss_name = "multi-similarity"
    details_name = "places_epochs"  # batches, images and mean mined pairs of each epoch, in results.json

    def __init__(self, args, world, device, amp_dtype):
        self.args, self.world, self.device, self.amp_dtype = args, world, device, amp_dtype
        paths, self.utms = training_split(args)
        self.headings = datasets_ws.parse_headings(paths) if args.places_max_heading_diff < 180 else None
        if self.headings is None:
            logging.info("Pairs of training images are labelled by their distances alone")
        self.places = build_places(self.utms, args.train_positives_dist_threshold, args.images_per_place,
                                   self.headings, args.places_max_heading_diff)
        placed = sum(len(place) for place in self.places)
        facing = "" if self.headings is None else f" and {args.places_max_heading_diff:g} degrees"
        logging.info(f"{len(self.places)} places of at least {args.images_per_place} images within "
                     f"{args.train_positives_dist_threshold} m{facing} of each other; {placed} of the {len(paths)} "
                     f"training images are in one")
        if len(self.places) < args.places_per_batch:
            raise UserInputError(f"The training split has {len(self.places)} places of at least --images_per_place "
                                 f"{args.images_per_place} images within --train_positives_dist_threshold "
                                 f"{args.train_positives_dist_threshold} m, fewer than --places_per_batch "
                                 f"{args.places_per_batch}: lower one of these flags")
        self.images_dataset = datasets_ws.ImagesDataset(paths, datasets_ws.hard_resize, args.train_resize)
        self.training_images = TrainingImages(
            paths, datasets_ws.database_training_transform(args.train_resize, args.rand_augment))
        # Imported here: a second of every process's start-up (scipy) that the other recipes and eval.py skip
        from pytorch_metric_learning.losses import MultiSimilarityLoss
        from pytorch_metric_learning.miners import MultiSimilarityMiner
        self.miner = MultiSimilarityMiner(epsilon=MINER_EPSILON)
        self.loss_function = MultiSimilarityLoss(alpha=LOSS_ALPHA, beta=LOSS_BETA, base=LOSS_BASE)
        self.batches_done = 0

    def trained_modules(self):
        return []

    def train_epoch(self, model, raw_model, step, epoch_num):
        args, device = self.args, self.device
        batches = epoch_batches(self.places, args.places_per_batch, args.images_per_place,
                                epoch_rng(args.seed, epoch_num))
        loader = make_epoch_loader(self.training_images, batches, args, self.world, device, epoch_num)
        model.train()
        meter = LossMeter(device)
        positive_pairs, negative_pairs = 0, 0
        for batch, (images, _) in zip(batches, commons.progress_bar(loader, "Training", total=len(batches))):
            with torch.autocast(device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                local = model(images.to(device, non_blocking=True))
            descriptors = gather_batch(local.float(), self.world)
            positives, negatives = pair_masks(self.utms[batch], args.train_positives_dist_threshold,
                                              args.val_positive_dist_threshold,
                                              None if self.headings is None else self.headings[batch],
                                              args.places_max_heading_diff)
            loss, pairs = multi_similarity_loss(self.miner, self.loss_function, descriptors, positives, negatives)
            step(loss)
            meter.add(loss)
            positive_pairs += len(pairs[0])
            negative_pairs += len(pairs[2])
        del loader
        self.batches_done += meter.batches_num
        batches_num = max(meter.batches_num, 1)
        # Every process computed the loss of the whole batches: its own mean is the epoch's
        details = {"epoch": epoch_num, "batches": meter.batches_num, "batches_done": self.batches_done,
                   "trained_images": int(batches.size), "mined_positive_pairs": positive_pairs / batches_num,
                   "mined_negative_pairs": negative_pairs / batches_num}
        logging.debug(f"Epoch[{epoch_num:02d}]: {meter.batches_num} batches of {batches.shape[1]} images, "
                      f"mined pairs per batch: {details['mined_positive_pairs']:.1f} positive, "
                      f"{details['mined_negative_pairs']:.1f} negative")
        return EpochSummary(meter.mean, meter.batches_num, [details])

    def state_dict(self):
        return {"batches_done": self.batches_done, "places_num": len(self.places)}

    def load_state_dict(self, state):
        if state.get("places_num", len(self.places)) != len(self.places):
            logging.warning(f"The checkpoint's training split had {state['places_num']} places, this one has "
                            f"{len(self.places)}: the batches differ from the interrupted run's")
        self.batches_done = int(state.get("batches_done", 0))
