"""Backbones x aggregations: forward passes, descriptor sizes and norms, layer maths against references."""
import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import network
import util
from commons import UserInputError
from model import functional
from model.aggregations import AGGREGATIONS
from model.aggregations.netvlad import CRN, NetVLAD
from model.aggregations.pools import Flatten, GeM, L2Norm
from model.backbones import BACKBONES
from model.parts import CLASS_TOKEN, MAP, TOKENS, Features

# Descriptor size of each backbone's local features (or pooled token)
BACKBONE_DIMS = {"alexnet": 256, "vgg16": 512, "resnet18conv4": 256, "resnet18conv5": 512, "resnet50conv4": 1024,
                 "resnet50conv5": 2048, "resnet101conv4": 1024, "resnet101conv5": 2048, "cct384": 384, "vit": 768}
# Smallest sizes that work: CNNs at 64x64, CCT only at 384 (fixed positional embedding), ViT at 224
TEST_RESIZE = {"cct384": (384, 384), "vit": (224, 224)}
CLUSTERS = 8


def allowed_pairs():
    return [(backbone, aggregation) for backbone in BACKBONES for aggregation in AGGREGATIONS
            if network.compatibility_error(backbone, aggregation) is None]


def small_model(backbone, aggregation, **kwargs):
    kwargs.setdefault("netvlad_clusters", CLUSTERS)
    return network.make_model(backbone, aggregation, pretrain="none", trunc_te=1,
                              resize=TEST_RESIZE.get(backbone, (64, 64)), **kwargs).eval()


def random_images(backbone, batch_size=2):
    torch.manual_seed(0)
    return torch.randn(batch_size, 3, *TEST_RESIZE.get(backbone, (64, 64)))


def expected_features_dim(backbone, aggregation, fc_output_dim=None):
    if fc_output_dim is not None:
        return fc_output_dim
    return BACKBONE_DIMS[backbone] * (CLUSTERS if aggregation in ("netvlad", "crn") else 1)


# ----------------------------------------------------------------------------------------------------------
# Registries

ORIGINAL_BACKBONES = ["alexnet", "vgg16", "resnet18conv4", "resnet18conv5", "resnet50conv4", "resnet50conv5",
                      "resnet101conv4", "resnet101conv5", "cct384", "vit"]
ORIGINAL_AGGREGATIONS = {"netvlad", "gem", "spoc", "mac", "rmac", "crn", "rrm", "cls", "seqpool"}


def test_registry_names_are_the_original_flag_choices():
    assert list(BACKBONES)[:len(ORIGINAL_BACKBONES)] == ORIGINAL_BACKBONES  # at least these, in this order
    assert set(AGGREGATIONS) >= ORIGINAL_AGGREGATIONS


def test_allowed_pairs_follow_the_original_rules():
    pairs = set(allowed_pairs())
    cnns = [name for name in ORIGINAL_BACKBONES if BACKBONES[name].layouts == (MAP,)]
    assert len(cnns) == 8
    for backbone in cnns:
        assert {a for b, a in pairs if b == backbone and a in ORIGINAL_AGGREGATIONS} == \
            {"netvlad", "crn", "gem", "spoc", "mac", "rmac", "rrm"}
    assert {a for b, a in pairs if b == "cct384" and a in ORIGINAL_AGGREGATIONS} == {"netvlad", "gem", "cls", "seqpool"}
    assert {a for b, a in pairs if b == "vit" and a in ORIGINAL_AGGREGATIONS} == {"netvlad", "gem", "cls"}


def test_compatibility_and_resize_errors_say_what_to_use():
    message = network.compatibility_error("resnet18conv4", "cls")
    assert "--aggregation cls" in message and "netvlad" in message and "rrm" in message
    assert "seqpool" in network.compatibility_error("cct384", "rmac")
    assert "valid names" in network.compatibility_error("resnet18", "gem")
    assert network.resize_error("cct384", (480, 640)) == \
        "--backbone cct384 needs --resize 384 384, got --resize 480 640"
    assert "--resize 224 224 or --resize 384 384" in network.resize_error("vit", (480, 640))
    assert network.resize_error("vit", [384, 384]) is None
    assert network.resize_error("resnet18conv4", (100, 50)) is None
    with pytest.raises(UserInputError, match="does not work with --backbone"):
        network.make_model("vgg16", "seqpool", pretrain="none")


