"""The original benchmark's ViT (transformers' ViTModel layout, written in plain PyTorch): its keys, a block's maths,
--trunc_te / --freeze_te, the Hugging Face weight files, and the model-zoo ViT-CLS entry."""
import collections
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

import network
import util
from model import zoo
from model.backbones import vit
from model.parts import CLASS_TOKEN, TOKENS

ORIGINAL_KEYS_FILE = os.path.join(os.path.dirname(__file__), "data", "seed_vit_state_dict_keys.json")


def original_keys():
    with open(ORIGINAL_KEYS_FILE) as file:
        return json.load(file)


@pytest.mark.parametrize("layout", list(original_keys()))
def test_state_dict_keys_shapes_and_order_equal_the_original(layout):
    """vit224+netvlad ... vit384+cls: the original's GeoLocalizationNet around transformers' ViTModel."""
    backbone, aggregation = layout.split("+")
    size = int(backbone[len("vit"):])
    with torch.device("meta"):
        model = network.make_model("vit", aggregation, pretrain="none", resize=(size, size))
    ours = {key: list(value.shape) for key, value in model.state_dict().items()}
    reference = original_keys()[layout]
    assert list(ours) == list(reference)
    assert ours == reference


def plain_layer_norm(x, weight, bias, eps=1e-12):
    mean = x.mean(-1, keepdim=True)
    variance = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(variance + eps) * weight + bias


def plain_block(layer, x):
    """x = x + O(Attn(LN_before(x))), x = x + W2(GELU(W1(LN_after(x)))); 12 heads of 64, softmax(q k^T / 8) v."""
    def linear(module, value):
        return value @ module.weight.T + module.bias
    attention = layer.attention.attention
    normed = plain_layer_norm(x, layer.layernorm_before.weight, layer.layernorm_before.bias)
    heads = []
    for head in range(12):
        columns = slice(64 * head, 64 * (head + 1))
        q, k, v = (linear(projection, normed)[..., columns] for projection in
                   (attention.query, attention.key, attention.value))
        heads.append(torch.softmax(q @ k.transpose(-1, -2) / 8, dim=-1) @ v)
    x = x + linear(layer.attention.output.dense, torch.cat(heads, dim=-1))
    normed = plain_layer_norm(x, layer.layernorm_after.weight, layer.layernorm_after.bias)
    hidden = linear(layer.intermediate.dense, normed)
    gelu = 0.5 * hidden * (1 + torch.erf(hidden / math.sqrt(2)))  # exact GELU
    return x + linear(layer.output.dense, gelu)


def test_a_block_and_the_whole_forward_follow_the_formulas():
    torch.manual_seed(0)
    model = network.make_model("vit", "gem", pretrain="none", resize=(224, 224), trunc_te=2).eval()
    vit_model = model.backbone.vit_model
    with torch.no_grad():
        for parameter in vit_model.parameters():  # LayerNorms away from identity too
            parameter.add_(torch.randn_like(parameter) * 0.02)
        images = torch.randn(2, 3, 224, 224)
        patches = F.conv2d(images, vit_model.embeddings.patch_embeddings.projection.weight,
                           vit_model.embeddings.patch_embeddings.projection.bias, stride=16)
        tokens = patches.flatten(2).transpose(1, 2)  # row-major
        x = torch.cat([vit_model.embeddings.cls_token.expand(2, -1, -1), tokens], dim=1)
        x = x + vit_model.embeddings.position_embeddings
        block_output = vit_model.encoder.layer[0](x)
        torch.testing.assert_close(block_output, plain_block(vit_model.encoder.layer[0], x), rtol=1e-5, atol=1e-5)
        for layer in vit_model.encoder.layer:
            x = plain_block(layer, x)
        hidden = plain_layer_norm(x, vit_model.layernorm.weight, vit_model.layernorm.bias)
        torch.testing.assert_close(model.backbone(images), hidden[:, 1:], rtol=1e-4, atol=1e-4)
        model.backbone.output = CLASS_TOKEN
        torch.testing.assert_close(model.backbone(images), hidden[:, 0], rtol=1e-4, atol=1e-4)
    assert all(norm.eps == 1e-12 for norm in vit_model.modules() if isinstance(norm, torch.nn.LayerNorm))


