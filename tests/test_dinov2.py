"""DINOv2 backbones: official keys, forward against a plain float64 re-statement of the formulas, positional
interpolation against the cubic-convolution kernel, freezing, MegaLoc's input rounding, weights and key layouts."""
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms import functional as TF

import checkpoint
import network
import util
from model.backbones import BACKBONES, dinov2
from model.parts import CLASS_TOKEN, MAP, MAP_AND_CLASS_TOKEN, TOKENS, BackboneRequest, MultipleOf

KEYS_FILE = os.path.join(os.path.dirname(__file__), "data", "methods_keys", "dinov2.json")
VARIANTS = ("vits14", "vitb14", "vitl14", "vitg14")
SIZES = [(224, 224), (322, 322), (224, 322), (518, 518)]
TOLERANCE = 2e-5  # float32 model against the float64 reference


def no_download(module, source, layout=None):
    raise AssertionError(f"unexpected weights download: {source}")


def build(layout=MAP, final_norm=True, round_input=False, trunc_te=2, freeze_te=None, seed=0):
    """A small dinov2_vits14 with random weights, LayerNorms, LayerScales and class token randomised too (their
    initial values, ones / zeros / ~0, would hide mistakes)."""
    torch.manual_seed(seed)
    options = {"trunc_te": trunc_te, "freeze_te": freeze_te}
    request = BackboneRequest("dinov2_vits14", layout, "none", (224, 224), options, no_download,
                              final_norm=final_norm, round_input_to_patch=round_input)
    backbone, features = BACKBONES["dinov2_vits14"].build(request)
    with torch.no_grad():
        for name, parameter in backbone.named_parameters():
            if "norm" in name or name.endswith("gamma") or name == "cls_token":
                parameter.copy_(torch.randn_like(parameter) * 0.5 + (1 if name.endswith("weight") else 0))
    return backbone.eval(), features


# ----------------------------------------------------------------------------------------------------------
# Plain float64 references

def cubic(x, a=-0.75):
    """The cubic-convolution kernel (Keys) with PyTorch's a = -0.75."""
    x = abs(x)
    if x <= 1:
        return ((a + 2) * x - (a + 3)) * x * x + 1
    if x < 2:
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return 0.0


def resampling_matrix(out, grid=37):
    """[out, grid]: output i reads source coordinate (i + 0.5) / s - 0.5 with s = (out + 0.1) / 37, four taps
    clamped to the grid."""
    scale = (out + 0.1) / grid
    matrix = torch.zeros(out, grid, dtype=torch.float64)
    for i in range(out):
        source = (i + 0.5) / scale - 0.5
        for tap in range(math.floor(source) - 1, math.floor(source) + 3):
            matrix[i, min(max(tap, 0), grid - 1)] += cubic(source - tap)
    return matrix


def reference_pos_embed(table, rows, cols):
    if rows == cols == 37:
        return table
    grid = table[0, 1:].reshape(37, 37, -1)
    resampled = torch.einsum("ri,cj,ijd->rcd", resampling_matrix(rows), resampling_matrix(cols), grid)
    return torch.cat([table[:, :1], resampled.reshape(1, rows * cols, -1)], dim=1)


def layer_norm(x, weight, bias):
    mean = x.mean(-1, keepdim=True)
    variance = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(variance + 1e-6) * weight + bias


