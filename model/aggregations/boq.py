"""BoQ, Bag-of-Queries (Ali-bey et al., CVPR 2024): learned queries cross-attend to the projected local features
after each of a stack of transformer encoder layers. PyTorch's own encoder layer and multi-head attention, as the
authors use them (same numbers); module names as amaralibey/Bag-of-Queries', so that releases load."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from commons import UserInputError
from model.parts import KeyLayout, Option

# Defaults of the best released model (dinov2_12288; resnet50_16384 has --boq_proj_channels 512)
OPTIONS = (
    Option("boq_proj_channels", int, 384, "Width E of BoQ's projection (E // 64 attention heads, which must divide "
           "E; descriptor E x rows)", minimum=64),
    Option("boq_queries", int, 64, "Learned queries of each BoQ block", minimum=1),
    Option("boq_layers", int, 2, "Number of BoQ blocks", minimum=1),
    Option("boq_row_dim", int, 32, "Rows R of BoQ's final projection of the queries (descriptor width x R)",
           minimum=1),
)
KEY_LAYOUTS = (KeyLayout("BoQ release", (("aggregator.", "aggregation."),)),)


class BoQBlock(nn.Module):
    """An encoder layer on the tokens, then the learned queries (after their own self-attention) cross-attend to
    its output. Returns (encoder output, for the next block; the queries' output [B, Q, E])."""

    def __init__(self, in_dim, num_queries, nheads):
        super().__init__()
        self.encoder = nn.TransformerEncoderLayer(d_model=in_dim, nhead=nheads, dim_feedforward=4 * in_dim,
                                                  batch_first=True, dropout=0.0)
        self.queries = nn.Parameter(torch.randn(1, num_queries, in_dim))
        self.self_attn = nn.MultiheadAttention(in_dim, num_heads=nheads, batch_first=True)
        self.norm_q = nn.LayerNorm(in_dim)
        self.cross_attn = nn.MultiheadAttention(in_dim, num_heads=nheads, batch_first=True)
        self.norm_out = nn.LayerNorm(in_dim)

    def forward(self, x):
        x = self.encoder(x)
        q = self.queries.repeat(x.size(0), 1, 1)
        q = self.norm_q(q + self.self_attn(q, q, q)[0])  # independent of the image
        out = self.norm_out(self.cross_attn(q, x, x)[0])  # no residual
        return x, out


class BoQ(nn.Module):
    """[B, C, h, w] -> [B, proj_channels * row_dim] (index e * row_dim + r), L2-normalised. Only the descriptor:
    the authors' module also returns the cross-attention maps, which it does not depend on."""

    def __init__(self, in_channels, proj_channels=384, num_queries=64, num_layers=2, row_dim=32):
        super().__init__()
        self.proj_c = nn.Conv2d(in_channels, proj_channels, kernel_size=3, padding=1)
        self.norm_input = nn.LayerNorm(proj_channels)
        self.boqs = nn.ModuleList([BoQBlock(proj_channels, num_queries, proj_channels // 64)
                                   for _ in range(num_layers)])
        self.fc = nn.Linear(num_layers * num_queries, row_dim)
        self.output_dim = proj_channels * row_dim

    def forward(self, x):
        x = self.proj_c(x)
        x = self.norm_input(x.flatten(2).permute(0, 2, 1))  # [B, h*w, E]
        outs = []
        for block in self.boqs:
            x, out = block(x)
            outs.append(out)
        out = self.fc(torch.cat(outs, dim=1).permute(0, 2, 1))  # [B, E, L*Q] -> [B, E, R]
        return F.normalize(out.flatten(1), p=2, dim=-1)


def build(features, options):
    proj_channels = options["boq_proj_channels"]
    if proj_channels < 64 or proj_channels % (proj_channels // 64):
        raise UserInputError(f"--boq_proj_channels must be at least 64 and divisible by its number of attention "
                             f"heads (E // 64), got {proj_channels}: use a multiple of 64")
    layer = BoQ(features.channels, proj_channels, options["boq_queries"], options["boq_layers"],
                options["boq_row_dim"])
    return layer, layer.output_dim
