"""Our state_dict keys and shapes equal the original's, and its checkpoint files load (formats, safety)."""
import collections
import json
import os

import numpy as np
import pytest
import torch

import checkpoint
import network
import util

ORIGINAL_KEYS_FILE = os.path.join(os.path.dirname(__file__), "data", "seed_state_dict_keys.json")


def original_keys():
    with open(ORIGINAL_KEYS_FILE) as file:
        return json.load(file)


def parse_combination(combination):
    """'resnet18conv4+gem+fc2048' -> ('resnet18conv4', 'gem', 2048)."""
    fields = combination.split("+")
    fc_output_dim = int(fields[2][len("fc"):]) if len(fields) > 2 else None
    return fields[0], fields[1], fc_output_dim


def build_on_meta(combination):
    """Build without allocating or initialising weights: only keys and shapes matter here."""
    backbone, aggregation, fc_output_dim = parse_combination(combination)
    resize = (384, 384) if backbone == "cct384" else (480, 640)
    with torch.device("meta"):
        return network.make_model(backbone, aggregation, pretrain="none", fc_output_dim=fc_output_dim, resize=resize)


def test_the_reference_covers_every_cnn_combination_and_cct():
    combinations = set(original_keys())
    assert len(combinations) == 92
    cnns = ["alexnet", "vgg16"] + [f"resnet{depth}conv{cut}" for depth in (18, 50, 101) for cut in (4, 5)]
    for backbone in cnns:
        for aggregation in ("netvlad", "crn", "gem", "spoc", "mac", "rmac", "rrm"):
            assert f"{backbone}+{aggregation}" in combinations
    assert {"cct384+netvlad", "cct384+gem", "cct384+cls", "cct384+seqpool"} <= combinations


@pytest.mark.parametrize("combination", list(original_keys()))
def test_state_dict_keys_shapes_and_order_equal_the_original(combination):
    reference = original_keys()[combination]
    ours = {key: list(value.shape) for key, value in build_on_meta(combination).state_dict().items()}
    assert list(ours) == list(reference)  # same keys, same order (off-the-shelf weights map in order)
    assert ours == reference


# ----------------------------------------------------------------------------------------------------------
# Loading the original's checkpoint files

@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(0)
    return network.make_model("resnet18conv4", "gem", pretrain="none", fc_output_dim=8)


def perturbed_state_dict(model):
    return collections.OrderedDict((key, value + 1 if value.is_floating_point() else value)
                                   for key, value in model.state_dict().items())


@pytest.mark.parametrize("layout", ["plain", "model_state_dict", "module_prefix", "state_dict_module_prefix"])
def test_original_checkpoint_layouts_load(tmp_path, small_model, layout):
    state_dict = perturbed_state_dict(small_model)
    with_prefix = collections.OrderedDict((f"module.{key}", value) for key, value in state_dict.items())
    content = {
        "plain": state_dict,
        # as the original's train.py saves it, NumPy values included
        "model_state_dict": {"epoch_num": 3, "model_state_dict": state_dict, "optimizer_state_dict": {},
                             "recalls": np.array([50.0, 60.5]), "best_r5": np.float64(60.5),
                             "not_improved_num": 0},
        "module_prefix": with_prefix,
        "state_dict_module_prefix": {"state_dict": with_prefix},
    }[layout]
    path = str(tmp_path / "best_model.pth")
    torch.save(content, path)
    model = network.make_model("resnet18conv4", "gem", pretrain="none", fc_output_dim=8)
    checkpoint.load_model_weights(model, checkpoint.load_state_dict_file(path))
    for key, value in model.state_dict().items():
        assert torch.equal(value, state_dict[key])


def test_a_mismatching_checkpoint_names_the_first_layer_and_both_shapes(small_model):
    other = network.make_model("resnet18conv4", "gem", pretrain="none", fc_output_dim=16)
    with pytest.raises(util.CheckpointError) as error:
        checkpoint.load_model_weights(other, small_model.state_dict(), source="best_model.pth")
    assert "aggregation.1.weight is [8, 256] in the checkpoint, [16, 256] in the model" in str(error.value)
    conv5 = network.make_model("resnet18conv5", "gem", pretrain="none", fc_output_dim=8)
    with pytest.raises(util.CheckpointError) as error:
        checkpoint.load_model_weights(small_model, conv5.state_dict())
    message = str(error.value)
    assert "keys of the checkpoint are not in the model, the first: backbone.7.0.conv1.weight" in message
    assert "use a ...conv5 --backbone" in message


def test_cct_checkpoint_with_fewer_encoders_suggests_trunc_te():
    with torch.device("meta"):
        full = network.make_model("cct384", "seqpool", pretrain="none", resize=(384, 384))
        cut = network.make_model("cct384", "seqpool", pretrain="none", resize=(384, 384), trunc_te=8)
    message = checkpoint.describe_state_dict_mismatch(full.state_dict(), cut.state_dict())
    assert "use --trunc_te 8" in message


class Payload:
    """Stands for any Python object whose unpickling could run code."""

    def __init__(self):
        self.value = 1


def test_files_that_need_code_to_unpickle_are_refused_unless_trusted(tmp_path, small_model):
    path = str(tmp_path / "model.pth")
    torch.save({"model_state_dict": small_model.state_dict(), "extra": Payload()}, path)
    with pytest.raises(util.CheckpointError) as error:
        checkpoint.load_state_dict_file(path)
    message = str(error.value)
    assert "arbitrary code" in message and "--trust_checkpoint" in message and "Payload" in message
    state_dict = checkpoint.load_state_dict_file(path, trusted=True)
    assert list(state_dict) == list(small_model.state_dict())


def test_missing_truncated_and_foreign_files_are_clear_errors(tmp_path, small_model):
    with pytest.raises(util.CheckpointError, match="does not exist"):
        checkpoint.load_state_dict_file(str(tmp_path / "nothing.pth"))
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(util.CheckpointError, match="is empty"):
        checkpoint.load_state_dict_file(str(empty))
    whole = tmp_path / "whole.pth"
    torch.save(small_model.state_dict(), str(whole))
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(util.CheckpointError, match="truncated, corrupted or not a checkpoint"):
        checkpoint.load_state_dict_file(str(truncated))
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    with pytest.raises(util.CheckpointError, match="truncated, corrupted or not a checkpoint"):
        checkpoint.load_state_dict_file(str(text))
    not_weights = tmp_path / "numbers.pth"
    torch.save({"epoch": 3}, str(not_weights))
    with pytest.raises(util.CheckpointError, match="does not hold a model state dict"):
        checkpoint.load_state_dict_file(str(not_weights))


def test_legacy_torch_files_load_and_unusual_pickles_need_trust(tmp_path):
    """A legacy (pre-zip) torch file of tensors loads with weights_only; one pickled with protocol 4 uses
    instructions weights_only loading does not read, so only --trust_checkpoint loads it."""
    path = str(tmp_path / "legacy.pth")
    torch.save({"w": torch.ones(2)}, path, _use_new_zipfile_serialization=False)
    assert torch.equal(checkpoint.load_state_dict_file(path)["w"], torch.ones(2))
    torch.save({"w": torch.ones(2)}, path, _use_new_zipfile_serialization=False, pickle_protocol=4)
    with pytest.raises(util.CheckpointError, match="not a checkpoint"):
        checkpoint.load_state_dict_file(path)
    assert torch.equal(checkpoint.load_state_dict_file(path, trusted=True)["w"], torch.ones(2))
