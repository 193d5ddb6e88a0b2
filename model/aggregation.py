"""Aggregation layers (a backbone's feature map or tokens -> one global descriptor) and their registry.

Module and parameter names follow the original benchmark exactly, so that its checkpoints load.
"""
from dataclasses import dataclass
from typing import Callable, FrozenSet

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from model import functional


class L2Norm(nn.Module):
    def __init__(self, dim=1):
        super().__init__()
        self.dim = dim

    def forward(self, x):
        return F.normalize(x, p=2, dim=self.dim)

    def __repr__(self):
        return f"{self.__class__.__name__}(dim={self.dim})"


class Flatten(nn.Module):
    """[N, D, 1, 1] -> [N, D]; the pooling before it must leave a 1x1 map."""

    def forward(self, x):
        assert x.shape[2] == x.shape[3] == 1, f"Flatten expects a 1x1 map, got {tuple(x.shape)}"
        return x[:, :, 0, 0]


class GeM(nn.Module):
    def __init__(self, p=3, eps=1e-6, work_with_tokens=False):
        super().__init__()
        self.p = nn.Parameter(torch.ones(1) * p)
        self.eps = eps
        self.work_with_tokens = work_with_tokens

    def forward(self, x):
        return functional.gem(x, p=self.p, eps=self.eps, work_with_tokens=self.work_with_tokens)

    def __repr__(self):
        p = "?" if self.p.is_meta else f"{self.p.data.tolist()[0]:.4f}"
        return f"{self.__class__.__name__}(p={p}, eps={self.eps}, work_with_tokens={self.work_with_tokens})"


class SPoC(nn.Module):
    def forward(self, x):
        return functional.spoc(x)


class MAC(nn.Module):
    def forward(self, x):
        return functional.mac(x)


class RMAC(nn.Module):
    def __init__(self, L=3, eps=1e-6):
        super().__init__()
        self.L = L
        self.eps = eps

    def forward(self, x):
        return functional.rmac(x, L=self.L, eps=self.eps)

    def __repr__(self):
        return f"{self.__class__.__name__}(L={self.L}, eps={self.eps})"


class RRM(nn.Module):
    """Residual Retrieval Module, from "Leveraging EfficientNet and Contrastive Learning for Accurate
    Global-scale Location Estimation": average pool, LayerNorm, a residual 2-layer MLP, LayerNorm, L2.
    """

    def __init__(self, dim):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(output_size=1)
        self.flatten = Flatten()
        self.ln1 = nn.LayerNorm(normalized_shape=dim)
        self.fc1 = nn.Linear(in_features=dim, out_features=dim)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(in_features=dim, out_features=dim)
        self.ln2 = nn.LayerNorm(normalized_shape=dim)
        self.l2 = L2Norm()

    def forward(self, x):
        x = self.flatten(self.avgpool(x))
        x = self.ln1(x)
        identity = x
        out = self.fc2(self.relu(self.fc1(x))) + identity
        return self.l2(self.ln2(out))


class NetVLAD(nn.Module):
    """NetVLAD layer (Arandjelovic et al.), on a [N, D, H, W] map or on tokens [N, T, D]."""

    def __init__(self, clusters_num=64, dim=128, normalize_input=True, work_with_tokens=False):
        super().__init__()
        self.clusters_num = clusters_num
        self.dim = dim
        self.alpha = 0
        self.normalize_input = normalize_input
        self.work_with_tokens = work_with_tokens
        if work_with_tokens:
            self.conv = nn.Conv1d(dim, clusters_num, kernel_size=1, bias=False)
        else:
            self.conv = nn.Conv2d(dim, clusters_num, kernel_size=(1, 1), bias=False)
        self.centroids = nn.Parameter(torch.rand(clusters_num, dim))

    @property
    def output_dim(self):
        return self.clusters_num * self.dim

    def init_params(self, centroids, descriptors):
        """Set centroids and the assignment conv from k-means `centroids` [K, D] (float32 numpy) and the
        `descriptors` [M, D] they were computed on, as the original does (alpha from the top-1/top-2 gap).
        """
        centroids_assign = centroids / np.linalg.norm(centroids, axis=1, keepdims=True)
        dots = np.dot(centroids_assign, descriptors.T)
        dots.sort(0)
        dots = dots[::-1, :]  # sort, descending
        self.alpha = (-np.log(0.01) / np.mean(dots[0, :] - dots[1, :])).item()
        conv_weight = torch.from_numpy(self.alpha * centroids_assign)
        conv_weight = conv_weight.reshape(*conv_weight.shape, *([1] * (self.conv.weight.dim() - 2)))
        with torch.no_grad():  # in place, so that optimisers and devices keep seeing the same tensors
            self.centroids.copy_(torch.from_numpy(centroids))
            self.conv.weight.copy_(conv_weight)

    def _prepare(self, x):
        """Returns the (normalised) input as a map or token sequence, and it flattened to [N, D, L]."""
        if self.work_with_tokens:
            x = x.permute(0, 2, 1)  # [N, T, D] -> [N, D, T]
        if self.normalize_input:
            x = F.normalize(x, p=2, dim=1)  # across the descriptor dimension
        return x, x.reshape(x.shape[0], x.shape[1], -1)

    def _soft_assign(self, x):
        soft_assign = self.conv(x).reshape(x.shape[0], self.clusters_num, -1)
        return F.softmax(soft_assign, dim=1)

    def forward(self, x):
        x, x_flatten = self._prepare(x)
        return functional.vlad_core(x_flatten, self._soft_assign(x), self.centroids)

    def __repr__(self):
        return (f"{self.__class__.__name__}(clusters_num={self.clusters_num}, dim={self.dim}, "
                f"work_with_tokens={self.work_with_tokens})")


