"""Adding a part is one file and one registry line: a toy backbone, a toy aggregation with an option of its own and
a toy training recipe, defined here and registered with one line each, run through train.py's and eval.py's
main (flags, --help, checkpoints, resume) without any other file knowing them."""
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import datasets_ws
import eval as vg_eval
import parser as vg_parser
import tiny_dataset
import train
from model.aggregations import AGGREGATIONS, AggregationEntry
from model.backbones import BACKBONES, BackboneEntry
from model.parts import MAP, Features, Option
from recipes import RECIPES
from recipes.base import EpochSummary, LossMeter, RecipeEntry
from run_folders import results, run_folder

RESIZE = ["16", "16"]


# ----------------------------------------------------------------------------------------------------------
# The toy parts

class ToyBackbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, kernel_size=4, stride=4)

    def forward(self, images):
        return F.relu(self.conv(images))


def build_toy_backbone(request):
    return ToyBackbone(), Features(MAP, 8)


class ScaledMean(nn.Module):
    """The mean of a map's positions, times --toy_scale, L2-normalised; remembers the scale it was given."""

    def __init__(self, scale):
        super().__init__()
        self.scale = scale
        self.mix = nn.Linear(8, 8)

    def forward(self, x):
        return F.normalize(self.mix(x.mean(dim=(2, 3)) * self.scale), dim=1)


def build_toy_aggregation(features, options):
    return ScaledMean(options["toy_scale"]), features.channels


class PairsRecipe:
    """A contrastive loss over the in-batch pairs (positives within --train_positives_dist_threshold), batches from
    its own sampler: a seeded permutation of the training images walked --toy_batches batches per epoch; the
    sampler's position is what a checkpoint keeps."""
    loss_name = "contrastive"
    details_name = "toy_positions"

    def __init__(self, args, world, device, amp_dtype):
        self.args, self.device = args, device
        dataset = datasets_ws.GeoDataset(args.datasets_folder, args.dataset_name, "train")
        self.images_dataset = datasets_ws.ImagesDataset(dataset.images_paths, datasets_ws.hard_resize, args.resize)
        self.utms = np.concatenate([dataset.database_utms, dataset.queries_utms])
        self.order = np.random.default_rng(args.seed).permutation(len(self.utms))
        self.position = 0

    def trained_modules(self):
        return []

    def _batch(self):
        indices = [self.order[(self.position + i) % len(self.order)] for i in range(self.args.train_batch_size)]
        self.position += len(indices)
        images = torch.stack([self.images_dataset[int(i)][0] for i in indices])
        distances = torch.cdist(torch.tensor(self.utms[indices]), torch.tensor(self.utms[indices]))
        return images, distances <= self.args.train_positives_dist_threshold

    def train_epoch(self, model, raw_model, step, epoch_num):
        model.train()
        meter = LossMeter(self.device)
        for _ in range(self.args.toy_batches):
            images, positives = self._batch()
            descriptors = model(images.to(self.device))
            distances = torch.cdist(descriptors, descriptors)
            loss = torch.where(positives, distances ** 2, F.relu(0.5 - distances) ** 2).mean()
            step(loss)
            meter.add(loss)
        return EpochSummary(meter.mean, meter.batches_num, [{"epoch": epoch_num, "position": self.position}])

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state.get("position", 0)


@pytest.fixture
def toy_parts(monkeypatch):
    monkeypatch.setitem(BACKBONES, "toy_backbone", BackboneEntry(build_toy_backbone, (MAP,)))
    monkeypatch.setitem(AGGREGATIONS, "toy_mean", AggregationEntry(build_toy_aggregation, (MAP,), (
        Option("toy_scale", float, 2.0, "Scale of the toy mean", minimum=0),)))
    monkeypatch.setitem(RECIPES, "toy_pairs", RecipeEntry(PairsRecipe, (
        Option("toy_batches", int, 3, "Batches per epoch of the toy recipe", minimum=1),)))


@pytest.fixture
def workspace(in_process_runs):
    """A tiny dataset in the folder of the in-process runs."""
    tiny_dataset.write_dataset(str(in_process_runs / "data"), "tiny", splits=("train", "val", "test"))
    return in_process_runs


