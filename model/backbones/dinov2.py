"""DINOv2 ViT-S/B/L/g-14 (Oquab et al., facebookresearch/dinov2), the plain models without registers, in plain
PyTorch with the official parameter names and order, so that the official files and the DINOv2 parts of SALAD, BoQ
and MegaLoc checkpoints load as they are.

Forward (eval): patch embedding (conv 14x14, stride 14), tokens row-major, class token prepended, the positional
table interpolated to the token grid (bicubic with the official scale factor (n + 0.1) / 37; the 518x518 grid uses
it as is) and added; pre-norm blocks x = x + ls1 * proj(Attn(LN1(x))), x = x + ls2 * FFN(LN2(x)) with 64-wide heads,
exact GELU MLPs (S/B/L) or a fused SwiGLU (g), every LayerNorm with eps 1e-6; then, if the aggregation takes the
normalised tokens (SALAD, MegaLoc; not BoQ), the final LayerNorm. It outputs the patch tokens as a map or a
sequence, the class token, or both. MegaLoc's aggregation asks for its input sides rounded to multiples of 14 first.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.transforms import functional as TF

from model.backbones.encoders import ENCODER_OPTIONS, depth_hints, encoder_check
from model.parts import (CLASS_TOKEN, MAP, MAP_AND_CLASS_TOKEN, TOKENS, Features, KeyLayout, MultipleOf,
                         WeightsSource)

PATCH = 14
HEAD_DIM = 64
LAYER_NORM_EPS = 1e-6
GRID = 37  # the positional table's grid side: built for 518x518 inputs (37 x 37 patches + the class row)
INTERPOLATE_OFFSET = 0.1  # plain models (the register ones use 0 and a size)
# variant: (embedding dim, depth, heads, SwiGLU feed-forward)
VARIANTS = {
    "vits14": (384, 12, 6, False),
    "vitb14": (768, 12, 12, False),
    "vitl14": (1024, 24, 16, False),
    "vitg14": (1536, 40, 24, True),
}
_OFFICIAL_URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_{0}/dinov2_{0}_pretrain.pth"
LAYOUTS = (MAP, MAP_AND_CLASS_TOKEN, CLASS_TOKEN, TOKENS)
SIZES = MultipleOf(PATCH)
# Released checkpoints holding a DINOv2: SALAD and the older MegaLoc keep the hub model under backbone.model., BoQ
# under backbone.dino.; the current MegaLoc file has our names but no mask_token (never used at inference).
KEY_LAYOUTS = (
    KeyLayout("SALAD / MegaLoc v1 DINOv2", (("backbone.model.", "backbone."),)),
    KeyLayout("BoQ DINOv2", (("backbone.dino.", "backbone."),)),
    KeyLayout("MegaLoc DINOv2 without mask_token", optional=("backbone.mask_token",)),
)


def official_weights(variant):
    """The official LVD-142M weights of a plain variant (a state dict with our keys)."""
    name = f"dinov2_{variant}_pretrain.pth"
    return WeightsSource(f"the official DINOv2 {variant} weights", name, url=_OFFICIAL_URL.format(variant),
                         in_hub_cache=True)


def swiglu_hidden(dim):
    """Giant's SwiGLU width: 2/3 of the nominal 4 x dim, rounded up to a multiple of 8 (4096 for 1536)."""
    return (int(4 * dim * 2 / 3) + 7) // 8 * 8


