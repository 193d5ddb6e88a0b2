"""The released files of today's methods by name (--resume <method>-<backbone>-<size>): every release's key layout
fits the model its name builds, a file with a foreign key is refused naming it, names fill in the architecture
flags, and offline each name says what to download and where; a file placed there loads and evaluates."""
import collections
import json
import logging
import os

import pytest
import torch

import checkpoint
import eval as vg_eval
import network
import parser as vg_parser
import tiny_dataset
import util
from model import zoo

KEYS_FOLDER = os.path.join(os.path.dirname(__file__), "data", "methods_keys")


def released_keys(release):
    """{key: shape} of a release's file, from the key tables of its family."""
    for name in os.listdir(KEYS_FOLDER):
        with open(os.path.join(KEYS_FOLDER, name)) as file:
            tables = json.load(file)
        if release.file_name in tables:  # file names are unique across the families
            return tables[release.file_name]
    raise KeyError(release.file_name)


def model_of(name, *flags):
    args = vg_parser.parse_arguments(["--resume", name, "--device", "cpu", "--pretrain", "none", *flags],
                                     require_dataset=False)
    return network.build_model(args)


def test_every_release_is_listed_with_its_method_and_size():
    assert len(zoo.RELEASES) == 55  # 30 CosPlace, 13 EigenPlaces, 3 MixVPR, 4 Conv-AP, 2 BoQ, SALAD, 2 MegaLoc
    for name in ("cosplace-resnet50-2048", "eigenplaces-resnet50-2048", "mixvpr-resnet50-4096",
                 "boq-resnet50-16384", "boq-dinov2-12288", "salad-dinov2-8448", "megaloc-dinov2-8448"):
        assert name in zoo.RELEASES


@pytest.mark.parametrize("name", list(zoo.RELEASES))
def test_the_released_layout_fits_the_model_its_name_builds(name):
    """The file's keys (shapes from the authors' modules) map onto our model, whose descriptor has the size in
    the name; one renamed key is refused, named."""
    release = zoo.RELEASES[name]
    with torch.device("meta"):
        model = model_of(name)
    assert model.features_dim == int(name.rsplit("-", 1)[1])
    file_state = collections.OrderedDict((key, torch.empty(shape, device="meta"))
                                         for key, shape in released_keys(release).items())
    layouts, hints = network.checkpoint_layouts(model), network.mismatch_hints(model)
    mapped = checkpoint.fit_key_layouts(model.state_dict(), file_state, layouts, name, hints)
    assert set(mapped) == set(model.state_dict())
    renamed = next(key for key in file_state if "aggregat" in key)
    file_state[renamed.replace(".", ".renamed_", 1)] = file_state.pop(renamed)
    with pytest.raises(util.CheckpointError, match=renamed.replace(".", ".renamed_", 1).replace(".", r"\.")):
        checkpoint.fit_key_layouts(model.state_dict(), file_state, layouts, name, hints)


def test_a_name_fills_the_architecture_and_its_evaluation_size():
    args = vg_parser.parse_arguments(["--resume", "salad-dinov2-8448"], require_dataset=False)
    assert (args.backbone, args.aggregation, args.resize) == ("dinov2_vitb14", "salad", [322, 322])
    assert (args.salad_clusters, args.salad_cluster_dim, args.salad_token_dim) == (64, 128, 256)
    args = vg_parser.parse_arguments(["--resume", "megaloc-dinov2-8448", "--resize", "480", "640"],
                                     require_dataset=False)
    assert (args.aggregation, args.salad_cluster_dim, args.fc_output_dim, args.resize) == \
        ("megaloc", 256, 8448, [480, 640])
    args = vg_parser.parse_arguments(["--resume", "mixvpr-resnet50-512", "--resize", "480", "640"],
                                     require_dataset=False)
    assert (args.backbone, args.mixvpr_out_channels, args.mixvpr_out_rows, args.resize) == \
        ("resnet50conv4", 256, 2, [480, 640])  # a given --resize wins over the authors' size
    args = vg_parser.parse_arguments(["--resume", "cosplace-resnet50-2048", "--backbone", "resnet50conv5"],
                                     require_dataset=False)
    assert (args.aggregation, args.fc_output_dim) == ("gem", 2048)


def test_a_flag_that_contradicts_the_name_is_an_error_naming_it(capsys):
    with pytest.raises(SystemExit) as exit_info:
        vg_parser.parse_arguments(["--resume", "boq-dinov2-12288", "--boq_proj_channels", "512"],
                                  require_dataset=False)
    assert exit_info.value.code == 2
    assert ("--resume boq-dinov2-12288 is a model with --boq_proj_channels 384: remove --boq_proj_channels 512"
            in capsys.readouterr().err)


@pytest.mark.parametrize("name", list(zoo.RELEASES))
def test_offline_each_name_says_what_to_download_and_where(offline, tmp_path, name):
    with pytest.raises(util.WeightsUnavailableError) as error:
        util.resolve_resume(name, network.WEIGHTS_FOLDER)
    release = zoo.RELEASES[name]
    message = str(error.value)
    assert release.link in message
    assert f"put it at {tmp_path / util.named_model_path(name, network.WEIGHTS_FOLDER)}" in message
    if release.google_drive_folder:
        assert release.file_name in message  # the file to take from the folder
    assert len(offline) == 1


def release_file(model, layouts, path):
    """Our random weights, written in a release's own layout (the inverse of its renames)."""
    state = {}
    for key, value in model.state_dict().items():
        for theirs, ours in layouts:
            if key.startswith(ours):
                key = theirs + key[len(ours):]
                break
        state[key] = value.clone()
    if path.endswith(".safetensors"):
        from safetensors.torch import save_file
        save_file({key: value.contiguous() for key, value in state.items() if "num_batches_tracked" not in key},
                  path)
    else:
        torch.save(state, path)
    return state


@pytest.mark.parametrize("name,layouts,flags", [
    ("cosplace-resnet18-32", (("aggregation.1.p", "aggregation.0.1.p"), ("aggregation.3.", "aggregation.1.")), []),
    ("megaloc-dinov2-8448", (("backbone.", "backbone."), ("aggregator.agg.", "aggregation.0."),
                             ("aggregator.linear.", "aggregation.1.")), ["--resize", "126", "126"]),
])
def test_a_placed_release_loads_and_evaluates_offline(offline, tmp_path, name, layouts, flags):
    tiny_dataset.write_dataset(str(tmp_path / "data"), "tiny")
    torch.manual_seed(0)
    reference = model_of(name, *flags)
    path = util.named_model_path(name, network.WEIGHTS_FOLDER)
    os.makedirs(os.path.dirname(path))
    release_file(reference, layouts, path)
    handlers = list(logging.getLogger("").handlers)
    try:
        vg_eval.main(["--resume", name, "--datasets_folder", "data", "--dataset_name", "tiny", "--device", "cpu",
                      "--num_workers", "0", "--infer_batch_size", "4", "--save_dir", "release", "--quiet", *flags])
    finally:
        for handler in list(logging.getLogger("").handlers):
            logging.getLogger("").removeHandler(handler)
        for handler in handlers:
            logging.getLogger("").addHandler(handler)
    (run_folder,) = os.listdir(os.path.join("logs", "release"))
    with open(os.path.join("logs", "release", run_folder, "results.json")) as file:
        results = json.load(file)
    assert results["descriptor_size"] == int(name.rsplit("-", 1)[1]) and "R@1" in results["recalls"]["test"]
    loaded = model_of(name, *flags)
    network.load_checkpoint_weights(loaded, checkpoint.load_state_dict_file(path), path)
    for key, value in reference.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert offline == []
