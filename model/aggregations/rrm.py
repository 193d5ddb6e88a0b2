"""RRM, the Residual Retrieval Module."""
import torch.nn as nn

from model.aggregations.pools import Flatten, L2Norm


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


def build(features, options):
    return RRM(features.channels), features.channels
