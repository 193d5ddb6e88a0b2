"""NetVLAD and CRN (which reweights NetVLAD's soft assignment; same VLAD core), and NetVLAD's initialisation from
k-means over local features of training images, as the original benchmark does it."""
import logging
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from commons import UserInputError
from model import functional
from model.parts import MAP, TOKENS, Option

OPTIONS = (Option("netvlad_clusters", int, 64, "Number of clusters of NetVLAD / CRN", minimum=1),)
CRN_OPTIONS = OPTIONS + (
    Option("lr_crn_layer", float, 5e-3, "Learning rate of the CRN layer", minimum=0),
    Option("lr_crn_net", float, 5e-4, "Learning rate of the rest of the network when training CRN", minimum=0),
)


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


def build_netvlad(features, options):
    layer = NetVLAD(clusters_num=options["netvlad_clusters"], dim=features.channels,
                    work_with_tokens=features.layout == TOKENS)
    return layer, layer.output_dim


def build_crn(features, options):
    layer = CRN(clusters_num=options["netvlad_clusters"], dim=features.channels)
    return layer, layer.output_dim


def check_crn(args):
    if getattr(args, "resume", None) is None:
        return ("CRN must start from a trained NetVLAD: pass --resume with a NetVLAD (or CRN) checkpoint of the same "
                "backbone")
    return None


def crn_optimizer_groups(model, options):
    """The CRN layer at --lr_crn_layer, the rest of the network at --lr_crn_net."""
    crn_params = [p for n, p in model.aggregation.named_parameters() if ".crn." in f".{n}" and p.requires_grad]
    crn_ids = {id(p) for p in crn_params}
    net_params = [p for p in model.parameters() if p.requires_grad and id(p) not in crn_ids]
    return [{"params": crn_params, "lr": options["lr_crn_layer"]}, {"params": net_params, "lr": options["lr_crn_net"]}]


def crn_hints(missing, unexpected):
    if any(key.startswith("aggregation.crn.") for key in unexpected):
        return ["the checkpoint is a CRN model: use --aggregation crn"]
    return []


def _local_descriptors(outputs, work_with_tokens):
    """Backbone outputs -> L2-normalised local descriptors [N, L, D]."""
    if work_with_tokens:  # tokens [N, T, D]: each token is a local descriptor
        return F.normalize(outputs, p=2, dim=2)
    outputs = F.normalize(outputs, p=2, dim=1)  # [N, D, H, W], across channels
    return outputs.reshape(outputs.shape[0], outputs.shape[1], -1).permute(0, 2, 1)


def initialize(aggregation, backbone_outputs, descriptors_num=50000, descs_per_image=100):
    """Initialise the NetVLAD / CRN layer inside `aggregation` as the original does: faiss k-means (100
    iterations) on `descriptors_num` local descriptors, `descs_per_image` random ones from each of
    ceil(descriptors_num / descs_per_image) random training images. `backbone_outputs(images_num)` yields the
    backbone's outputs for that many random images (fewer when there are fewer), drawn as the original draws them.

    The per-image draws are the original's (np.random.choice), so a seeded run samples the same descriptors. With
    fewer images, or images with fewer local descriptors, everything available is used (the original crashes or
    pads with zeros). On tokens (CCT, ViT) each token normalised over its features is a descriptor.
    """
    import faiss  # imported here: only the initialisation needs it
    layer = next(module for module in aggregation.modules() if isinstance(module, NetVLAD))
    descriptors = []
    for outputs in backbone_outputs(math.ceil(descriptors_num / descs_per_image), "NetVLAD initialisation"):
        image_descriptors = _local_descriptors(outputs, layer.work_with_tokens).cpu().numpy()
        locations_num = image_descriptors.shape[1]
        for image_index in range(image_descriptors.shape[0]):
            sample = np.random.choice(locations_num, min(descs_per_image, locations_num), replace=False)
            descriptors.append(image_descriptors[image_index, sample, :])
    descriptors = np.ascontiguousarray(np.concatenate(descriptors), dtype=np.float32)
    if len(descriptors) < descriptors_num:
        logging.info(f"NetVLAD initialisation: {len(descriptors)} local descriptors (instead of {descriptors_num})")
    if len(descriptors) < layer.clusters_num:
        raise UserInputError(f"Only {len(descriptors)} local descriptors to initialise {layer.clusters_num} NetVLAD "
                             "clusters: use more training images, a larger --resize or fewer --netvlad_clusters")
    kmeans = faiss.Kmeans(layer.dim, layer.clusters_num, niter=100, verbose=False)
    kmeans.train(descriptors)
    logging.debug(f"NetVLAD centroids shape: {kmeans.centroids.shape}")
    layer.init_params(kmeans.centroids, descriptors)


ACCEPTS = (MAP, TOKENS)
