"""Conv-AP (Ali-bey et al., GSV-Cities, Neurocomputing 2022): a 1x1 convolution that reduces the channels, then
adaptive average pooling to a small grid. Module names as amaralibey/gsv-cities', so that releases load."""
import torch.nn as nn
import torch.nn.functional as F

from model.parts import KeyLayout, Option

OPTIONS = (
    Option("convap_out_channels", int, 2048, "Channels C' of Conv-AP's 1x1 convolution (descriptor C' x H x W)",
           minimum=1),
    Option("convap_pool", int, (2, 2), "Grid H W of Conv-AP's adaptive average pooling", nargs=2,
           metavar=("H", "W"), minimum=1),
)
KEY_LAYOUTS = (KeyLayout("Conv-AP release", (("aggregator.", "aggregation."),)),)


class ConvAP(nn.Module):
    """[B, C, h, w] -> [B, out_channels * s1 * s2] (index c * s1 * s2 + i * s2 + j), L2-normalised. Any map size:
    cell (i, j) averages rows floor(i h / s1) .. ceil((i + 1) h / s1) - 1 (and likewise columns), so cells overlap
    when s1 does not divide h."""

    def __init__(self, in_channels, out_channels=2048, s1=2, s2=2):
        super().__init__()
        self.channel_pool = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=True)
        self.AAP = nn.AdaptiveAvgPool2d((s1, s2))
        self.output_dim = out_channels * s1 * s2

    def forward(self, x):
        return F.normalize(self.AAP(self.channel_pool(x)).flatten(1), p=2, dim=1)


def build(features, options):
    s1, s2 = options["convap_pool"]
    layer = ConvAP(features.channels, options["convap_out_channels"], s1, s2)
    return layer, layer.output_dim
