"""Pretrained, off-the-shelf and model-zoo weights: offline errors, placed files, downloads, format mapping."""
import argparse
import collections
import hashlib
import os
import sys
import types
import zipfile

import pytest
import torch
import torchvision

import checkpoint
import network
import util
from model import zoo
from model.backbones import cct


def hub_path(tmp_path, file_name):
    return str(tmp_path / "torch_home" / "hub" / "checkpoints" / file_name)


def make_args(**overrides):
    values = dict(backbone="resnet18conv4", aggregation="gem", l2="before_pool", netvlad_clusters=64,
                  fc_output_dim=None, pretrain="imagenet", off_the_shelf="imagenet", trunc_te=None, freeze_te=None,
                  resize=[480, 640], trust_checkpoint=False)
    values.update(overrides)
    return argparse.Namespace(**values)


# ----------------------------------------------------------------------------------------------------------
# Missing weights offline: a clear error naming what to fetch and where to put it

@pytest.mark.parametrize("backbone,pretrain,resize,source,file_name", [
    ("resnet18conv4", "imagenet", (480, 640), "https://download.pytorch.org/models/resnet18-f37072fd.pth", None),
    ("vit", "imagenet", (384, 384), "https://huggingface.co/google/vit-base-patch16-384/resolve/main/pytorch_model.bin",
     os.path.join("data", "pretrained_nets", "vit-base-patch16-384.bin")),
    ("cct384", "imagenet", (384, 384), cct.CCT384_IMAGENET.url, None),
    ("vgg16", "places", (480, 640), "https://drive.google.com/file/d/1UWl1uz6rZ6Nqmp1K5z3GHAIZJmDh4bDu/view",
     os.path.join("data", "pretrained_nets", "vgg16_places.pth")),
])
def test_missing_pretrained_weights_offline(offline, tmp_path, backbone, pretrain, resize, source, file_name):
    aggregation = "gem"
    with pytest.raises(util.WeightsUnavailableError) as error:
        network.build_model(make_args(backbone=backbone, aggregation=aggregation, pretrain=pretrain, resize=resize))
    expected_path = str(tmp_path / file_name) if file_name else hub_path(tmp_path, os.path.basename(source))
    message = str(error.value)
    assert source in message and f"put it at {expected_path}" in message
    assert len(offline) == 1


def test_placed_imagenet_and_places_files_are_used_without_network(offline, tmp_path):
    torch.manual_seed(0)
    imagenet = torchvision.models.resnet18()
    os.makedirs(os.path.dirname(hub_path(tmp_path, "x")))
    torch.save(imagenet.state_dict(), hub_path(tmp_path, "resnet18-f37072fd.pth"))
    model = network.build_model(make_args(backbone="resnet18conv5"))
    assert torch.equal(model.backbone[7][1].conv2.weight, imagenet.layer4[1].conv2.weight)
    assert torch.equal(model.backbone[1].running_var, imagenet.bn1.running_var)

    places = torchvision.models.resnet18(num_classes=365)
    os.makedirs(os.path.join("data", "pretrained_nets"))
    torch.save(places.state_dict(), os.path.join("data", "pretrained_nets", "resnet18_places.pth"))
    model = network.build_model(make_args(backbone="resnet18conv4", pretrain="places"))
    assert torch.equal(model.backbone[6][0].conv1.weight, places.layer3[0].conv1.weight)
    assert offline == []


def test_placed_cct_weights_lose_their_classification_head(offline, tmp_path):
    os.makedirs(os.path.dirname(hub_path(tmp_path, "x")))
    torch.manual_seed(0)
    weights = dict(cct.cct_14_7x2_384().state_dict())
    weights.update({"classifier.fc.weight": torch.ones(1000, 384), "classifier.fc.bias": torch.ones(1000)})
    torch.save(weights, hub_path(tmp_path, "cct_14_7x2_384_imagenet.pth"))
    model = network.build_model(make_args(backbone="cct384", aggregation="seqpool", resize=[384, 384]))
    loaded = model.backbone.state_dict()
    assert list(loaded) == [key for key in weights if not key.startswith("classifier.fc.")]
    assert torch.equal(loaded["classifier.positional_emb"], weights["classifier.positional_emb"])
    assert offline == []


# ----------------------------------------------------------------------------------------------------------
# Downloads: temporary name, rename when complete, checksum

def test_url_download_checks_the_hash_and_leaves_nothing_partial(tmp_path):
    content = b"some weights"
    prefix = hashlib.sha256(content).hexdigest()[:8]
    source_folder = tmp_path / "server"
    source_folder.mkdir()
    good = source_folder / f"weights-{prefix}.pth"
    good.write_bytes(content)
    bad = source_folder / "weights-deadbeef.pth"
    bad.write_bytes(content)
    target_folder = tmp_path / "cache"

    path = util.fetch_url(good.as_uri(), str(target_folder / good.name), what="test weights")
    with open(path, "rb") as file:
        assert file.read() == content
    with pytest.raises(util.WeightsUnavailableError, match="invalid hash value"):
        util.fetch_url(bad.as_uri(), str(target_folder / bad.name), what="test weights")
    assert sorted(os.listdir(target_folder)) == [good.name]  # no file, no partial one, for the bad download