def reference_block(p, x, heads):
    """One block: p holds its parameters (float64) under the official names without the blocks.{i}. prefix."""
    dim = x.shape[-1]
    qkv = layer_norm(x, p["norm1.weight"], p["norm1.bias"]) @ p["attn.qkv.weight"].T + p["attn.qkv.bias"]
    heads_out = []
    for h in range(heads):  # q, k, v: thirds of qkv; head h: their channels h*64 ... h*64+63
        q, k, v = (qkv[..., part * dim + h * 64: part * dim + (h + 1) * 64] for part in range(3))
        heads_out.append(torch.softmax(q @ k.transpose(-1, -2) / 8, dim=-1) @ v)
    x = x + p["ls1.gamma"] * (torch.cat(heads_out, dim=-1) @ p["attn.proj.weight"].T + p["attn.proj.bias"])
    a = layer_norm(x, p["norm2.weight"], p["norm2.bias"])
    if "mlp.w12.weight" in p:
        u = a @ p["mlp.w12.weight"].T + p["mlp.w12.bias"]
        u1, u2 = u[..., :u.shape[-1] // 2], u[..., u.shape[-1] // 2:]
        ffn = (u1 * torch.sigmoid(u1) * u2) @ p["mlp.w3.weight"].T + p["mlp.w3.bias"]
    else:
        u = a @ p["mlp.fc1.weight"].T + p["mlp.fc1.bias"]
        ffn = (0.5 * u * (1 + torch.erf(u / math.sqrt(2)))) @ p["mlp.fc2.weight"].T + p["mlp.fc2.bias"]
    return x + p["ls2.gamma"] * ffn


def block_parameters(state_dict, index):
    prefix = f"blocks.{index}."
    return {key[len(prefix):]: value for key, value in state_dict.items() if key.startswith(prefix)}


def reference_tokens(module, images, heads=6):
    """(tokens after the last block, after the final norm), [B, 1 + N, D] each, in float64."""
    p = {key: value.double() for key, value in module.state_dict().items()}
    images = images.double()
    batch, _, height, width = images.shape
    rows, cols = height // 14, width // 14
    # Patch embedding as a product: pixels of each patch in (channel, row, column) order, patches row-major
    patches = images.reshape(batch, 3, rows, 14, cols, 14).permute(0, 2, 4, 1, 3, 5).reshape(batch, rows * cols, -1)
    x = patches @ p["patch_embed.proj.weight"].reshape(len(p["norm.weight"]), -1).T + p["patch_embed.proj.bias"]
    x = torch.cat([p["cls_token"].expand(batch, -1, -1), x], dim=1) + reference_pos_embed(p["pos_embed"], rows, cols)
    for index in range(len(module.blocks)):
        x = reference_block(block_parameters(p, index), x, heads)
    return x, layer_norm(x, p["norm.weight"], p["norm.bias"])


def max_difference(ours, reference):
    return (ours.double() - reference).abs().max().item()


# ----------------------------------------------------------------------------------------------------------
# Registry and keys

def test_registry_entries():
    for variant in VARIANTS:
        entry = BACKBONES[f"dinov2_{variant}"]
        assert entry.layouts == (MAP, MAP_AND_CLASS_TOKEN, CLASS_TOKEN, TOKENS)
        assert entry.pretrainings == ("imagenet", "none") and entry.sizes == MultipleOf(14)
        assert len(entry.key_layouts) == 3
    assert network.layout_for("dinov2_vitb14", "gem") == MAP
    assert network.layout_for("dinov2_vitb14", "cls") == CLASS_TOKEN
    assert "the nearest valid is --resize 476 644" in network.resize_error("dinov2_vitb14", (480, 640))
    assert network.resize_error("dinov2_vitb14", (322, 322)) is None
    # The checks only bound the ranges: freeze_te 0 freezes the token preparation alone
    check = BACKBONES["dinov2_vitb14"].check
    assert check({"trunc_te": 12, "freeze_te": 8}) is None and check({"trunc_te": None, "freeze_te": 0}) is None
    assert "0..12" in check({"trunc_te": 13, "freeze_te": None})
    assert "0..12" in check({"trunc_te": None, "freeze_te": -1})
    assert BACKBONES["dinov2_vitg14"].check({"trunc_te": 40, "freeze_te": 40}) is None


@pytest.mark.parametrize("variant", VARIANTS)
def test_state_dict_keys_shapes_and_order_equal_the_official_files(variant):
    with open(KEYS_FILE) as file:
        reference = json.load(file)[f"dinov2_{variant}_pretrain.pth"]
    with torch.device("meta"):
        model = network.make_model(f"dinov2_{variant}", "gem", pretrain="none", resize=(224, 224))
    keys = list(model.state_dict())
    backbone_keys = [key for key in keys if key.startswith("backbone.")]
    assert keys[:len(backbone_keys)] == backbone_keys  # the backbone first, then the aggregation
    ours = {key[len("backbone."):]: list(value.shape) for key, value in model.state_dict().items()
            if key.startswith("backbone.")}
    assert list(ours) == list(reference)
    assert ours == reference
    assert sum(value.numel() for value in model.backbone.parameters()) == \
        {"vits14": 22_056_576, "vitb14": 86_580_480, "vitl14": 304_368_640, "vitg14": 1_136_480_768}[variant]
    if variant == "vitg14":
        assert dinov2.swiglu_hidden(1536) == 4096


# ----------------------------------------------------------------------------------------------------------
# Forward

@pytest.fixture(scope="module")
def layout_models():
    """The same weights behind every layout, and behind the final norm left out."""
    models = {layout: build(layout)[0] for layout in dinov2.LAYOUTS}
    models["prenorm"] = build(TOKENS, final_norm=False)[0]
    reference_state = models[MAP].state_dict()
    for model in models.values():
        assert all(torch.equal(value, reference_state[key]) for key, value in model.state_dict().items())
    return models


@pytest.mark.parametrize("size", SIZES)
def test_every_layout_against_the_float64_reference(layout_models, size):
    torch.manual_seed(1)
    images = torch.randn(2, 3, *size)
    rows, cols = size[0] // 14, size[1] // 14
    with torch.no_grad():
        outputs = {layout: model(images) for layout, model in layout_models.items()}
    prenorm, normed = reference_tokens(layout_models[MAP], images)
    patch_map, class_token = outputs[MAP_AND_CLASS_TOKEN]
    assert outputs[MAP].shape == patch_map.shape == (2, 384, rows, cols)
    assert outputs[CLASS_TOKEN].shape == class_token.shape == (2, 384)
    assert outputs[TOKENS].shape == outputs["prenorm"].shape == (2, rows * cols, 384)
    assert torch.equal(outputs[MAP], patch_map) and torch.equal(outputs[CLASS_TOKEN], class_token)
    # Map = row-major tokens: token r * cols + c is the map's (r, c)
    assert torch.equal(patch_map.flatten(2).transpose(1, 2), outputs[TOKENS])
    assert torch.equal(patch_map[:, :, 1, 2], outputs[TOKENS][:, cols + 2])
    assert max_difference(outputs[TOKENS], normed[:, 1:]) < TOLERANCE
    assert max_difference(class_token, normed[:, 0]) < TOLERANCE
    assert max_difference(outputs["prenorm"], prenorm[:, 1:]) < TOLERANCE
    # Without the final norm: the last block's tokens, which the norm turns into the normalised ones
    norm = layout_models["prenorm"].norm
    renormed = F.layer_norm(outputs["prenorm"], (384,), norm.weight, norm.bias, eps=1e-6)
    assert (renormed - outputs[TOKENS]).abs().max() < 1e-5
    assert not torch.allclose(outputs["prenorm"], outputs[TOKENS], atol=1e-2)
    assert "norm.weight" in layout_models["prenorm"].state_dict()


@pytest.mark.parametrize("rows,cols", [(16, 16), (23, 23), (16, 23), (34, 46), (1, 5), (40, 37), (37, 36), (1, 1369)])
def test_positional_interpolation_equals_the_cubic_convolution(rows, cols):
    torch.manual_seed(0)
    table = torch.randn(1, 1370, 8) * 0.02
    ours = dinov2.interpolate_pos_embed(table, rows, cols, torch.float32)
    assert ours.shape == (1, 1 + rows * cols, 8) and ours.dtype == torch.float32
    assert max_difference(ours, reference_pos_embed(table.double(), rows, cols)) < 1e-6
    assert torch.equal(ours[:, 0], table[:, 0])
    # A size instead of the scale factor samples elsewhere: the reference tells them apart
    by_size = F.interpolate(table[:, 1:].reshape(1, 37, 37, 8).permute(0, 3, 1, 2), size=(rows, cols), mode="bicubic")
    assert (by_size.permute(0, 2, 3, 1).reshape(1, -1, 8) - ours[:, 1:]).abs().max() > 1e-4


def test_positional_table_at_518_is_used_as_is_and_cast_otherwise():
    torch.manual_seed(0)
    table = torch.randn(1, 1370, 8) * 0.02
    assert dinov2.interpolate_pos_embed(table, 37, 37, torch.float32) is table
    half = dinov2.interpolate_pos_embed(table.half(), 16, 23, torch.float16)
    assert torch.equal(half, dinov2.interpolate_pos_embed(table.half().float(), 16, 23, torch.float32).half())


def test_one_block_against_the_formulas():
    torch.manual_seed(0)
    for dim, heads, swiglu in ((384, 6, False), (128, 2, True)):
        block = dinov2.Block(dim, heads, swiglu)
        with torch.no_grad():  # Linear weights as initialised (std 0.02); biases, norms and LayerScales random
            for name, parameter in block.named_parameters():
                if parameter.dim() == 1:
                    parameter.copy_(torch.randn_like(parameter) * 0.5 + (1 if name.startswith("norm") and
                                                                         name.endswith("weight") else 0))
        x = torch.randn(2, 17, dim)
        with torch.no_grad():
            ours = block(x)
        p = {key: value.double() for key, value in block.state_dict().items()}
        difference = max_difference(ours, reference_block(p, x.double(), heads))
        assert difference < 2e-6, difference
        if swiglu:  # int(4 * 128 * 2 / 3) = 341, up to a multiple of 8
            assert block.mlp.w12.weight.shape == (2 * 344, 128) and block.mlp.w3.weight.shape == (128, 344)


# ----------------------------------------------------------------------------------------------------------
# Truncation and freezing

def trained_names(module):
    return {name for name, parameter in module.named_parameters() if parameter.requires_grad}


def test_trunc_te_and_freeze_te_train_only_the_later_blocks_and_the_norm():
    backbone, _ = build(MAP_AND_CLASS_TOKEN, trunc_te=3, freeze_te=2)
    backbone.train()
    assert len(backbone.blocks) == 3 and "blocks.3.norm1.weight" not in backbone.state_dict()
    assert trained_names(backbone) == {name for name, _ in backbone.named_parameters()
                                       if name.startswith(("blocks.2.", "norm."))}
    grad_enabled = {}
    for name in ("patch_embed", "blocks.0", "blocks.1", "blocks.2"):
        backbone.get_submodule(name).register_forward_hook(
            lambda module, inputs, output, name=name: grad_enabled.__setitem__(name, torch.is_grad_enabled()))
    torch.manual_seed(1)
    patch_map, class_token = backbone(torch.randn(2, 3, 28, 42))
    (patch_map.square().sum() + class_token.sum()).backward()
    assert grad_enabled == {"patch_embed": False, "blocks.0": False, "blocks.1": False, "blocks.2": True}
    for name, parameter in backbone.named_parameters():
        if name in trained_names(backbone):
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
        else:
            assert parameter.grad is None, name


def test_freeze_te_zero_freezes_the_token_preparation_only_and_salad_trains_the_last_four():
    backbone, _ = build(trunc_te=2, freeze_te=0)
    assert {name for name, _ in backbone.named_parameters()} - trained_names(backbone) == \
        {"cls_token", "pos_embed", "mask_token", "patch_embed.proj.weight", "patch_embed.proj.bias"}
    assert trained_names(build(trunc_te=2)[0]) == {name for name, _ in backbone.named_parameters()}
    with torch.device("meta"):
        model = network.make_model("dinov2_vitb14", "gem", pretrain="none", resize=(322, 322), freeze_te=8)
    trained = {".".join(name.split(".")[1:3]) if name.startswith("backbone.blocks.") else name.split(".")[1]
               for name in trained_names(model) if name.startswith("backbone.")}
    assert trained == {"blocks.8", "blocks.9", "blocks.10", "blocks.11", "norm"}


# ----------------------------------------------------------------------------------------------------------
# Input sizes

def test_round_input_to_patch_resizes_as_megaloc():
    rounding, _ = build(MAP, round_input=True, trunc_te=1)
    plain, _ = build(MAP, trunc_te=1)
    torch.manual_seed(1)
    images = torch.randn(1, 3, 480, 640)
    with torch.no_grad():
        rounded = rounding(images)
        assert rounded.shape == (1, 384, 34, 46)  # 476 x 644
        assert torch.equal(rounded, plain(TF.resize(images, [476, 644], antialias=True)))
        assert rounding(torch.randn(1, 3, 35, 49)).shape[-2:] == (2, 4)  # 2.5 -> 2, 3.5 -> 4: ties to even
    assert [side for side in dinov2.rounded_to_patch(torch.zeros(1, 3, 35, 49)).shape[-2:]] == [28, 56]
    assert dinov2.rounded_to_patch(torch.zeros(1, 3, 21, 7)).shape[-2:] == (28, 14)  # 1.5 -> 2; 0.5 -> 0 -> 1
    multiple = torch.zeros(1, 3, 224, 322)
    assert dinov2.rounded_to_patch(multiple) is multiple
    assert dinov2.map_size((480, 640), True) == (34, 46) and dinov2.map_size((224, 322), False) == (16, 23)
    with pytest.raises(ValueError, match="the nearest valid is --resize 476 644"):
        plain(images)


# ----------------------------------------------------------------------------------------------------------
# Weights

def hub_path(tmp_path, file_name):
    return str(tmp_path / "torch_home" / "hub" / "checkpoints" / file_name)


def test_missing_official_weights_offline_name_the_url_and_the_path(offline, tmp_path):
    for variant in VARIANTS:
        with torch.device("meta"), pytest.raises(util.WeightsUnavailableError) as error:
            network.make_model(f"dinov2_{variant}", "gem", resize=(224, 224))
        file_name = f"dinov2_{variant}_pretrain.pth"
        assert f"https://dl.fbaipublicfiles.com/dinov2/dinov2_{variant}/{file_name}" in str(error.value)
        assert f"put it at {hub_path(tmp_path, file_name)}" in str(error.value)
    assert len(offline) == 4


def test_placed_official_file_loads_without_network(offline, tmp_path):
    torch.manual_seed(0)
    weights = dinov2.DinoVisionTransformer("vits14").state_dict()
    os.makedirs(os.path.dirname(hub_path(tmp_path, "x")))
    torch.save(weights, hub_path(tmp_path, "dinov2_vits14_pretrain.pth"))
    model = network.make_model("dinov2_vits14", "gem", resize=(224, 224), trunc_te=1)
    loaded = {key[len("backbone."):]: value for key, value in model.state_dict().items() if key.startswith("backbone.")}
    assert list(loaded) == [key for key in weights if not key.startswith("blocks.") or key.startswith("blocks.0.")]
    assert all(torch.equal(value, weights[key]) for key, value in loaded.items())
    assert offline == []


# ----------------------------------------------------------------------------------------------------------
# Released checkpoints' key layouts

@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return network.make_model("dinov2_vits14", "gem", pretrain="none", resize=(224, 224), trunc_te=1)


@pytest.mark.parametrize("layout_index,their_prefix,drop_mask_token", [
    (0, "backbone.model.", False),  # SALAD, MegaLoc before 2026
    (1, "backbone.dino.", False),  # BoQ
    (2, "backbone.", True),  # MegaLoc safetensors
])
def test_released_dinov2_layouts_map_onto_our_keys(tiny_model, layout_index, their_prefix, drop_mask_token):
    ours = tiny_model.state_dict()
    backbone_keys = [key for key in ours if key.startswith("backbone.")]
    torch.manual_seed(1)
    theirs = {their_prefix + key[len("backbone."):]: torch.randn_like(ours[key]) for key in backbone_keys
              if not (drop_mask_token and key == "backbone.mask_token")}
    mapped = checkpoint.apply_key_layout(theirs, dinov2.KEY_LAYOUTS[layout_index], ours)
    assert sorted(mapped) == sorted(backbone_keys)
    for key in backbone_keys:
        expected = ours[key] if drop_mask_token and key == "backbone.mask_token" else \
            theirs[their_prefix + key[len("backbone."):]]
        assert torch.equal(mapped[key], expected)
    # The whole model picks that layout by itself (the aggregation's keys in ours)
    mask_token = tiny_model.backbone.mask_token.detach().clone()
    network.load_checkpoint_weights(tiny_model, {**theirs, "aggregation.1.p": ours["aggregation.1.p"]}, "a test file")
    assert torch.equal(tiny_model.backbone.blocks[0].attn.qkv.weight, theirs[their_prefix + "blocks.0.attn.qkv.weight"])
    if drop_mask_token:
        assert torch.equal(tiny_model.backbone.mask_token, mask_token)


def test_hints_suggest_trunc_te_from_the_block_count():
    missing = [f"backbone.blocks.{index}.norm1.weight" for index in (4, 5)]
    assert dinov2.hints(missing, []) == ["the checkpoint has 4 DINOv2 blocks: use --trunc_te 4"]
    unexpected = [f"backbone.blocks.{index}.ls1.gamma" for index in (2, 3, 11)]
    assert "has 12 DINOv2 blocks: use a larger --trunc_te" in dinov2.hints([], unexpected)[0]
    assert dinov2.hints(["backbone.norm.weight"], []) == []