def test_off_the_shelf_error():
    assert network.off_the_shelf_error("imagenet", "alexnet", "netvlad", None) is None
    assert network.off_the_shelf_error("naver", "resnet101conv5", "gem", 2048) is None
    assert "--fc_output_dim 2048" in network.off_the_shelf_error("radenovic_sfm", "resnet50conv4", "gem", 2048)


# ----------------------------------------------------------------------------------------------------------
# Every pair: forward pass, descriptor size, L2 norm

_built_backbones = {}


@pytest.fixture
def shared_backbones(monkeypatch):
    """Backbone builds depend on the aggregation only through the request (its layout is part of the key), so
    each distinct build is made once and reused by every pair (in eval mode, never modified)."""
    for name, spec in list(BACKBONES.items()):
        def build(request, _name=name, _build=spec.build):
            key = (_name, request.layout, request.final_norm, request.resize, tuple(sorted(request.options.items())))
            if key not in _built_backbones:
                _built_backbones[key] = _build(request)
            return _built_backbones[key]
        monkeypatch.setitem(BACKBONES, name, dataclasses.replace(spec, build=build))


@pytest.mark.parametrize("backbone,aggregation", [pair for pair in allowed_pairs() if pair[0] in ORIGINAL_BACKBONES
                                                  and pair[1] in ORIGINAL_AGGREGATIONS])
def test_every_pair_gives_unit_descriptors_of_features_dim(backbone, aggregation, shared_backbones):
    # after_pool makes the shallow poolings end with an L2 normalisation too; cls / seqpool give raw tokens
    model = small_model(backbone, aggregation, l2="after_pool")
    with torch.no_grad():
        descriptors = model(random_images(backbone, batch_size=1))
    assert model.features_dim == expected_features_dim(backbone, aggregation)
    assert descriptors.shape == (1, model.features_dim)
    assert torch.isfinite(descriptors).all()
    if aggregation not in ("cls", "seqpool"):
        torch.testing.assert_close(descriptors.norm(dim=1), torch.ones(1))


@pytest.mark.parametrize("aggregation", ["netvlad", "crn", "gem", "spoc", "mac", "rmac", "rrm"])
def test_fc_follows_any_aggregation_with_the_whole_descriptor_as_input(aggregation):
    model = small_model("resnet18conv4", aggregation, fc_output_dim=32)
    linear = model.aggregation[1]
    assert isinstance(linear, nn.Linear) and isinstance(model.aggregation[2], L2Norm)
    assert linear.in_features == expected_features_dim("resnet18conv4", aggregation)
    with torch.no_grad():
        descriptors = model(random_images("resnet18conv4"))
    assert model.features_dim == 32 and descriptors.shape == (2, 32)
    torch.testing.assert_close(descriptors.norm(dim=1), torch.ones(2))


def test_features_dim_is_not_written_anywhere_else():
    model = network.make_model("resnet18conv4", "netvlad", pretrain="none", netvlad_clusters=64)
    assert model.features_dim == 64 * 256
    assert isinstance(model.aggregation, NetVLAD)
    with_fc = network.make_model("resnet18conv4", "crn", pretrain="none", fc_output_dim=16)
    assert isinstance(with_fc.aggregation[0], CRN) and with_fc.features_dim == 16


# ----------------------------------------------------------------------------------------------------------
# --l2 wrapping and the shallow poolings' values

