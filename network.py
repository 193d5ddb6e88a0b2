"""The geo-localization network (backbone + aggregation [+ FC]) and the one place where flags become modules.

GeoLocalizationNet keeps the original benchmark's module tree, so that its checkpoints load:
  backbone, aggregation; shallow poolings (gem, spoc, mac, rmac) wrapped by --l2 as
  Sequential(L2Norm, pool, Flatten) / Sequential(pool, L2Norm, Flatten) / Sequential(pool, Flatten);
  with --fc_output_dim, Sequential(<that>, Linear, L2Norm).
"""
import logging
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, SubsetRandomSampler

import util
from commons import UserInputError, progress_bar
from model import zoo
from model.aggregation import AGGREGATIONS, L2Norm, Flatten, NetVLAD, get_aggregation_spec
from model.backbones import BACKBONES, get_backbone_spec

# As the original: places / gldv2 weights in data/pretrained_nets/, off-the-shelf ones in data/off_the_shelf_nets/
WEIGHTS_FOLDER = "data"
L2_CHOICES = ("before_pool", "after_pool", "none")


class GeoLocalizationNet(nn.Module):
    """backbone -> aggregation. `features_dim` is the size of the descriptor it returns."""

    def __init__(self, backbone, aggregation, features_dim):
        super().__init__()
        self.backbone = backbone
        self.aggregation = aggregation
        self.features_dim = features_dim

    def forward(self, x):
        x = self.backbone(x)
        return self.aggregation(x)

    def netvlad_layer(self):
        """The NetVLAD (or CRN) layer inside the aggregation, None if there is none."""
        for module in self.aggregation.modules():
            if isinstance(module, NetVLAD):
                return module
        return None


# ----------------------------------------------------------------------------------------------------------
# Checks the parser uses (derived from the registries)

def compatibility_error(backbone, aggregation):
    """None if --backbone and --aggregation work together, else a message saying what to use instead."""
    if backbone not in BACKBONES:
        return f"Unknown --backbone {backbone}; valid names: {', '.join(BACKBONES)}"
    if aggregation not in AGGREGATIONS:
        return f"Unknown --aggregation {aggregation}; valid names: {', '.join(AGGREGATIONS)}"
    family = BACKBONES[backbone].family
    if family in AGGREGATIONS[aggregation].families:
        return None
    usable = [name for name, spec in AGGREGATIONS.items() if family in spec.families]
    return (f"--aggregation {aggregation} does not work with --backbone {backbone}; "
            f"with this backbone use one of: {', '.join(usable)}")


def resize_error(backbone, resize):
    """None if --resize suits the backbone (transformers need fixed square sizes), else a message."""
    allowed = get_backbone_spec(backbone).image_sizes
    if allowed is None or tuple(resize) in allowed:
        return None
    options = " or ".join(f"--resize {h} {w}" for h, w in allowed)
    return f"--backbone {backbone} needs {options}, got --resize {' '.join(map(str, resize))}"


def off_the_shelf_error(off_the_shelf, backbone, aggregation, fc_output_dim):
    """None if the off-the-shelf model (or 'imagenet', meaning none) fits the flags, else a message."""
    if off_the_shelf == "imagenet":
        return None
    if (backbone not in zoo.OFF_THE_SHELF_BACKBONES or aggregation != zoo.OFF_THE_SHELF_AGGREGATION
            or fc_output_dim != zoo.OFF_THE_SHELF_FC_OUTPUT_DIM):
        return (f"--off_the_shelf {off_the_shelf} models are ResNet conv5 + GeM + FC 2048: use --backbone "
                f"{' or '.join(zoo.OFF_THE_SHELF_BACKBONES)} --aggregation {zoo.OFF_THE_SHELF_AGGREGATION} "
                f"--fc_output_dim {zoo.OFF_THE_SHELF_FC_OUTPUT_DIM}")
    return None


# ----------------------------------------------------------------------------------------------------------
# Building

def make_aggregation(aggregation, dim, family, l2, netvlad_clusters, fc_output_dim):
    """The aggregation module (wrapped by --l2 and --fc_output_dim) and the descriptor size it outputs."""
    spec = get_aggregation_spec(aggregation)
    work_with_tokens = family in ("cct", "vit") and not spec.pooled_input
    module, features_dim = spec.build(dim, work_with_tokens, netvlad_clusters)
    if spec.shallow:
        if l2 == "before_pool":
            # On tokens [N, T, D] this normalises across the token axis, not the descriptor one: a quirk
            # of the original, kept so that its CCT/ViT + GeM models give the same descriptors.
            module = nn.Sequential(L2Norm(), module, Flatten())
        elif l2 == "after_pool":
            module = nn.Sequential(module, L2Norm(), Flatten())
        elif l2 == "none":
            module = nn.Sequential(module, Flatten())
        else:
            raise ValueError(f"Unknown --l2 {l2}; valid values: {', '.join(L2_CHOICES)}")
    if fc_output_dim is not None:
        # After NetVLAD / CRN the input is the whole VLAD vector (clusters x dim)
        module = nn.Sequential(module, nn.Linear(features_dim, fc_output_dim), L2Norm())
        features_dim = fc_output_dim
    return module, features_dim