def test_google_drive_download_is_renamed_only_when_complete(monkeypatch, tmp_path):
    import gdown

    def interrupted(id, output, quiet):
        with open(output, "wb") as file:
            file.write(b"half a file")
        raise ConnectionError("connection reset")
    monkeypatch.setattr(gdown, "download", interrupted)
    path = str(tmp_path / "cache" / "model.pth")
    with pytest.raises(util.WeightsUnavailableError) as error:
        util.fetch_google_drive("FILE_ID", path, what="a test model")
    assert "https://drive.google.com/file/d/FILE_ID/view" in str(error.value)
    assert f"put it at {path}" in str(error.value)
    assert os.listdir(tmp_path / "cache") == []

    def complete(id, output, quiet):
        with open(output, "wb") as file:
            file.write(b"a whole file")
        return output
    monkeypatch.setattr(gdown, "download", complete)
    assert util.fetch_google_drive("FILE_ID", path, what="a test model") == path
    assert os.listdir(tmp_path / "cache") == ["model.pth"]


# ----------------------------------------------------------------------------------------------------------
# Model zoo (--resume by name)

def test_model_zoo_names_and_flags():
    entry = zoo.MODEL_ZOO["resnet18-netvlad-partial-pitts30k"]
    assert entry.google_drive_id == "1KFwonDQYdvzTAIILsOMjmLRUR76jXXvB" and entry.mining == "partial"
    assert entry.flags() == {"backbone": "resnet18conv4", "aggregation": "netvlad"}
    assert zoo.MODEL_ZOO["resnet50-gem-fc65536-msls"].flags() == {"backbone": "resnet50conv4", "aggregation": "gem",
                                                                  "fc_output_dim": 65536}
    assert zoo.MODEL_ZOO["cct384-netvlad-msls"].flags()["resize"] == [384, 384]
    assert zoo.MODEL_ZOO["resnet50-crn-pitts30k"].aggregation == "crn"
    assert "resnet18-netvlad-full-msls" not in zoo.MODEL_ZOO  # not released
    assert len(zoo.MODEL_ZOO) == 47  # the README's 46 and the ViT(224)-CLS of its model zoo
    for entry in zoo.MODEL_ZOO.values():
        assert network.compatibility_error(entry.backbone, entry.aggregation) is None


def test_resolve_resume(offline, tmp_path):
    checkpoint = tmp_path / "best_model.pth"
    checkpoint.write_bytes(b"x")
    assert util.resolve_resume(str(checkpoint), "data") == str(checkpoint)
    cached = tmp_path / "data" / "model_zoo" / "resnet50-gem-partial-msls.pth"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"x")
    assert util.resolve_resume("resnet50-gem-partial-msls", "data") == os.path.join("data", "model_zoo", cached.name)
    assert offline == []
    with pytest.raises(util.WeightsUnavailableError) as error:
        util.resolve_resume("vgg16-netvlad-msls", "data")
    assert "https://drive.google.com/file/d/1dwai3uNudjvns58JIyaf5CBRg4ojcWIW/view" in str(error.value)
    assert f"put it at {tmp_path / 'data' / 'model_zoo' / 'vgg16-netvlad-msls.pth'}" in str(error.value)
    with pytest.raises(util.CheckpointError) as error:
        util.resolve_resume("resnet18-best", "data")
    assert "resnet18-netvlad-partial-pitts30k" in str(error.value)
    with pytest.raises(util.CheckpointError, match="no such file"):
        util.resolve_resume("logs/run/best_model.pth", "data")


# ----------------------------------------------------------------------------------------------------------
# Off-the-shelf models: their file formats, mapped onto our model in order

