"""MixVPR (Ali-bey et al., WACV 2023): Feature-Mixer MLPs over each channel's flattened map, then channel and row
projections. Module names as amaralibey/MixVPR's, so that the released `aggregator.*` keys load by prefix."""
import torch.nn as nn
import torch.nn.functional as F

from commons import UserInputError
from model.parts import KeyLayout, Option

# Defaults of the best released model (resnet50_MixVPR_4096_channels(1024)_rows(4))
OPTIONS = (
    Option("mixvpr_out_channels", int, 1024, "Channels C' after MixVPR's channel projection (descriptor C' x rows)",
           minimum=1),
    Option("mixvpr_out_rows", int, 4, "Rows R after MixVPR's row projection (descriptor channels x R)", minimum=1),
    Option("mixvpr_mix_depth", int, 4, "Number of MixVPR Feature-Mixer layers", minimum=1),
    Option("mixvpr_mlp_ratio", int, 1, "Hidden width of each MixVPR Feature-Mixer, in multiples of h x w",
           minimum=1),
)
KEY_LAYOUTS = (KeyLayout("MixVPR release", (("aggregator.", "aggregation."),)),)


class FeatureMixerLayer(nn.Module):
    """x + MLP(LayerNorm(x)) over the last dim (a channel's h*w values)."""

    def __init__(self, in_dim, mlp_ratio=1):
        super().__init__()
        self.mix = nn.Sequential(
            nn.LayerNorm(in_dim),
            nn.Linear(in_dim, int(in_dim * mlp_ratio)),
            nn.ReLU(),
            nn.Linear(int(in_dim * mlp_ratio), in_dim),
        )
        # The authors' training initialisation (a release overwrites it)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def forward(self, x):
        return x + self.mix(x)


class MixVPR(nn.Module):
    """[B, C, h, w] -> [B, out_channels * out_rows], L2-normalised. The layer sizes depend on h x w: a model only
    takes the map size it was built for."""

    def __init__(self, in_channels, in_h, in_w, out_channels=1024, mix_depth=4, mlp_ratio=1, out_rows=4):
        super().__init__()
        self.in_h, self.in_w = in_h, in_w
        hw = in_h * in_w
        self.mix = nn.Sequential(*[FeatureMixerLayer(hw, mlp_ratio) for _ in range(mix_depth)])
        self.channel_proj = nn.Linear(in_channels, out_channels)
        self.row_proj = nn.Linear(hw, out_rows)
        self.output_dim = out_channels * out_rows

    def forward(self, x):
        if tuple(x.shape[-2:]) != (self.in_h, self.in_w):
            raise ValueError(f"MixVPR was built for {self.in_h}x{self.in_w} maps (its --resize), got "
                             f"{x.shape[-2]}x{x.shape[-1]}")
        x = x.flatten(2)  # [B, C, h*w], each channel's map is one token
        x = self.mix(x)
        x = self.channel_proj(x.permute(0, 2, 1))  # [B, h*w, C']
        x = self.row_proj(x.permute(0, 2, 1))  # [B, C', R]
        return F.normalize(x.flatten(1), p=2, dim=-1)


def build(features, options):
    if features.map_size is None:
        raise UserInputError("--aggregation mixvpr sizes its layers by the backbone's map (h x w), which is unknown "
                             "here: build the model with network.make_model, or give Features a map_size")
    h, w = features.map_size
    layer = MixVPR(features.channels, h, w, out_channels=options["mixvpr_out_channels"],
                   mix_depth=options["mixvpr_mix_depth"], mlp_ratio=options["mixvpr_mlp_ratio"],
                   out_rows=options["mixvpr_out_rows"])
    return layer, layer.output_dim