def interpolate_pos_embed(pos_embed, rows, cols, dtype):
    """The positional table [1, 1 + 37*37, D] for a grid of rows x cols patches, as the official plain models
    compute it: the table itself for 37 x 37; otherwise its grid resampled in float32 by bicubic interpolation with
    the scale factor (n + 0.1) / 37, which also sets the source coordinates (a size would give other values), then
    cast to `dtype`."""
    grid_rows = pos_embed.shape[1] - 1
    side = int(math.sqrt(grid_rows))
    if rows * cols == grid_rows and rows == cols:
        return pos_embed
    table = pos_embed.float()
    grid = table[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    scale = ((rows + INTERPOLATE_OFFSET) / side, (cols + INTERPOLATE_OFFSET) / side)
    grid = F.interpolate(grid, scale_factor=scale, mode="bicubic", align_corners=False, antialias=False)
    if tuple(grid.shape[-2:]) != (rows, cols):  # floor(37 * s) is the grid for every side checked (1..200)
        raise RuntimeError(f"Positional interpolation gave a {tuple(grid.shape[-2:])} grid for {(rows, cols)}")
    grid = grid.permute(0, 2, 3, 1).reshape(1, rows * cols, -1)
    return torch.cat([table[:, :1], grid], dim=1).to(dtype)


def rounded_to_patch(images):
    """MegaLoc's resize: each side to round(side / 14) * 14 (Python's round, ties to even), bilinear with
    antialiasing; the same tensor when the size does not change. A side under 7 pixels becomes 14 (the authors'
    code would make it 0 and fail)."""
    size = [max(1, round(side / PATCH)) * PATCH for side in images.shape[-2:]]
    if size == list(images.shape[-2:]):
        return images
    return TF.resize(images, size, antialias=True)


class PatchEmbed(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=PATCH, stride=PATCH)

    def forward(self, images):
        return self.proj(images).flatten(2).transpose(1, 2)  # [B, N, D], token = row * cols + col


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        batch, tokens, dim = x.shape
        # qkv channels: all of q, then k, then v; head h owns 64 consecutive channels of each
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)  # scale 1 / sqrt(64)
        return self.proj(x.transpose(1, 2).reshape(batch, tokens, dim))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class SwiGLUFFNFused(nn.Module):
    """Giant's feed-forward: one fused input projection w12, whose first half goes through SiLU and gates the
    second; w3 projects back."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x):
        gate, value = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(gate) * value)


class LayerScale(nn.Module):
    def __init__(self, dim, init_value=1.0):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init_value))

    def forward(self, x):
        return x * self.gamma


class Block(nn.Module):
    def __init__(self, dim, heads, swiglu=False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = Attention(dim, heads)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp = SwiGLUFFNFused(dim, swiglu_hidden(dim)) if swiglu else Mlp(dim, 4 * dim)
        self.ls2 = LayerScale(dim)

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class DinoVisionTransformer(nn.Module):
    """A plain DINOv2 ViT with the official parameter names; `layout` says what it outputs (model.parts),
    `final_norm` whether tokens go through the final norm (kept in the state dict either way),
    `round_input` whether input sides are first rounded to multiples of 14, `frozen_blocks` how many blocks (after
    the token preparation) run without gradients (None: nothing frozen); `depth` keeps only the first blocks."""

    def __init__(self, variant, layout=MAP, final_norm=True, round_input=False, name=None, depth=None):
        super().__init__()
        dim, full_depth, heads, swiglu = VARIANTS[variant]
        depth = full_depth if depth is None else depth
        self.embed_dim = dim
        self.layout, self.final_norm, self.round_input = layout, final_norm, round_input
        self.name = name or f"dinov2_{variant}"
        self.frozen_blocks = None
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, GRID * GRID + 1, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, dim))  # iBOT training only; in every official file
        self.patch_embed = PatchEmbed(dim)
        self.blocks = nn.ModuleList(Block(dim, heads, swiglu) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self._init_weights()

    def _init_weights(self):
        """The official random initialisation (the patch convolution and the LayerNorms keep PyTorch's)."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def prepare_tokens(self, images):
        """[B, 1 + N, D]: the class token and the patch tokens, with their positional embeddings."""
        rows, cols = images.shape[-2] // PATCH, images.shape[-1] // PATCH
        x = self.patch_embed(images)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1)
        return x + interpolate_pos_embed(self.pos_embed, rows, cols, x.dtype)

    def forward(self, images):
        if self.round_input:
            images = rounded_to_patch(images)
        elif images.shape[-2] % PATCH or images.shape[-1] % PATCH:
            raise ValueError(SIZES.error(self.name, tuple(images.shape[-2:])))
        rows, cols = images.shape[-2] // PATCH, images.shape[-1] // PATCH
        if self.frozen_blocks is None:
            x = self.prepare_tokens(images)
            trained = self.blocks
        else:  # as SALAD: the frozen prefix builds no graph
            with torch.no_grad():
                x = self.prepare_tokens(images)
                for block in self.blocks[:self.frozen_blocks]:
                    x = block(x)
            x = x.detach()
            trained = self.blocks[self.frozen_blocks:]
        for block in trained:
            x = block(x)
        if self.final_norm:
            x = self.norm(x)
        if self.layout == CLASS_TOKEN:
            return x[:, 0]
        patches = x[:, 1:]
        if self.layout == TOKENS:
            return patches
        patch_map = patches.transpose(1, 2).reshape(len(x), self.embed_dim, rows, cols)
        return (patch_map, x[:, 0]) if self.layout == MAP_AND_CLASS_TOKEN else patch_map

    def freeze(self, blocks):
        """Freeze the token preparation and the first `blocks` blocks (--freeze_te); the rest and the final norm
        stay trainable."""
        self.frozen_blocks = min(blocks, len(self.blocks))
        frozen = [self.cls_token, self.pos_embed, self.mask_token, *self.patch_embed.parameters()]
        frozen += [parameter for block in self.blocks[:self.frozen_blocks] for parameter in block.parameters()]
        for parameter in frozen:
            parameter.requires_grad = False


def map_size(resize, round_input):
    """(rows, cols) of the patch map of a `resize` input (rounded first when the model rounds it)."""
    return tuple(max(1, round(side / PATCH)) if round_input else side // PATCH for side in resize)


def builder(variant):
    """The build of a variant: official weights (--pretrain imagenet) or random ones (none), then --trunc_te N
    keeps the first N blocks and --freeze_te N freezes the token preparation and the first N blocks."""
    def build(request):
        trunc_te, freeze_te = request.options.get("trunc_te"), request.options.get("freeze_te")
        pretrained = request.pretrain == "imagenet"
        # Random weights: only the kept blocks are made; the official file holds them all
        backbone = DinoVisionTransformer(variant, request.layout, request.final_norm, request.round_input_to_patch,
                                         name=request.name, depth=None if pretrained else trunc_te)
        if pretrained:
            request.load_weights(backbone, official_weights(variant))
        if trunc_te is not None:
            backbone.blocks = nn.ModuleList(list(backbone.blocks)[:trunc_te])
        if freeze_te is not None:
            backbone.freeze(freeze_te)
        size = None
        if request.layout in (MAP, MAP_AND_CLASS_TOKEN):
            size = map_size(request.resize, request.round_input_to_patch)
        return backbone, Features(request.layout, backbone.embed_dim, size)
    return build


hints = depth_hints("backbone.blocks.", "DINOv2 blocks")


def entry(variant):
    """The registry entry (model.backbones.BackboneEntry) of a plain variant."""
    from model.backbones import BackboneEntry  # the registry module imports this one
    return BackboneEntry(builder(variant), LAYOUTS, ("imagenet", "none"), options=ENCODER_OPTIONS, sizes=SIZES,
                         check=encoder_check(VARIANTS[variant][1], lowest_freeze=0), key_layouts=KEY_LAYOUTS,
                         hints=hints)
