"""SALAD (Izquierdo & Civera, CVPR 2024): local features assigned to clusters by optimal transport (Sinkhorn with a
dustbin) plus a global token; and MegaLoc's aggregator (Berton & Masone, 2025), the same layer with 256-wide
clusters followed by a linear layer (the generic --fc_output_dim one). Module names as serizba/salad's, so that
releases load."""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from commons import UserInputError
from model import functional
from model.parts import KeyLayout, Option

HIDDEN_DIM = 512  # fixed in SALAD's code
DROPOUT = 0.3
SINKHORN_ITERATIONS = 3


def _options(cluster_dim):
    return (
        Option("salad_clusters", int, 64, "Clusters m of SALAD / MegaLoc's optimal transport (fewer than the "
               "backbone's patches)", minimum=1),
        Option("salad_cluster_dim", int, cluster_dim, "Width of each SALAD / MegaLoc cluster's descriptor",
               minimum=1),
        Option("salad_token_dim", int, 256, "Width of SALAD / MegaLoc's global-token descriptor", minimum=1),
    )


OPTIONS = _options(128)  # the released SALAD model
MEGALOC_OPTIONS = _options(256)
MEGALOC_FC_OUTPUT_DIM = 8448
KEY_LAYOUTS = (KeyLayout("SALAD release", (("aggregator.", "aggregation."),)),)
# Our MegaLoc is Sequential(SALAD, Linear, L2Norm), the generic --fc_output_dim wrap
MEGALOC_KEY_LAYOUTS = (KeyLayout("MegaLoc release", (("aggregator.agg.", "aggregation.0."),
                                                     ("aggregator.linear.", "aggregation.1."))),)


class SALAD(nn.Module):
    """(map [B, C, h, w], class token [B, C]) -> [B, token_dim + cluster_dim * num_clusters], L2-normalised: the
    normalised token part first, then the intra-normalised cluster part flattened channel-major (c * m + k)."""

    def __init__(self, num_channels=768, num_clusters=64, cluster_dim=128, token_dim=256, mlp_dim=HIDDEN_DIM,
                 dropout=DROPOUT):
        super().__init__()
        self.num_clusters = num_clusters
        self.cluster_dim = cluster_dim
        self.token_dim = token_dim
        # One dropout instance in both branches, as the authors (no parameters: the keys do not change)
        dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.token_features = nn.Sequential(nn.Linear(num_channels, mlp_dim), nn.ReLU(),
                                            nn.Linear(mlp_dim, token_dim))
        self.cluster_features = nn.Sequential(nn.Conv2d(num_channels, mlp_dim, 1), dropout, nn.ReLU(),
                                              nn.Conv2d(mlp_dim, cluster_dim, 1))
        self.score = nn.Sequential(nn.Conv2d(num_channels, mlp_dim, 1), dropout, nn.ReLU(),
                                   nn.Conv2d(mlp_dim, num_clusters, 1))
        self.dust_bin = nn.Parameter(torch.tensor(1.0))
        self.output_dim = token_dim + cluster_dim * num_clusters

    def forward(self, x):
        features, token = x
        f = self.cluster_features(features).flatten(2)  # [B, l, n]
        scores = self.score(features).flatten(2)  # [B, m, n]
        t = self.token_features(token)  # [B, g]
        p = torch.exp(functional.log_optimal_transport(scores, self.dust_bin, SINKHORN_ITERATIONS))
        p = p[:, :-1, :]  # the dustbin's share is dropped
        clusters = torch.bmm(f, p.transpose(1, 2))  # [B, l, m]: sum_j f[c, j] p[k, j]
        clusters = F.normalize(clusters, p=2, dim=1).flatten(1)
        return F.normalize(torch.cat((F.normalize(t, p=2, dim=-1), clusters), dim=-1), p=2, dim=-1)


def _patches_error(features, clusters):
    """The message when the backbone's map has no more patches than `clusters`, else None."""
    if features.map_size is None:
        return None
    h, w = features.map_size
    if h * w > clusters:
        return None
    side = math.isqrt(clusters) + 1  # the smallest square map with more patches than clusters
    fewer = f", or fewer --salad_clusters (at most {h * w - 1})" if h * w > 1 else ""
    return (f"SALAD's optimal transport needs more patches than its {clusters} clusters, but the backbone's map at "
            f"this --resize is {h}x{w} = {h * w} patches: use a larger --resize (the smallest square one is --resize "
            f"{side * 14} {side * 14} with a patch-14 backbone such as DINOv2, a {side}x{side} map){fewer}")


def build(features, options):
    """SALAD, and MegaLoc's SALAD block (its Linear 16640 -> 8448 and L2 norm are the generic --fc_output_dim
    wrap, default_fc_output_dim of its entry)."""
    clusters = options["salad_clusters"]
    message = _patches_error(features, clusters)
    if message:
        raise UserInputError(message)
    layer = SALAD(features.channels, clusters, options["salad_cluster_dim"], options["salad_token_dim"])
    return layer, layer.output_dim
