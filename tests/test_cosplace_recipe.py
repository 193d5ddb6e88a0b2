"""--recipe cosplace (recipes/cosplace.py): classes and groups on a grid of positions and headings, CosFace's logits
against the formula, class-balanced batches, checkpoints that keep the classifiers and a resume that continues as an
uninterrupted run, and (slow) learning from random weights."""
import math
import os

import numpy as np
import pytest
import torch

import commons
import datasets_ws
import make_synthetic_dataset
import network
import parser as vg_parser
import train
from recipes import RECIPES, cosplace
from run_folders import last_checkpoint, results, run_folder


# ----------------------------------------------------------------------------------------------------------
# Classes and groups

def grid(step=2.5, side=100.0, headings=(0.0, 14.0, 29.9, 30.0, 95.0, 181.0, 359.5)):
    """Positions every `step` metres on a square (around real UTM values, and one negative column) and every
    heading at each."""
    axis = np.arange(-step, side, step)
    east, north, heading = np.meshgrid(500000 + axis, 4100000 + axis, headings, indexing="ij")
    return np.stack([east.ravel(), north.ravel()], axis=1), heading.ravel()


def test_class_and_group_ids_follow_cosplace():
    utms, headings = grid()
    keys = cosplace.class_keys(utms, headings, 10, 30)
    groups = cosplace.group_keys(keys, 10, 30, 5, 2)
    for (east, north), heading, key, group in zip(utms, headings, keys, groups):
        expected = (math.floor(east / 10) * 10, math.floor(north / 10) * 10, math.floor(heading / 30) * 30)
        assert tuple(key) == expected
        assert tuple(group) == (expected[0] % 50 // 10, expected[1] % 50 // 10, expected[2] % 60 // 30)
    assert set(map(tuple, groups)) == {(e, n, h) for e in range(5) for n in range(5) for h in range(2)}
    # One heading bin when the names have none
    assert (cosplace.class_keys(utms, None, 10, 30)[:, 2] == 0).all()
    assert (cosplace.class_keys(utms[:2], [-30, 390], 10, 30)[:, 2] == [330, 30]).all()  # headings modulo 360


@pytest.mark.parametrize("cell_m, bin_deg, group_cells, group_bins", [(10, 30, 5, 2), (20, 45, 2, 1), (10, 30, 3, 3)])
def test_same_group_classes_are_n_cells_or_l_bins_apart_and_small_classes_are_dropped(cell_m, bin_deg, group_cells,
                                                                                      group_bins):
    utms, headings = grid()
    rng = np.random.default_rng(0)
    keep = rng.random(len(utms)) < 0.6  # classes of various sizes
    utms, headings = utms[keep], headings[keep]
    min_images = 10
    groups = cosplace.make_groups(utms, headings, cell_m, bin_deg, group_cells, group_bins, min_images)
    keys = cosplace.class_keys(utms, headings, cell_m, bin_deg)
    counts = {}
    for key in map(tuple, keys):
        counts[key] = counts.get(key, 0) + 1
    kept = {key for key, count in counts.items() if count >= min_images}
    assert kept and len(kept) < len(counts)  # some classes are dropped
    assert {key for group in groups for key in group.classes} == kept
    assert [group.key for group in groups] == sorted(group.key for group in groups)
    for group in groups:
        assert group.classes == sorted(group.classes)
        for key, images in zip(group.classes, group.images):
            assert len(images) == counts[key] and all(tuple(keys[i]) == key for i in images)
            group_key = cosplace.group_keys([key], cell_m, bin_deg, group_cells, group_bins)[0]
            assert tuple(group_key) == group.key
        cells = [(east // cell_m, north // cell_m, heading // bin_deg) for east, north, heading in group.classes]
        for a in range(len(cells)):
            for b in range(a + 1, len(cells)):
                apart = [abs(cells[a][0] - cells[b][0]), abs(cells[a][1] - cells[b][1]),
                         abs(cells[a][2] - cells[b][2])]
                assert apart[0] >= group_cells or apart[1] >= group_cells or apart[2] >= group_bins
    largest = cosplace.trained_groups(groups, 3)
    sizes = sorted((len(group.classes) for group in groups), reverse=True)
    assert [len(group.classes) for group in largest] == sizes[:3]


def test_headings_are_read_from_field_9():
    names = ["@0499216.80@4099798.32@@@@@@@075.7@@@@@train_database_00000@.jpg",
             "/a/b/@1@2@@@@@@@359.9@@@@@@.png"]
    assert datasets_ws.parse_headings(names).tolist() == [75.7, 359.9]
    assert datasets_ws.parse_headings(names + ["@1@2@.png"]) is None  # no field 9
    assert datasets_ws.parse_headings(names + ["@1@2@@@@@@@@@@@@@@.png"]) is None  # an empty one
    assert datasets_ws.parse_headings([]).shape == (0,)


# ----------------------------------------------------------------------------------------------------------
# CosFace and the batches

def test_cosface_logits_equal_the_formula():
    generator = torch.Generator().manual_seed(0)
    descriptors = torch.randn(5, 7, generator=generator, dtype=torch.float64)
    descriptors[2] = 0  # a zero descriptor: the clamped norms give cosines of 0
    weight = torch.randn(4, 7, generator=generator, dtype=torch.float64)
    labels = torch.tensor([0, 3, 1, 1, 2])
    logits = cosplace.cosface_logits(descriptors, weight, labels, 30.0, 0.4)
    for i in range(5):
        for c in range(4):
            dot = sum(descriptors[i, k].item() * weight[c, k].item() for k in range(7))
            norms = (math.sqrt(sum(v * v for v in descriptors[i].tolist()))
                     * math.sqrt(sum(v * v for v in weight[c].tolist())))
            expected = 30.0 * (dot / max(norms, 1e-8) - 0.4 * (c == labels[i].item()))
            assert logits[i, c].item() == pytest.approx(expected, rel=1e-12, abs=1e-12)
    classifier = cosplace.CosFace(7, 4, 30.0, 0.4, torch.Generator().manual_seed(0))
    bound = math.sqrt(6 / (7 + 4))  # Xavier-uniform
    assert classifier.weight.shape == (4, 7) and classifier.weight.abs().max() <= bound
    torch.testing.assert_close(classifier(descriptors.float(), labels),
                               cosplace.cosface_logits(descriptors.float(), classifier.weight, labels, 30.0, 0.4))


def test_batches_are_class_balanced_passes_over_the_group():
    group = cosplace.ClassGroup((0, 0, 0), [(0, 0, 0), (50, 0, 0), (100, 0, 0)],
                                [np.array([0, 1, 2]), np.array([3, 4]), np.array([5, 6, 7, 8])])
    images, labels = cosplace.epoch_batches(group, 2, 6, np.random.default_rng(0))
    assert images.shape == labels.shape == (6, 2)
    stream = labels.ravel()
    for start in range(0, 12, 3):  # each pass holds every class once
        assert sorted(stream[start:start + 3]) == [0, 1, 2]
    for image, label in zip(images.ravel(), stream):
        assert image in group.images[label]
    again = cosplace.epoch_batches(group, 2, 6, np.random.default_rng(0))
    assert np.array_equal(images, again[0]) and np.array_equal(labels, again[1])


def test_descriptor_size_is_found_without_drawing_random_numbers():
    for flags in (["--aggregation", "gem"], ["--aggregation", "mixvpr", "--resize", "96", "128"],
                  ["--aggregation", "netvlad", "--netvlad_clusters", "8"], ["--aggregation", "gem", "--fc_output_dim",
                                                                              "32"]):
        args = vg_parser.parse_arguments(["--device", "cpu", "--pretrain", "none", "--recipe", "cosplace", *flags],
                                         require_dataset=False)
        torch.manual_seed(0)
        size = cosplace.descriptor_dim(args)
        after = torch.rand(1)
        torch.manual_seed(0)
        assert torch.equal(after, torch.rand(1))
        assert size == network.build_model(args).features_dim


def test_flags_and_their_checks(capsys):
    help_text = vg_parser.build_parser().format_help()
    assert "--recipe cosplace:" in help_text and "--cosplace_classifier_lr" in help_text
    args = vg_parser.parse_arguments(["--recipe", "cosplace", "--device", "cpu"], require_dataset=False)
    assert (args.cosplace_cell_m, args.cosplace_min_images, args.cosplace_classifier_lr) == (10, 10, 0.01)
    for flags, message in ((["--cosplace_color_jitter", "0.7", "0.7", "0.7", "0.6"], "at most 0.5"),
                           (["--cosplace_crop_scale", "0"], "must be in (0, 1]"),
                           (["--cosplace_classifier_lr", "0"], "must be positive")):
        with pytest.raises(SystemExit):
            vg_parser.parse_arguments(["--recipe", "cosplace", "--device", "cpu", *flags], require_dataset=False)
        assert message in capsys.readouterr().err
    world = commons.DistributedContext(0, 3, 0, torch.device("cpu"))
    assert "multiple of the number of processes (3)" in RECIPES["cosplace"].run_check(args, world)


# ----------------------------------------------------------------------------------------------------------
# Checkpoints and resume, through train.py

TINY = "train_tests_tiny"  # tests/test_train.py's: a street of 50 database images and 20 queries with headings


@pytest.fixture(scope="session")
def tiny_folder(request, tmp_path_factory):
    cache = getattr(request.config, "cache", None)
    folder = str(cache.mkdir("synthetic_datasets")) if cache is not None else str(tmp_path_factory.mktemp("data"))
    make_synthetic_dataset.generate_dataset(folder, TINY, seed=5, train_database_num=50, train_queries_num=20,
                                            val_database_num=30, val_queries_num=10, test_database_num=30,
                                            test_queries_num=10, image_size=(48, 64))
    return folder


def _flags(folder, save_dir):
    # 4 groups of 4 to 6 classes of at least 2 images (20 m cells, every other one in a group); the 2 largest
    # trained in turn
    return ["--datasets_folder", folder, "--dataset_name", TINY, "--pretrain", "none", "--device", "cpu",
            "--num_workers", "0", "--resize", "16", "16", "--infer_batch_size", "8", "--save_dir", save_dir,
            "--quiet", "--backbone", "resnet18conv4", "--aggregation", "gem", "--recipe", "cosplace",
            "--cosplace_min_images", "2", "--cosplace_group_cells", "2", "--cosplace_group_bins", "1",
            "--cosplace_groups_num", "2", "--cosplace_batch_size", "4", "--cosplace_iterations_per_epoch", "2",
            "--lr", "0.001", "--patience", "5"]


def test_checkpoint_keeps_the_classifiers_and_a_resumed_run_continues_as_an_uninterrupted_one(in_process_runs,
                                                                                               tiny_folder):
    train.main(_flags(tiny_folder, "first") + ["--epochs_num", "1"])
    first = run_folder("first")
    state = last_checkpoint(first)["recipe_state"]
    assert last_checkpoint(first)["recipe"] == "cosplace" and state["batches_done"] == 2
    assert len(state["groups"]) == len(state["classifiers"]) == 2
    (epoch,) = results(first)["cosplace_epochs"]
    assert epoch["group"] == state["groups"][0] and epoch["classes"] == state["classes_num"][0]
    for classes_num, weights in zip(state["classes_num"], state["classifiers"]):
        assert weights["weight"].shape == (classes_num, 256)
    optimizer = last_checkpoint(first)["optimizer_state_dict"]
    assert [group["lr"] for group in optimizer["param_groups"]][-2:] == [0.01, 0.01]  # the classifiers' groups

    train.main(_flags(tiny_folder, "resumed") + ["--epochs_num", "2", "--resume",
                                                 os.path.join(first, "last_model.pth")])
    resumed = run_folder("resumed")
    (epoch,) = results(resumed)["cosplace_epochs"]
    assert (epoch["epoch"], epoch["group"], epoch["batches_done"]) == (1, state["groups"][1], 4)

    train.main(_flags(tiny_folder, "whole") + ["--epochs_num", "2"])
    whole = run_folder("whole")
    resumed_state, whole_state = last_checkpoint(resumed), last_checkpoint(whole)
    assert resumed_state["training_step_state"] == whole_state["training_step_state"] == {"steps_done": 4}
    resumed_recipe, whole_recipe = resumed_state["recipe_state"], whole_state["recipe_state"]
    assert resumed_recipe["batches_done"] == whole_recipe["batches_done"] == 4
    assert resumed_recipe["groups"] == whole_recipe["groups"] == state["groups"]
    for resumed_weights, whole_weights, first_weights in zip(resumed_recipe["classifiers"],
                                                             whole_recipe["classifiers"], state["classifiers"]):
        assert torch.equal(resumed_weights["weight"], whole_weights["weight"])
    # Epoch 0 trained the first classifier, epoch 1 the second: the first one was restored, not re-initialised
    assert torch.equal(whole_recipe["classifiers"][0]["weight"], state["classifiers"][0]["weight"])
    assert not torch.equal(whole_recipe["classifiers"][1]["weight"], state["classifiers"][1]["weight"])
    for key, value in whole_state["model_state_dict"].items():
        assert torch.equal(value, resumed_state["model_state_dict"][key]), key
    for key, values in whole_state["optimizer_state_dict"]["state"].items():
        for name, value in values.items():
            assert torch.equal(value, resumed_state["optimizer_state_dict"]["state"][key][name]), (key, name)