def radenovic_checkpoint(model, with_counters):
    """cnnimageretrieval-pytorch's layout: meta + state_dict (features.*, pool.p, whiten.*) + optimizer."""
    torch.manual_seed(1)
    state_dict = collections.OrderedDict()
    for key, value in model.state_dict().items():
        if key.endswith("num_batches_tracked") and not with_counters:
            continue
        name = key.replace("backbone.", "features.").replace("aggregation.0.0.p", "pool.p") \
            .replace("aggregation.1.", "whiten.")
        state_dict[name] = torch.rand(value.shape) if value.is_floating_point() else value + 7
    meta = {"architecture": "resnet50", "pooling": "gem", "whitening": True, "outputdim": 2048,
            "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    return {"epoch": 30, "meta": meta, "state_dict": state_dict, "min_loss": 0.5, "optimizer": {"state": {}}}


def test_radenovic_off_the_shelf_maps_in_order_without_imagenet_weights(offline, tmp_path):
    args = make_args(backbone="resnet50conv5", aggregation="gem", l2="after_pool", fc_output_dim=2048,
                     off_the_shelf="radenovic_sfm")
    with torch.device("meta"):
        reference = network.make_model("resnet50conv5", "gem", l2="after_pool", fc_output_dim=2048, pretrain="none")
    checkpoint = radenovic_checkpoint(reference, with_counters=False)  # older files lack BN counters
    folder = os.path.join("data", "off_the_shelf_nets")
    os.makedirs(folder)
    torch.save(checkpoint, os.path.join(folder, "rSfM120k-tl-resnet50-gem-w-97bf910.pth"))
    model = network.build_model(args)
    assert offline == []  # neither the file nor ImageNet weights were downloaded
    ours = model.state_dict()
    assert torch.equal(ours["aggregation.0.0.p"], checkpoint["state_dict"]["pool.p"])
    assert torch.equal(ours["aggregation.1.weight"], checkpoint["state_dict"]["whiten.weight"])
    assert torch.equal(ours["backbone.7.2.bn3.running_mean"], checkpoint["state_dict"]["features.7.2.bn3.running_mean"])

    os.remove(os.path.join(folder, "rSfM120k-tl-resnet50-gem-w-97bf910.pth"))
    with pytest.raises(util.WeightsUnavailableError) as error:
        network.build_model(args)
    assert "http://cmp.felk.cvut.cz/cnnimageretrieval/data/networks/retrieval-SfM-120k/rSfM120k-tl-resnet50-gem-w-" \
           "97bf910.pth" in str(error.value)
    assert os.path.abspath(os.path.join(folder, "rSfM120k-tl-resnet50-gem-w-97bf910.pth")) in str(error.value)


def test_in_order_mapping_checks_shapes():
    ours = collections.OrderedDict([("a.weight", torch.zeros(4, 3)), ("a.bias", torch.zeros(4))])
    theirs = collections.OrderedDict([("x.weight", torch.ones(4, 3)), ("x.bias", torch.ones(5))])
    with pytest.raises(util.CheckpointError) as error:
        checkpoint.map_state_dict_in_order(ours, theirs, "their.pth")
    assert "x.bias [5] would map onto our a.bias [4]" in str(error.value)
    with pytest.raises(util.CheckpointError, match="has 1 tensors, the model 2"):
        checkpoint.map_state_dict_in_order(ours, collections.OrderedDict([("x", torch.ones(4, 3))]), "their.pth")


def fake_old_sklearn_module(calls):
    """A stand-in for scikit-learn's old `sklearn.decomposition.pca` module, whose PCA would run code
    (record a call) if a normal unpickler rebuilt it."""
    module = types.ModuleType("sklearn.decomposition.pca")

    def rebuild(*args):
        calls.append(args)
        return object()

    class PCA:
        def __reduce__(self):
            return rebuild, ("whitening",)
    PCA.__module__ = rebuild.__module__ = module.__name__
    PCA.__qualname__, rebuild.__qualname__ = "PCA", "rebuild"
    module.PCA, module.rebuild = PCA, rebuild
    return module


@pytest.mark.parametrize("legacy_format", [True, False])
def test_naver_zip_with_an_old_sklearn_pickle_loads_without_running_it(offline, tmp_path, monkeypatch, legacy_format):
    torch.manual_seed(0)
    model = network.make_model("resnet18conv4", "gem", pretrain="none", l2="none", fc_output_dim=8)
    source = collections.OrderedDict((f"module.net.{index}", torch.rand(value.shape) if value.is_floating_point()
                                      else value + 3) for index, value in enumerate(model.state_dict().values()))
    calls = []
    monkeypatch.setitem(sys.modules, "sklearn.decomposition.pca", fake_old_sklearn_module(calls))
    checkpoint = {"model_options": {"arch": "resnet101_rmac", "out_dim": 2048}, "state_dict": source,
                  "pca": {"Landmarks_clean": sys.modules["sklearn.decomposition.pca"].PCA()}}
    folder = tmp_path / "data" / "off_the_shelf_nets"
    folder.mkdir(parents=True)
    pt_path = tmp_path / "Resnet50-AP-GeM.pt"
    torch.save(checkpoint, str(pt_path), _use_new_zipfile_serialization=not legacy_format)
    with zipfile.ZipFile(folder / "resnet50conv5_naver.zip", "w") as archive:
        archive.write(pt_path, "Resnet50-AP-GeM.pt")

    util.load_off_the_shelf(model, "naver", "resnet50conv5", "data")
    assert calls == []  # the pickled PCA was not rebuilt
    assert (folder / "Resnet50-AP-GeM.pt").is_file()  # unpacked once, used directly next time
    for (our_key, ours), theirs in zip(model.state_dict().items(), source.values()):
        assert torch.equal(ours, theirs), our_key
    assert offline == []


def test_off_the_shelf_registry():
    assert list(util.OFF_THE_SHELF_MODELS) == ["imagenet", "radenovic_sfm", "radenovic_gldv1", "naver"]
    assert zoo.PRETRAININGS == ("imagenet", "places", "gldv2", "none")
    with pytest.raises(util.UserInputError, match="radenovic_sfm, radenovic_gldv1, naver"):
        util.off_the_shelf_path("imagenet", "resnet50conv5", "data")
    with pytest.raises(util.UserInputError, match="No radenovic_gldv1 model for --backbone resnet50conv4"):
        util.off_the_shelf_path("radenovic_gldv1", "resnet50conv4", "data")