def test_l2_wrapping_module_trees_and_values():
    torch.manual_seed(0)
    features = torch.rand(2, 16, 5, 7)
    expected = {
        "before_pool": functional.gem(F.normalize(features, dim=1))[:, :, 0, 0],
        "after_pool": F.normalize(functional.gem(features), dim=1)[:, :, 0, 0],
        "none": functional.gem(features)[:, :, 0, 0],
    }
    layer_types = {"before_pool": [L2Norm, GeM, Flatten], "after_pool": [GeM, L2Norm, Flatten],
                   "none": [GeM, Flatten]}
    for l2, values in expected.items():
        module, dim = network.make_aggregation("gem", Features(MAP, 16), l2)
        assert [type(m) for m in module] == layer_types[l2] and dim == 16
        torch.testing.assert_close(module(features), values)
    with pytest.raises(ValueError, match="before_pool, after_pool, none"):
        network.make_aggregation("gem", Features(MAP, 16), "always")


def test_gem_spoc_mac_values():
    features = torch.rand(2, 3, 4, 5) + 0.1
    gem_layer = GeM()
    assert gem_layer.p.shape == (1,) and gem_layer.p.item() == 3 and gem_layer.eps == 1e-6
    torch.testing.assert_close(gem_layer(features)[:, :, 0, 0], features.pow(3).mean(dim=(2, 3)).pow(1 / 3))
    torch.testing.assert_close(functional.spoc(features)[:, :, 0, 0], features.mean(dim=(2, 3)))
    torch.testing.assert_close(functional.mac(features)[:, :, 0, 0], features.amax(dim=(2, 3)))


def test_gem_on_tokens_keeps_the_original_normalisation_across_tokens():
    """L2Norm(dim=1) on tokens [N, T, D] normalises over T before GeM pools over T (the original's quirk)."""
    torch.manual_seed(0)
    tokens = torch.rand(2, 10, 6)
    module, _ = network.make_aggregation("gem", Features(TOKENS, 6), "before_pool")
    normalised = tokens / tokens.norm(dim=1, keepdim=True)
    expected = normalised.clamp(min=1e-6).pow(3).mean(dim=1).pow(1 / 3)  # [N, D]
    torch.testing.assert_close(module(tokens), expected)


def reference_rmac(x, L=3, eps=1e-6):
    """Radenovic's rmac, verbatim apart from names: regions picked with index lists."""
    ovr = 0.4
    steps = torch.Tensor([2, 3, 4, 5, 6, 7])
    W, H = x.size(3), x.size(2)
    w = min(W, H)
    b = (max(H, W) - w) / (steps - 1)
    (tmp, idx) = torch.min(torch.abs(((w ** 2 - w * b) / w ** 2) - ovr), 0)
    Wd, Hd = 0, 0
    if H < W:
        Wd = idx.item() + 1
    elif H > W:
        Hd = idx.item() + 1
    v = F.max_pool2d(x, (x.size(-2), x.size(-1)))
    v = v / (torch.norm(v, p=2, dim=1, keepdim=True) + eps).expand_as(v)
    for l in range(1, L + 1):
        wl = math.floor(2 * w / (l + 1))
        wl2 = math.floor(wl / 2 - 1)
        b = 0 if l + Wd == 1 else (W - wl) / (l + Wd - 1)
        cenW = torch.floor(wl2 + torch.Tensor(range(l - 1 + Wd + 1)) * b) - wl2
        b = 0 if l + Hd == 1 else (H - wl) / (l + Hd - 1)
        cenH = torch.floor(wl2 + torch.Tensor(range(l - 1 + Hd + 1)) * b) - wl2
        for i_ in cenH.tolist():
            for j_ in cenW.tolist():
                if wl == 0:
                    continue
                R = x[:, :, (int(i_) + torch.Tensor(range(wl)).long()).tolist(), :]
                R = R[:, :, :, (int(j_) + torch.Tensor(range(wl)).long()).tolist()]
                vt = F.max_pool2d(R, (R.size(-2), R.size(-1)))
                vt = vt / (torch.norm(vt, p=2, dim=1, keepdim=True) + eps).expand_as(vt)
                v += vt
    return v


@pytest.mark.parametrize("height,width", [(30, 40), (40, 30), (15, 15), (2, 3), (1, 1), (4, 17)])
def test_rmac_equals_the_reference(height, width):
    torch.manual_seed(0)
    x = torch.rand(2, 8, height, width)
    torch.testing.assert_close(functional.rmac(x), reference_rmac(x), rtol=0, atol=0)