def test_the_original_wrapper_gives_tokens_to_netvlad_and_gem_and_the_class_token_to_cls():
    assert network.layout_for("vit", "netvlad") == TOKENS and network.layout_for("vit", "gem") == TOKENS
    assert network.layout_for("vit", "cls") == CLASS_TOKEN
    assert network.compatibility_error("vit", "seqpool") is not None


def test_trunc_te_and_freeze_te_as_the_original():
    """freeze_te N freezes the whole backbone, then unfreezes the encoder layers of index > N: layer N itself, the
    embeddings, the final LayerNorm and the pooler stay frozen."""
    with torch.device("meta"):
        model = network.make_model("vit", "netvlad", pretrain="none", resize=(384, 384), trunc_te=6, freeze_te=3)
        untouched = network.make_model("vit", "netvlad", pretrain="none", resize=(384, 384), trunc_te=0, freeze_te=0)
    assert len(model.backbone.vit_model.encoder.layer) == 6 and len(untouched.backbone.vit_model.encoder.layer) == 12
    trainable = {name for name, p in model.backbone.named_parameters() if p.requires_grad}
    assert {name.split(".")[3] for name in trainable} == {"4", "5"}
    assert all(name.startswith("vit_model.encoder.layer.") for name in trainable)
    assert all(p.requires_grad for p in untouched.backbone.parameters())


def hugging_face_file(model, image_size, classifier):
    """A Hugging Face ViT file: ViTModel's keys, or ViTForImageClassification's (vit. prefix, a classifier head and
    at 384 no pooler)."""
    state = collections.OrderedDict()
    for key, value in model.backbone.vit_model.state_dict().items():
        if classifier and key.startswith("pooler."):
            continue
        state[("vit." if classifier else "") + key] = value + 1
    if classifier:
        state["classifier.weight"], state["classifier.bias"] = torch.ones(1000, 768), torch.ones(1000)
    return state


@pytest.mark.parametrize("image_size,classifier", [(224, False), (384, True)])
def test_hugging_face_files_load_without_prefix_classifier_or_pooler(monkeypatch, tmp_path, image_size, classifier):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(util, "download_url", lambda *args, **kwargs: pytest.fail("no download expected"))
    torch.manual_seed(0)
    reference = network.make_model("vit", "cls", pretrain="none", resize=(image_size, image_size))
    path = os.path.join("data", "pretrained_nets", vit.WEIGHTS[image_size].file_name)
    os.makedirs(os.path.dirname(path))
    torch.save(hugging_face_file(reference, image_size, classifier), path)
    torch.manual_seed(1)
    model = network.make_model("vit", "cls", pretrain="imagenet", resize=(image_size, image_size))
    for key, value in reference.backbone.vit_model.state_dict().items():
        loaded = model.backbone.vit_model.state_dict()[key]
        if classifier and key.startswith("pooler."):
            assert not torch.equal(loaded, value + 1)  # absent from the file: stays at its initialisation
        else:
            assert torch.equal(loaded, value + 1), key


def test_a_hugging_face_file_with_a_foreign_key_is_refused_naming_it(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    reference = network.make_model("vit", "cls", pretrain="none", resize=(224, 224), trunc_te=1)
    state = hugging_face_file(network.make_model("vit", "cls", pretrain="none", resize=(224, 224)), 224, False)
    state["encoder.extra.weight"] = torch.ones(3)
    path = os.path.join("data", "pretrained_nets", vit.WEIGHTS[224].file_name)
    os.makedirs(os.path.dirname(path))
    torch.save(state, path)
    with pytest.raises(util.CheckpointError, match="encoder.extra.weight"):
        network.make_model("vit", "cls", pretrain="imagenet", resize=(224, 224))
    assert len(reference.backbone.vit_model.encoder.layer) == 1


def test_the_model_zoo_has_the_original_vit_cls():
    entry = zoo.MODEL_ZOO["vit224-cls-msls"]
    assert entry.google_drive_id == "1mPiIqFKnW1HWtXqKJhLLmIgMWoV14auG"
    assert entry.flags() == {"backbone": "vit", "aggregation": "cls", "resize": [224, 224]}
