"""Shallow poolings (GeM, SPoC, MAC, R-MAC), the L2 normalisation and Flatten that --l2 wraps them with, and the
identity behind cls / seqpool (the backbone pools itself). Module names as the original benchmark's."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from model import functional
from model.parts import MAP, TOKENS, KeyLayout


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


def pooling(layer_class):
    """Builder of a parameterless pooling of a map."""
    def build(features, options):
        return layer_class(), features.channels
    return build


def build_gem(features, options):
    return GeM(work_with_tokens=features.layout == TOKENS), features.channels


def build_identity(features, options):
    return nn.Identity(), features.channels


MAP_OR_TOKENS = (MAP, TOKENS)
# CosPlace and EigenPlaces: the same layers as gem with --l2 before_pool and --fc_output_dim, numbered as one
# Sequential (L2Norm, GeM, Flatten, Linear, L2Norm)
COSPLACE_LAYOUT = KeyLayout("CosPlace / EigenPlaces", (("aggregation.1.p", "aggregation.0.1.p"),
                                                       ("aggregation.3.", "aggregation.1.")))