def test_rrm_matches_its_definition():
    torch.manual_seed(0)
    module, dim = network.make_aggregation("rrm", Features(MAP, 6), "before_pool")
    features = torch.rand(2, 6, 3, 4)
    x = module.ln1(features.mean(dim=(2, 3)))
    expected = F.normalize(module.ln2(module.fc2(torch.relu(module.fc1(x))) + x), dim=1)
    torch.testing.assert_close(module(features), expected)


# ----------------------------------------------------------------------------------------------------------
# NetVLAD and CRN against the original's loop formulation

def reference_vlad(x_flatten, soft_assign, centroids):
    """The original's loop over clusters."""
    N, D, _ = x_flatten.shape
    clusters_num = centroids.shape[0]
    vlad = torch.zeros([N, clusters_num, D], dtype=x_flatten.dtype)
    for k in range(clusters_num):
        residual = x_flatten.unsqueeze(0).permute(1, 0, 2, 3) - \
            centroids[k:k + 1, :].expand(x_flatten.size(-1), -1, -1).permute(1, 2, 0).unsqueeze(0)
        residual = residual * soft_assign[:, k:k + 1, :].unsqueeze(2)
        vlad[:, k:k + 1, :] = residual.sum(dim=-1)
    vlad = F.normalize(vlad, p=2, dim=2)
    vlad = vlad.view(N, -1)
    return F.normalize(vlad, p=2, dim=1)


def reference_netvlad_forward(layer, x, mask=None):
    if layer.work_with_tokens:
        x = x.permute(0, 2, 1)
    x = F.normalize(x, p=2, dim=1)
    N, D = x.shape[:2]
    soft_assign = F.softmax(layer.conv(x).view(N, layer.clusters_num, -1), dim=1)
    if mask is not None:
        soft_assign = soft_assign * mask(x).view(N, 1, -1)
    return reference_vlad(x.reshape(N, D, -1), soft_assign, layer.centroids)


@pytest.mark.parametrize("work_with_tokens", [False, True])
def test_netvlad_equals_the_loop_formulation(work_with_tokens):
    torch.manual_seed(0)
    layer = NetVLAD(clusters_num=16, dim=32, work_with_tokens=work_with_tokens)
    nn.init.normal_(layer.conv.weight, std=5)  # sharp assignments, as after k-means initialisation
    x = torch.randn(3, 20, 32) if work_with_tokens else torch.randn(3, 32, 5, 6)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), reference_netvlad_forward(layer, x), rtol=0, atol=1e-5)


def reference_crn_mask(crn_module, x):
    """The original's mask: upsampling by scale_factor=2 (only defined for even sizes)."""
    x = crn_module.downsample_pool(x)
    g = F.relu(torch.cat((crn_module.filter_3_3(x), crn_module.filter_5_5(x), crn_module.filter_7_7(x)), dim=1))
    w = F.relu(crn_module.acc_w(g))
    return F.interpolate(w, scale_factor=2, mode="bilinear")


def test_crn_equals_the_original_on_even_sizes_and_works_on_odd_ones():
    torch.manual_seed(0)
    layer = CRN(clusters_num=8, dim=16)
    assert not layer.crn.acc_w.weight.requires_grad and (layer.crn.acc_w.weight == 1).all()
    x = torch.randn(2, 16, 6, 8)
    with torch.no_grad():
        normalised = F.normalize(x, dim=1)
        torch.testing.assert_close(layer.crn(normalised), reference_crn_mask(layer.crn, normalised), rtol=0, atol=0)
        expected = reference_netvlad_forward(layer, x, mask=lambda y: reference_crn_mask(layer.crn, y))
        torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-5)
        odd = layer(torch.randn(2, 16, 5, 7))
    assert odd.shape == (2, 8 * 16) and torch.isfinite(odd).all()


