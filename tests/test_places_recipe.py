"""--recipe places (recipes/places.py): places, batches and pair labels against plain loops, the
pytorch-metric-learning miner and loss against the formulas of training.md section 3, the gathered loss of two
processes against one, a resume that continues as an uninterrupted run, and (slow) learning from random weights."""
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning.losses import MultiSimilarityLoss
from pytorch_metric_learning.miners import MultiSimilarityMiner

import commons
import parser as vg_parser
import tiny_dataset
import train
from recipes import RECIPES, places
from run_folders import last_checkpoint, results, run_folder


def random_utms(seed, n=300, side=200.0):
    """Clusters of images (places of a street) and scattered ones, on a grid of 0.5 m so that some distances are
    exactly the thresholds."""
    rng = np.random.default_rng(seed)
    centres = rng.uniform(0, side, (n // 6, 2))
    clustered = centres[rng.integers(len(centres), size=n // 2)] + rng.normal(0, 4, (n // 2, 2))
    scattered = rng.uniform(0, side, (n - n // 2, 2))
    return np.round(np.concatenate([clustered, scattered]) * 2) / 2


# ----------------------------------------------------------------------------------------------------------
# Places, batches, pair labels

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_places_hold_nearby_images_once_and_at_least_k(seed):
    utms = random_utms(seed)
    # An isolated pair (below K = 4) and an isolated group of exactly 4 (a place)
    utms = np.concatenate([utms, [[1000, 1000], [1003, 1000], [2000, 2000], [2003, 2000], [2000, 2004],
                                  [2003, 2004]]])
    built = places.build_places(utms, 10, 4)
    members = np.concatenate(built)
    assert len(members) == len(np.unique(members))  # every image in at most one place
    for place in built:
        assert len(place) >= 4
        assert list(place) == sorted(place)
        for i in place:
            for j in place:
                assert math.dist(utms[i], utms[j]) <= 10
    n = len(utms)
    assert not {n - 6, n - 5} & set(members)
    assert any(sorted(place) == [n - 4, n - 3, n - 2, n - 1] for place in built)
    assert len(members) > n / 3  # the clusters make places
    again = places.build_places(utms, 10, 4)
    assert len(again) == len(built) and all(np.array_equal(a, b) for a, b in zip(again, built))


def test_batches_are_p_places_of_k_of_their_images():
    utms = random_utms(3, n=600)
    built = places.build_places(utms, 10, 4)
    place_of = {int(i): p for p, place in enumerate(built) for i in place}
    batches = places.epoch_batches(built, 5, 4, places.epoch_rng(0, 3))
    assert batches.shape == (len(built) // 5, 20)
    seen = []
    for batch in batches:
        groups = batch.reshape(5, 4)
        for group in groups:
            owners = {place_of[int(i)] for i in group}
            assert len(owners) == 1 and len(set(group)) == 4  # K different images of one place
            seen.append(owners.pop())
    assert len(seen) == len(set(seen))  # each place at most once per epoch
    again = places.epoch_batches(built, 5, 4, places.epoch_rng(0, 3))
    assert np.array_equal(batches, again)  # the seed and the epoch decide
    assert not np.array_equal(batches, places.epoch_batches(built, 5, 4, places.epoch_rng(0, 4)))
    shares = [places.process_share(batches, rank, 5) for rank in range(5)]
    assert np.array_equal(np.concatenate(shares, axis=1), batches)
    assert all(share.shape == (len(batches), 4) for share in shares)  # whole places


def heading_difference(a, b):
    difference = abs(a - b) % 360
    return min(difference, 360 - difference)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("with_headings", [False, True])
def test_pair_masks_against_a_loop(seed, with_headings):
    rng = np.random.default_rng(seed)
    utms = np.round(rng.uniform(0, 60, (70, 2)))
    # Distances of exactly 10 and 25 m (3-4-5 triangles) and a duplicate position
    utms = np.concatenate([utms, [[0, 0], [6, 8], [15, 20], [0, 0], [-7, 24]]])
    headings = np.round(rng.uniform(-30, 400, len(utms))) if with_headings else None
    if with_headings:
        headings[-5:] = [350, 35, 0, 215, 45]  # 45 degrees apart across north, and exactly 45
    positives, negatives = places.pair_masks(utms, 10, 25, headings, 45)
    for i in range(len(utms)):
        for j in range(len(utms)):
            distance = math.sqrt((utms[i][0] - utms[j][0]) ** 2 + (utms[i][1] - utms[j][1]) ** 2)
            facing = not with_headings or heading_difference(headings[i], headings[j]) <= 45
            assert positives[i, j] == (i != j and distance <= 10 and facing), (i, j, distance)
            assert negatives[i, j] == (i != j and distance > 25), (i, j, distance)
    assert not (positives & negatives).any()
    ignored = ~positives & ~negatives & ~np.eye(len(utms), dtype=bool)
    assert positives.any() and negatives.any() and ignored.any()
    if with_headings:
        n = len(utms)
        assert positives[n - 5, n - 4] and not positives[n - 5, n - 2]  # 10 m: 45 degrees apart, and 135


def test_places_with_headings_face_the_same_way():
    utms = random_utms(4, n=600)
    headings = np.random.default_rng(4).choice([0.0, 20.0, 90.0, 180.0, 350.0], len(utms))
    built = places.build_places(utms, 10, 4, headings, 45)
    members = np.concatenate(built)
    assert len(members) == len(np.unique(members)) and len(built) > 10
    for place in built:
        assert len(place) >= 4
        for i in place:
            for j in place:
                assert math.dist(utms[i], utms[j]) <= 10 and heading_difference(headings[i], headings[j]) <= 45
    # 180 degrees: the distances alone
    assert all(np.array_equal(a, b) for a, b in zip(places.build_places(utms, 10, 4, headings, 180),
                                                    places.build_places(utms, 10, 4)))


# ----------------------------------------------------------------------------------------------------------
# The miner and the loss

def formula_loss(descriptors, positives, negatives, epsilon=0.1, alpha=1.0, beta=50.0, base=0.0):
    """training.md section 3 with loops in float64: mined pairs, L_i, the mean over all rows."""
    x = descriptors.double()
    x = x / x.norm(dim=1, keepdim=True)
    s = (x @ x.t()).tolist()
    n = len(s)
    mined_positives, mined_negatives, losses = set(), set(), []
    for i in range(n):
        positive = [j for j in range(n) if positives[i][j]]
        negative = [j for j in range(n) if negatives[i][j]]
        hard_positive = [p for p in positive if negative and s[i][p] - epsilon < max(s[i][k] for k in negative)]
        hard_negative = [k for k in negative if positive and s[i][k] + epsilon > min(s[i][p] for p in positive)]
        mined_positives |= {(i, p) for p in hard_positive}
        mined_negatives |= {(i, k) for k in hard_negative}
        loss = 0.0
        if hard_positive:
            loss += math.log(1 + sum(math.exp(-alpha * (s[i][p] - base)) for p in hard_positive)) / alpha
        if hard_negative:
            loss += math.log(1 + sum(math.exp(beta * (s[i][k] - base)) for k in hard_negative)) / beta
        losses.append(loss)
    return sum(losses) / n, mined_positives, mined_negatives, s


def hand_built_batch(seed):
    """8 images along a street (pairs 3 m apart, others 9 to 14 m: positives, ignored and negatives), descriptors
    near each other so that the miner keeps some pairs and leaves others."""
    eastings = [0, 3, 12, 14, 40, 42, 100, 103]
    utms = np.array([[east, 0.0] for east in eastings])
    generator = torch.Generator().manual_seed(seed)
    common = torch.randn(16, generator=generator)
    descriptors = F.normalize(common + 0.6 * torch.randn(8, 16, generator=generator), dim=1)
    return utms, descriptors


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_miner_and_loss_of_the_library_equal_the_formulas(seed):
    utms, descriptors = hand_built_batch(seed)
    positives, negatives = places.pair_masks(utms, 10, 25)
    assert positives[1, 2] and not positives[0, 2] and not negatives[0, 2] and negatives[3, 4]  # 9, 12 and 26 m
    expected, expected_positives, expected_negatives, s = formula_loss(descriptors, positives, negatives)
    # No similarity is within 1e-4 of a mining threshold, where float32 could decide otherwise
    for i in range(8):
        row_positives = [s[i][j] for j in range(8) if positives[i, j]]
        row_negatives = [s[i][j] for j in range(8) if negatives[i, j]]
        if row_positives and row_negatives:
            for value in row_positives:
                assert abs(value - 0.1 - max(row_negatives)) > 1e-4
            for value in row_negatives:
                assert abs(value + 0.1 - min(row_positives)) > 1e-4
    descriptors.requires_grad_(True)
    miner = MultiSimilarityMiner(epsilon=0.1)
    loss_function = MultiSimilarityLoss(alpha=1, beta=50, base=0)
    loss, (a1, p, a2, n) = places.multi_similarity_loss(miner, loss_function, descriptors, positives, negatives)
    assert set(zip(a1.tolist(), p.tolist())) == expected_positives
    assert set(zip(a2.tolist(), n.tolist())) == expected_negatives
    assert expected_positives and expected_negatives  # the batch exercises both kinds
    assert len(expected_negatives) < int(negatives.sum())  # ... and leaves easy negatives out
    assert loss.item() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    loss.backward()
    assert descriptors.grad.abs().sum() > 0


def test_a_batch_without_negatives_gives_a_zero_loss_with_a_graph():
    utms = np.array([[0.0, 0.0], [3.0, 0.0], [5.0, 0.0], [20.0, 0.0]])  # positives and ignored pairs only
    descriptors = F.normalize(torch.randn(4, 8), dim=1).requires_grad_(True)
    positives, negatives = places.pair_masks(utms, 10, 25)
    loss, pairs = places.multi_similarity_loss(MultiSimilarityMiner(0.1), MultiSimilarityLoss(1, 50, 0), descriptors,
                                               positives, negatives)
    assert all(len(part) == 0 for part in pairs) and loss.item() == 0
    loss.backward()
    assert torch.equal(descriptors.grad, torch.zeros_like(descriptors))


# ----------------------------------------------------------------------------------------------------------
# Two processes: each runs its share, the loss is the whole batch's

def _gathered_gradient_worker(rank, world_size, port, inputs, utms, folder):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        world = commons.DistributedContext(rank, world_size, rank, torch.device("cpu"))
        torch.manual_seed(0)
        layer = torch.nn.Linear(inputs.shape[1], 8)
        model = torch.nn.parallel.DistributedDataParallel(layer)
        local = inputs.shape[0] // world_size
        descriptors = places.gather_batch(F.normalize(model(inputs[rank * local:(rank + 1) * local]), dim=1), world)
        positives, negatives = places.pair_masks(utms, 10, 25)
        loss, _ = places.multi_similarity_loss(MultiSimilarityMiner(0.1), MultiSimilarityLoss(1, 50, 0), descriptors,
                                               positives, negatives)
        loss.backward()
        torch.save({"loss": loss.detach(), "grad": layer.weight.grad, "bias_grad": layer.bias.grad},
                   os.path.join(folder, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def _free_port():
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_processes_get_the_gradient_of_the_whole_batch(tmp_path):
    """gather_batch (torch.distributed.nn's all_gather) and DistributedDataParallel's average: the gradient of the
    loss of the whole batch, as one process computes it. Two spawned gloo processes: seconds of start-up."""
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(8, 6, generator=generator)
    utms = np.array([[0.0, 0], [3, 0], [12, 0], [14, 0], [40, 0], [42, 0], [100, 0], [103, 0]])
    torch.multiprocessing.start_processes(_gathered_gradient_worker, args=(2, _free_port(), inputs, utms,
                                                                           str(tmp_path)),
                                          nprocs=2, start_method="spawn")
    torch.manual_seed(0)
    layer = torch.nn.Linear(6, 8)
    positives, negatives = places.pair_masks(utms, 10, 25)
    loss, _ = places.multi_similarity_loss(MultiSimilarityMiner(0.1), MultiSimilarityLoss(1, 50, 0),
                                           F.normalize(layer(inputs), dim=1), positives, negatives)
    loss.backward()
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert result["loss"].item() == pytest.approx(loss.item(), rel=1e-6)
        torch.testing.assert_close(result["grad"], layer.weight.grad, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(result["bias_grad"], layer.bias.grad, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------------------------------------
# Flags

def test_flags_and_their_checks(capsys):
    help_text = vg_parser.build_parser().format_help()
    assert "--recipe places:" in help_text and "--places_per_batch" in help_text and "one pass over" in help_text
    args = vg_parser.parse_arguments(["--recipe", "places", "--device", "cpu"], require_dataset=False)
    assert (args.places_per_batch, args.images_per_place, args.places_max_heading_diff) == (16, 4, 45)
    with pytest.raises(SystemExit):
        vg_parser.parse_arguments(["--recipe", "places", "--device", "cpu", "--train_positives_dist_threshold", "30"],
                                  require_dataset=False)
    assert "must not be smaller than the first" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        vg_parser.parse_arguments(["--recipe", "places", "--device", "cpu", "--images_per_place", "1"],
                                  require_dataset=False)
    world = commons.DistributedContext(0, 3, 0, torch.device("cpu"))
    assert "multiple of the number of processes (3)" in RECIPES["places"].run_check(args, world)
    assert RECIPES["places"].run_check(args, world._replace(world_size=2)) is None


# ----------------------------------------------------------------------------------------------------------
# Checkpoints and resume, through train.py

def _flags(save_dir):
    # The tiny training split: 6 places of 2 images (a database image and a query 2 m away), 100 m apart
    return ["--datasets_folder", "data", "--dataset_name", "tiny", "--pretrain", "none", "--device", "cpu",
            "--num_workers", "0", "--resize", "16", "16", "--infer_batch_size", "8", "--save_dir", save_dir,
            "--quiet", "--backbone", "resnet18conv4", "--aggregation", "gem", "--recipe", "places",
            "--places_per_batch", "2", "--images_per_place", "2", "--lr", "0.001", "--patience", "5"]


def test_resumed_run_continues_as_an_uninterrupted_one(in_process_runs):
    tiny_dataset.write_dataset("data", "tiny", splits=("train", "val", "test"))
    train.main(_flags("first") + ["--epochs_num", "1"])
    first = run_folder("first")
    state = last_checkpoint(first)
    assert state["recipe"] == "places" and state["recipe_state"] == {"batches_done": 3, "places_num": 6}
    assert results(first)["places_epochs"][0]["batches"] == 3

    train.main(_flags("resumed") + ["--epochs_num", "2", "--resume", os.path.join(first, "last_model.pth")])
    resumed = run_folder("resumed")
    (epoch,) = results(resumed)["places_epochs"]
    assert (epoch["epoch"], epoch["batches"], epoch["batches_done"]) == (1, 3, 6)  # continues at the same step

    train.main(_flags("whole") + ["--epochs_num", "2"])
    whole = run_folder("whole")
    assert [e["batches_done"] for e in results(whole)["places_epochs"]] == [3, 6]
    resumed_state, whole_state = last_checkpoint(resumed), last_checkpoint(whole)
    assert resumed_state["recipe_state"] == whole_state["recipe_state"] == {"batches_done": 6, "places_num": 6}
    assert resumed_state["training_step_state"] == whole_state["training_step_state"] == {"steps_done": 6}
    for key, value in whole_state["model_state_dict"].items():
        assert torch.equal(value, resumed_state["model_state_dict"][key]), key
    for key, state in whole_state["optimizer_state_dict"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, resumed_state["optimizer_state_dict"]["state"][key][name]), (key, name)