class CRNModule(nn.Module):
    """Contextual Reweighting Network (Kim et al., CVPR 2017): a spatial mask from multi-scale context."""

    def __init__(self, dim):
        super().__init__()
        self.downsample_pool = nn.AvgPool2d(kernel_size=3, stride=(2, 2), padding=0, ceil_mode=True)
        # Multiscale context filters
        self.filter_3_3 = nn.Conv2d(in_channels=dim, out_channels=32, kernel_size=(3, 3), padding=1)
        self.filter_5_5 = nn.Conv2d(in_channels=dim, out_channels=32, kernel_size=(5, 5), padding=2)
        self.filter_7_7 = nn.Conv2d(in_channels=dim, out_channels=20, kernel_size=(7, 7), padding=3)
        # Accumulation weight: a fixed sum over the 84 context channels
        self.acc_w = nn.Conv2d(in_channels=84, out_channels=1, kernel_size=(1, 1))
        self._initialize_weights()

    def _initialize_weights(self):
        for conv in (self.filter_3_3, self.filter_5_5, self.filter_7_7):
            nn.init.xavier_normal_(conv.weight)
            nn.init.constant_(conv.bias, 0.0)
        nn.init.constant_(self.acc_w.weight, 1.0)
        nn.init.constant_(self.acc_w.bias, 0.0)
        self.acc_w.weight.requires_grad = False
        self.acc_w.bias.requires_grad = False

    def forward(self, x):
        height, width = x.shape[-2:]
        x = self.downsample_pool(x)
        g = torch.cat((self.filter_3_3(x), self.filter_5_5(x), self.filter_7_7(x)), dim=1)
        g = F.relu(g)
        w = F.relu(self.acc_w(g))
        # The original upsamples by scale_factor=2, which only fits even H and W; asking for (H, W)
        # gives the same values for even sizes (same 0.5 source scale) and also works for odd ones.
        return F.interpolate(w, size=(height, width), mode="bilinear")


class CRN(NetVLAD):
    """NetVLAD whose soft assignment is reweighted by the CRN's spatial mask (same VLAD core)."""

    def __init__(self, clusters_num=64, dim=128, normalize_input=True):
        super().__init__(clusters_num, dim, normalize_input)
        self.crn = CRNModule(dim)

    def forward(self, x):
        x, x_flatten = self._prepare(x)
        mask = self.crn(x)
        soft_assign = self._soft_assign(x) * mask.reshape(x.shape[0], 1, -1)
        return functional.vlad_core(x_flatten, soft_assign, self.centroids)


# ----------------------------------------------------------------------------------------------------------
# Registry

@dataclass(frozen=True)
class AggregationSpec:
    """How to build one --aggregation.

    build(dim, work_with_tokens, clusters_num) -> (module, output_dim)
    families: backbone families it works with ("cnn", "cct", "vit").
    shallow: a plain pooling, wrapped by --l2 as Sequential(L2Norm?, pool, Flatten).
    pooled_input: it takes the backbone's own pooled token (CLS / sequence pooling) instead of a map/tokens.
    """
    build: Callable
    families: FrozenSet[str]
    shallow: bool = False
    pooled_input: bool = False


def _pooling(layer_class):
    def build(dim, work_with_tokens, clusters_num):
        return layer_class(), dim
    return build


def _build_gem(dim, work_with_tokens, clusters_num):
    return GeM(work_with_tokens=work_with_tokens), dim


def _build_netvlad(dim, work_with_tokens, clusters_num):
    layer = NetVLAD(clusters_num=clusters_num, dim=dim, work_with_tokens=work_with_tokens)
    return layer, layer.output_dim


def _build_crn(dim, work_with_tokens, clusters_num):
    layer = CRN(clusters_num=clusters_num, dim=dim)
    return layer, layer.output_dim


def _build_rrm(dim, work_with_tokens, clusters_num):
    return RRM(dim), dim


def _build_identity(dim, work_with_tokens, clusters_num):
    return nn.Identity(), dim


_ALL = frozenset({"cnn", "cct", "vit"})
AGGREGATIONS = {
    "netvlad": AggregationSpec(_build_netvlad, _ALL),
    "gem": AggregationSpec(_build_gem, _ALL, shallow=True),
    "spoc": AggregationSpec(_pooling(SPoC), frozenset({"cnn"}), shallow=True),
    "mac": AggregationSpec(_pooling(MAC), frozenset({"cnn"}), shallow=True),
    "rmac": AggregationSpec(_pooling(RMAC), frozenset({"cnn"}), shallow=True),
    "crn": AggregationSpec(_build_crn, frozenset({"cnn"})),
    "rrm": AggregationSpec(_build_rrm, frozenset({"cnn"})),
    # The backbone does the pooling itself (CLS token or CCT's sequence pooling).
    "cls": AggregationSpec(_build_identity, frozenset({"cct", "vit"}), pooled_input=True),
    "seqpool": AggregationSpec(_build_identity, frozenset({"cct"}), pooled_input=True),
}


def get_aggregation_spec(name):
    if name not in AGGREGATIONS:
        raise ValueError(f"Unknown aggregation '{name}'; valid names: {', '.join(AGGREGATIONS)}")
    return AGGREGATIONS[name]