def test_netvlad_init_params_as_the_original():
    rng = np.random.default_rng(0)
    centroids = rng.standard_normal((4, 3)).astype(np.float32)
    descriptors = rng.standard_normal((50, 3)).astype(np.float32)
    layer = NetVLAD(clusters_num=4, dim=3)
    conv_weight = layer.conv.weight
    layer.init_params(centroids, descriptors)
    normalised = centroids / np.linalg.norm(centroids, axis=1, keepdims=True)
    top2 = np.sort(normalised @ descriptors.T, axis=0)[-2:]  # per descriptor: second best, best
    alpha = -np.log(0.01) / np.mean(top2[1] - top2[0])
    assert layer.alpha == pytest.approx(alpha, rel=1e-6)
    np.testing.assert_allclose(layer.centroids.detach().numpy(), centroids)
    np.testing.assert_allclose(layer.conv.weight.detach().numpy()[:, :, 0, 0], alpha * normalised, rtol=1e-6)
    assert layer.conv.weight is conv_weight  # same parameter object, updated in place


class RandomImages(torch.utils.data.Dataset):
    def __init__(self, images_num, size):
        generator = torch.Generator().manual_seed(0)
        self.images = torch.randn(images_num, 3, *size, generator=generator)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.images[index], index


@pytest.mark.parametrize("backbone", ["resnet18conv4", "vit"])
def test_initialize_netvlad_with_few_images_and_locations(backbone):
    """6 images (fewer than the 8 wanted), with fewer local descriptors than the 30 wanted per image on
    resnet18conv4 at 32x32 (2x2 = 4 locations)."""
    torch.manual_seed(0)
    size = TEST_RESIZE.get(backbone, (32, 32))
    model = network.make_model(backbone, "netvlad", pretrain="none", netvlad_clusters=4, trunc_te=1, resize=size)
    layer = model.aggregation
    model.train()
    runs = []
    for _ in range(2):
        np.random.seed(0)
        torch.manual_seed(0)  # the sampler's order
        network.initialize_aggregation(model, RandomImages(6, size), "cpu", batch_size=4, num_workers=0,
                                       descriptors_num=240, descs_per_image=30)
        runs.append(layer.centroids.detach().clone())
    assert model.backbone.training  # the mode is restored
    torch.testing.assert_close(runs[0], runs[1])  # seeded runs draw the same descriptors
    normalised = F.normalize(layer.centroids.detach(), dim=1)
    conv_weight = layer.conv.weight.detach().reshape(4, -1)
    torch.testing.assert_close(conv_weight, layer.alpha * normalised, rtol=1e-5, atol=1e-6)
    assert layer.alpha > 0


def test_initialize_netvlad_with_too_few_descriptors_is_a_clear_error():
    model = network.make_model("resnet18conv5", "netvlad", pretrain="none", netvlad_clusters=64)
    with pytest.raises(UserInputError, match="Only 8 local descriptors to initialise 64 NetVLAD clusters"):
        network.initialize_aggregation(model, RandomImages(2, (64, 64)), "cpu", batch_size=2, num_workers=0)


# ----------------------------------------------------------------------------------------------------------
# Backbones: cuts, frozen layers, transformers' truncation and freezing

def trainable_prefixes(module):
    return sorted({name.split(".")[0] for name, p in module.named_parameters() if p.requires_grad})


def test_cnn_cuts_and_frozen_layers():
    with torch.device("meta"):  # structure and requires_grad only
        resnet = network.make_model("resnet18conv4", "gem", pretrain="none").backbone
        resnet5 = network.make_model("resnet50conv5", "gem", pretrain="none").backbone
        vgg = network.make_model("vgg16", "gem", pretrain="none").backbone
        alexnet = network.make_model("alexnet", "gem", pretrain="none").backbone
    assert len(resnet) == 7  # conv1, bn1, relu, maxpool, layer1, layer2, layer3
    assert trainable_prefixes(resnet) == ["6"]
    assert len(resnet5) == 8 and trainable_prefixes(resnet5) == ["6", "7"]
    assert len(vgg) == 29 and trainable_prefixes(vgg) == ["24", "26", "28"]  # last 5 layers: 3 convs
    assert len(alexnet) == 11 and trainable_prefixes(alexnet) == ["10", "6", "8"]