def common_flags(save_dir):
    return ["--datasets_folder", "data", "--dataset_name", "tiny", "--pretrain", "none", "--device", "cpu",
            "--num_workers", "0", "--resize", *RESIZE, "--infer_batch_size", "4", "--save_dir", save_dir, "--quiet"]


def read_results(save_dir):
    folder = run_folder(save_dir)
    return folder, results(folder)


def test_toy_backbone_and_aggregation_run_through_train_and_eval(toy_parts, workspace):
    help_text = vg_parser.build_parser().format_help()
    assert "--aggregation toy_mean:" in help_text and "--toy_scale TOY_SCALE" in help_text
    assert "Scale of the toy mean" in help_text
    flags = ["--backbone", "toy_backbone", "--aggregation", "toy_mean", "--toy_scale", "3.5"]
    train.main(common_flags("toy_train") + flags + [
        "--epochs_num", "1", "--queries_per_epoch", "4", "--cache_refresh_rate", "4", "--negs_num_per_query", "2",
        "--neg_samples_num", "8", "--train_batch_size", "2"])
    run_folder, results = read_results("toy_train")
    assert results["arguments"]["toy_scale"] == 3.5 and results["descriptor_size"] == 8
    assert set(results["recalls"]) == {"val", "test"}
    state = torch.load(os.path.join(run_folder, "last_model.pth"), weights_only=True)
    assert list(state["model_state_dict"]) == ["backbone.conv.weight", "backbone.conv.bias",
                                               "aggregation.mix.weight", "aggregation.mix.bias"]

    vg_eval.main(common_flags("toy_eval") + flags + ["--resume", os.path.join(run_folder, "best_model.pth")])
    _, evaluated = read_results("toy_eval")
    assert evaluated["recalls"]["test"] == results["recalls"]["test"]  # the same weights give the same recalls
    model = vg_eval.network.build_model(vg_parser.parse_arguments(common_flags("unused") + flags))
    assert model.aggregation.scale == 3.5


def test_toy_recipe_trains_checkpoints_and_resumes_as_an_uninterrupted_run(toy_parts, workspace):
    flags = common_flags("toy_recipe") + ["--backbone", "toy_backbone", "--aggregation", "toy_mean", "--recipe",
                                          "toy_pairs", "--toy_batches", "2", "--train_batch_size", "3",
                                          "--lr", "0.01", "--patience", "5"]
    assert "--recipe toy_pairs:" in vg_parser.build_parser().format_help()
    train.main(flags + ["--epochs_num", "1"])
    first_folder, first = read_results("toy_recipe")
    first_state = torch.load(os.path.join(first_folder, "last_model.pth"), weights_only=True)
    assert first_state["recipe"] == "toy_pairs" and first_state["recipe_state"] == {"position": 6}
    assert first["toy_positions"] == [{"epoch": 0, "position": 6}]

    resumed = flags[:flags.index("--save_dir")] + ["--save_dir", "toy_resumed"] + flags[flags.index("--save_dir") + 2:]
    train.main(resumed + ["--epochs_num", "2", "--resume", os.path.join(first_folder, "last_model.pth")])
    resumed_folder, resumed_results = read_results("toy_resumed")
    assert resumed_results["toy_positions"] == [{"epoch": 1, "position": 12}]  # continues at the same step

    uninterrupted = flags[:flags.index("--save_dir")] + ["--save_dir", "toy_whole"] + \
        flags[flags.index("--save_dir") + 2:]
    train.main(uninterrupted + ["--epochs_num", "2"])
    whole_folder, _ = read_results("toy_whole")
    resumed_state = torch.load(os.path.join(resumed_folder, "last_model.pth"), weights_only=True)
    whole_state = torch.load(os.path.join(whole_folder, "last_model.pth"), weights_only=True)
    assert resumed_state["recipe_state"] == whole_state["recipe_state"] == {"position": 12}
    for key, value in whole_state["model_state_dict"].items():
        assert torch.equal(value, resumed_state["model_state_dict"][key]), key