def make_model(backbone, aggregation, *, l2="before_pool", netvlad_clusters=64, fc_output_dim=None,
               pretrain="imagenet", trunc_te=None, freeze_te=None, resize=(480, 640), trusted=False,
               weights_folder=WEIGHTS_FOLDER):
    """GeoLocalizationNet from explicit values (the flags of the same names)."""
    message = compatibility_error(backbone, aggregation) or resize_error(backbone, resize)
    if message:
        raise UserInputError(message)
    backbone_spec = get_backbone_spec(backbone)
    backbone_module, dim = backbone_spec.build(
        pretrain=pretrain, weights_folder=weights_folder, trunc_te=trunc_te, freeze_te=freeze_te,
        image_size=resize[0], pooled_output=get_aggregation_spec(aggregation).pooled_input, trusted=trusted)
    aggregation_module, features_dim = make_aggregation(aggregation, dim, backbone_spec.family, l2,
                                                        netvlad_clusters, fc_output_dim)
    return GeoLocalizationNet(backbone_module, aggregation_module, features_dim)


def build_model(args):
    """GeoLocalizationNet from the flags. Reads backbone, aggregation, l2, netvlad_clusters, fc_output_dim,
    pretrain, off_the_shelf, trunc_te, freeze_te, resize, trust_checkpoint. Does not load --resume.
    """
    off_the_shelf = getattr(args, "off_the_shelf", "imagenet")
    message = off_the_shelf_error(off_the_shelf, args.backbone, args.aggregation, args.fc_output_dim)
    if message:
        raise UserInputError(message)
    # An off-the-shelf model replaces every weight, so there is no point fetching ImageNet ones first
    pretrain = args.pretrain if off_the_shelf == "imagenet" else "none"
    model = make_model(args.backbone, args.aggregation, l2=args.l2, netvlad_clusters=args.netvlad_clusters,
                       fc_output_dim=args.fc_output_dim, pretrain=pretrain, trunc_te=args.trunc_te,
                       freeze_te=args.freeze_te, resize=args.resize,
                       trusted=getattr(args, "trust_checkpoint", False))
    if off_the_shelf != "imagenet":
        util.load_off_the_shelf(model, off_the_shelf, args.backbone, WEIGHTS_FOLDER)
    return model


# ----------------------------------------------------------------------------------------------------------
# NetVLAD initialisation from k-means over local features of training images

def _local_descriptors(outputs, work_with_tokens):
    """Backbone outputs -> L2-normalised local descriptors [N, L, D]."""
    if work_with_tokens:  # tokens [N, T, D]: each token is a local descriptor
        return F.normalize(outputs, p=2, dim=2)
    outputs = F.normalize(outputs, p=2, dim=1)  # [N, D, H, W], across channels
    return outputs.reshape(outputs.shape[0], outputs.shape[1], -1).permute(0, 2, 1)


def initialize_netvlad(netvlad_layer, backbone, images_dataset, device, infer_batch_size, num_workers,
                       descriptors_num=50000, descs_per_image=100):
    """Initialise a NetVLAD / CRN layer's centroids and assignment weights as the original does: faiss
    k-means (100 iterations) on `descriptors_num` local descriptors, `descs_per_image` random ones from each
    of ceil(descriptors_num / descs_per_image) random images of `images_dataset` (items: (image, index)).

    The random draws are the original's (np.random.choice of images, a SubsetRandomSampler, np.random.choice
    per image), so a seeded run samples the same descriptors. With fewer images, or images with fewer local
    descriptors, everything available is used (the original crashes or pads with zeros). On tokens
    (CCT, ViT) each token normalised over its features is a descriptor (the original reshaped the tokens
    into a meaningless layout here).
    """
    import faiss  # imported here: only the initialisation needs it
    images_num = math.ceil(descriptors_num / descs_per_image)
    if len(images_dataset) < images_num:
        logging.info(f"NetVLAD initialisation: only {len(images_dataset)} images available "
                     f"(instead of {images_num}), using all of them")
        images_num = len(images_dataset)
    random_sampler = SubsetRandomSampler(np.random.choice(len(images_dataset), images_num, replace=False))
    random_dl = DataLoader(dataset=images_dataset, num_workers=num_workers, batch_size=infer_batch_size,
                           sampler=random_sampler)
    was_training = backbone.training
    backbone = backbone.eval()
    descriptors = []
    with torch.no_grad():
        logging.debug("Extracting features to initialize NetVLAD layer")
        for inputs, _ in progress_bar(random_dl, "NetVLAD initialisation"):
            outputs = backbone(inputs.to(device))
            image_descriptors = _local_descriptors(outputs, netvlad_layer.work_with_tokens).cpu().numpy()
            locations_num = image_descriptors.shape[1]
            for image_index in range(image_descriptors.shape[0]):
                sample = np.random.choice(locations_num, min(descs_per_image, locations_num), replace=False)
                descriptors.append(image_descriptors[image_index, sample, :])
    backbone.train(was_training)
    descriptors = np.ascontiguousarray(np.concatenate(descriptors), dtype=np.float32)
    if len(descriptors) < descriptors_num:
        logging.info(f"NetVLAD initialisation: {len(descriptors)} local descriptors (instead of {descriptors_num})")
    if len(descriptors) < netvlad_layer.clusters_num:
        raise UserInputError(f"Only {len(descriptors)} local descriptors to initialise {netvlad_layer.clusters_num} "
                             "NetVLAD clusters: use more training images, a larger --resize or fewer "
                             "--netvlad_clusters")
    kmeans = faiss.Kmeans(netvlad_layer.dim, netvlad_layer.clusters_num, niter=100, verbose=False)
    kmeans.train(descriptors)
    logging.debug(f"NetVLAD centroids shape: {kmeans.centroids.shape}")
    netvlad_layer.init_params(kmeans.centroids, descriptors)
    netvlad_layer.to(device)