def test_cct_truncation_freezing_and_pooling():
    torch.manual_seed(0)
    # 0 truncates and freezes nothing, as in the original (it tests the flags for truthiness)
    with torch.device("meta"):  # structure and requires_grad only
        full = network.make_model("cct384", "netvlad", pretrain="none", resize=(384, 384), trunc_te=0, freeze_te=0)
    assert len(full.backbone.classifier.blocks) == 14
    assert all(p.requires_grad for p in full.backbone.parameters())
    cut = network.make_model("cct384", "seqpool", pretrain="none", resize=(384, 384), trunc_te=3, freeze_te=1)
    assert len(cut.backbone.classifier.blocks) == 3
    trainable = {name for name, p in cut.backbone.named_parameters() if p.requires_grad}
    assert trainable and all(name.startswith("classifier.blocks.2.") for name in trainable)
    # seqpool: the softmax(attention_pool(tokens))-weighted sum of the tokens; cls: the first token (CCT has no
    # class token: the original's cls returns the top-left patch's token after the final norm)
    images = random_images("cct384")
    cut.eval()
    cls = network.make_model("cct384", "cls", pretrain="none", resize=(384, 384), trunc_te=3).eval()
    cls.load_state_dict(cut.state_dict())
    with torch.no_grad():
        pooled = cut(images)
        first_token = cls(images)
        cut.backbone.classifier.output = TOKENS
        tokens = cut.backbone(images)
        weights = F.softmax(cut.backbone.classifier.attention_pool(tokens), dim=1)  # [N, T, 1]
        torch.testing.assert_close(pooled, (weights * tokens).sum(dim=1), rtol=1e-5, atol=1e-6)
    assert tokens.shape == (2, 576, 384)
    torch.testing.assert_close(first_token, tokens[:, 0], rtol=0, atol=0)
    with pytest.raises(ValueError, match="--resize 384 384"):
        cut(torch.zeros(1, 3, 224, 224))


def test_vit_tokens_truncation_and_freezing():
    model = network.make_model("vit", "gem", pretrain="none", resize=(224, 224), trunc_te=2, freeze_te=0)
    assert len(model.backbone.vit_model.encoder.layer) == 2
    assert all(p.requires_grad for p in model.backbone.parameters())
    with torch.device("meta"):
        frozen = network.make_model("vit", "cls", pretrain="none", resize=(224, 224), trunc_te=3, freeze_te=1)
    trainable = {name.split(".")[3] for name, p in frozen.backbone.named_parameters() if p.requires_grad}
    assert trainable == {"2"}
    with torch.no_grad():
        model.eval()
        tokens = model.backbone(random_images("vit", batch_size=1))
        model.backbone.output = CLASS_TOKEN
        cls = model.backbone(random_images("vit", batch_size=1))
    assert tokens.shape == (1, 196, 768) and cls.shape == (1, 768)
    with pytest.raises(UserInputError, match="--resize 224 224 or --resize 384 384"):
        network.make_model("vit", "cls", pretrain="none", resize=(300, 300))


def test_unavailable_pretraining_is_a_clear_error():
    with pytest.raises(UserInputError, match="--pretrain places is not available for --backbone cct384"):
        network.make_model("cct384", "cls", pretrain="places", resize=(384, 384))


# ----------------------------------------------------------------------------------------------------------
# FLOPs

def test_flops_and_params_on_a_copy():
    aggregation, dim = network.make_aggregation("gem", Features(MAP, 8), "before_pool", fc_output_dim=4)
    model = network.GeoLocalizationNet(nn.Conv2d(3, 8, 3, padding=1, bias=False), aggregation, dim)
    keys = list(model.state_dict())
    flops, params = util.compute_flops_and_params(model, (16, 12), "cpu")
    # conv: 16*12 outputs x 8 channels x (3 x 3x3) MACs; linear: 8 x 4 MACs; FLOPs = 2 x MACs
    assert flops == 2 * (16 * 12 * 8 * 27 + 8 * 4)
    assert params == 8 * 27 + 1 + 8 * 4 + 4
    assert list(model.state_dict()) == keys  # thop's counters stay on the copy
    assert util.format_flops(22_334_000_000) == "22.33 GFLOPs"
