"""The geo-localization network (backbone + aggregation [+ FC]) and the one place where flags become modules.

GeoLocalizationNet keeps the original benchmark's module tree, so that its checkpoints load:
  backbone, aggregation; shallow poolings (gem, spoc, mac, rmac) wrapped by --l2 as
  Sequential(L2Norm, pool, Flatten) / Sequential(pool, L2Norm, Flatten) / Sequential(pool, Flatten);
  with --fc_output_dim, Sequential(<that>, Linear, L2Norm).
The parts come from the registries (model/backbones, model/aggregations); nothing here names one.
"""
import logging
import os

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import SubsetRandomSampler

import checkpoint
import datasets_ws
import util
from commons import UserInputError
from model import zoo
from model.aggregations import AGGREGATIONS, get_aggregation
from model.aggregations.pools import Flatten, L2Norm
from model.backbones import BACKBONES, get_backbone
from model.inference import forward_batches
from model.parts import MAP, MAP_AND_CLASS_TOKEN, BackboneRequest, Features, option_values

# As the original: places / gldv2 weights in data/pretrained_nets/, off-the-shelf ones in data/off_the_shelf_nets/
WEIGHTS_FOLDER = "data"
L2_CHOICES = ("before_pool", "after_pool", "none")


class GeoLocalizationNet(nn.Module):
    """backbone -> aggregation. `features_dim` is the size of the descriptor it returns; `parts` the registry
    names of its backbone and aggregation."""

    def __init__(self, backbone, aggregation, features_dim, parts=None):
        super().__init__()
        self.backbone = backbone
        self.aggregation = aggregation
        self.features_dim = features_dim
        self.parts = parts

    def forward(self, x):
        return self.aggregation(self.backbone(x))


# ----------------------------------------------------------------------------------------------------------
# Checks the parser uses (derived from the registries)

def layout_for(backbone, aggregation):
    """The backbone output the aggregation takes: its first accepted layout the backbone gives, or None."""
    layouts = get_backbone(backbone).layouts
    return next((layout for layout in get_aggregation(aggregation).accepts if layout in layouts), None)


def compatibility_error(backbone, aggregation):
    """None if --backbone and --aggregation work together, else a message saying what to use instead."""
    if backbone not in BACKBONES:
        return f"Unknown --backbone {backbone}; valid names: {', '.join(BACKBONES)}"
    if aggregation not in AGGREGATIONS:
        return f"Unknown --aggregation {aggregation}; valid names: {', '.join(AGGREGATIONS)}"
    if layout_for(backbone, aggregation) is not None:
        return None
    usable = [name for name in AGGREGATIONS if layout_for(backbone, name) is not None]
    return (f"--aggregation {aggregation} does not work with --backbone {backbone}; "
            f"with this backbone use one of: {', '.join(usable)}")


def resize_error(backbone, resize, aggregation=None):
    """None if --resize suits the backbone (fixed sizes, multiples of a patch), else a message. An aggregation
    whose model resizes its input to the patch grid itself (MegaLoc) takes any size."""
    if aggregation in AGGREGATIONS and get_aggregation(aggregation).rounds_input_to_patch:
        return None
    return get_backbone(backbone).sizes.error(backbone, resize)


def pretrain_error(backbone, pretrain):
    available = get_backbone(backbone).pretrainings
    if pretrain in available:
        return None
    return f"--pretrain {pretrain} is not available for --backbone {backbone}; choose one of: {', '.join(available)}"


def options_error(args):
    """The chosen parts' own checks of the flags (e.g. --trunc_te within the depth, CRN needs --resume)."""
    backbone, aggregation = get_backbone(args.backbone), get_aggregation(args.aggregation)
    if backbone.check is not None:
        message = backbone.check(option_values(backbone.options, args))
        if message:
            return message
    return aggregation.check(args) if aggregation.check is not None else None


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

def make_aggregation(aggregation, features, l2="before_pool", fc_output_dim=None, options=None):
    """The aggregation module for the backbone's `features` (model.parts.Features), wrapped by --l2 and
    --fc_output_dim, and the descriptor size it outputs. `options`: the entry's option values (defaults for the
    missing ones)."""
    entry = get_aggregation(aggregation)
    module, features_dim = entry.build(features, option_values(entry.options, options or {}))
    if entry.shallow:
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


def weights_path(source, weights_folder):
    """Where a model.parts.WeightsSource is kept: torch.hub's cache or <weights_folder>/<subfolder>/."""
    folder = util.hub_checkpoints_folder() if source.in_hub_cache else os.path.join(weights_folder, source.subfolder)
    return os.path.join(folder, source.file_name)


def weights_loader(weights_folder, trusted):
    """The `load_weights(module, source, layout=None)` that backbone builders get: fetch the file once (clear
    offline error naming the URL and the path), read it safely, map it by the KeyLayout, load it strictly."""
    def load_weights(module, source, layout=None):
        path = weights_path(source, weights_folder)
        if source.url is not None:
            util.fetch_url(source.url, path, what=source.what)
        else:
            util.fetch_google_drive(source.google_drive_id, path, what=source.what)
        state_dict = checkpoint.load_state_dict_file(path, trusted)
        if layout is not None:
            state_dict = checkpoint.apply_key_layout(state_dict, layout, module.state_dict())
        checkpoint.load_model_weights(module, state_dict, source=source.what)
    return load_weights


def map_size(backbone, resize):
    """(h, w) of the map `backbone` outputs for a `resize` image, from a forward pass on the meta device (shapes
    only, no computation; in eval mode, so that batch norms accept any size); None when it gives no map."""
    tensors = {name: torch.empty_like(value, device="meta")
               for name, value in {**dict(backbone.named_parameters()), **dict(backbone.named_buffers())}.items()}
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            output = torch.func.functional_call(backbone, tensors, (torch.empty(1, 3, *resize, device="meta"),))
    finally:
        backbone.train(was_training)
    output = output[0] if isinstance(output, tuple) else output
    return tuple(output.shape[-2:]) if output.dim() == 4 else None


def make_model(backbone, aggregation, *, l2="before_pool", fc_output_dim=None, pretrain="imagenet",
               resize=(480, 640), trusted=False, weights_folder=WEIGHTS_FOLDER, **options):
    """GeoLocalizationNet from explicit values (the flags of the same names); `options` are the parts' own
    flags (e.g. netvlad_clusters, trunc_te), defaults for those not given."""
    message = (compatibility_error(backbone, aggregation) or resize_error(backbone, resize, aggregation)
               or pretrain_error(backbone, pretrain))
    if message:
        raise UserInputError(message)
    backbone_entry, aggregation_entry = get_backbone(backbone), get_aggregation(aggregation)
    if fc_output_dim is None:
        fc_output_dim = aggregation_entry.default_fc_output_dim
    request = BackboneRequest(backbone, layout_for(backbone, aggregation), pretrain, tuple(resize),
                              option_values(backbone_entry.options, options), weights_loader(weights_folder, trusted),
                              final_norm=aggregation_entry.final_norm,
                              round_input_to_patch=aggregation_entry.rounds_input_to_patch)
    backbone_module, features = backbone_entry.build(request)
    if features.map_size is None and features.layout in (MAP, MAP_AND_CLASS_TOKEN):
        features = Features(features.layout, features.channels, map_size(backbone_module, resize))
    aggregation_module, features_dim = make_aggregation(aggregation, features, l2, fc_output_dim, options)
    return GeoLocalizationNet(backbone_module, aggregation_module, features_dim, parts=(backbone, aggregation))


def build_model(args):
    """GeoLocalizationNet from the flags: backbone, aggregation, l2, fc_output_dim, pretrain, off_the_shelf,
    resize, trust_checkpoint and the parts' own options. Does not load --resume (but knows its weights replace the
    pretrained ones)."""
    off_the_shelf = getattr(args, "off_the_shelf", "imagenet")
    message = off_the_shelf_error(off_the_shelf, args.backbone, args.aggregation, args.fc_output_dim)
    if message:
        raise UserInputError(message)
    options = {**option_values(get_backbone(args.backbone).options, args),
               **option_values(get_aggregation(args.aggregation).options, args)}
    # A checkpoint to resume or an off-the-shelf model replaces every weight (those it may lack are unused ones):
    # no point fetching pretrained ones first
    replaced = off_the_shelf != "imagenet" or getattr(args, "resume", None) is not None
    pretrain = "none" if replaced else args.pretrain
    model = make_model(args.backbone, args.aggregation, l2=args.l2, fc_output_dim=args.fc_output_dim,
                       pretrain=pretrain, resize=args.resize, trusted=getattr(args, "trust_checkpoint", False),
                       **options)
    if off_the_shelf != "imagenet":
        util.load_off_the_shelf(model, off_the_shelf, args.backbone, WEIGHTS_FOLDER)
    return model


# ----------------------------------------------------------------------------------------------------------
# Checkpoints: our layout, the original's, and the released layouts the parts declare

def _entries(model):
    """The registry entries of the model's backbone and aggregation (none for a model assembled by hand)."""
    return (get_backbone(model.parts[0]), get_aggregation(model.parts[1])) if model.parts else ()


def checkpoint_layouts(model):
    """Every combination of the model's backbone and aggregation key layouts (ours first)."""
    backbone_layouts, aggregation_layouts = [(None,) + entry.key_layouts for entry in _entries(model)] or [(None,)] * 2
    return [checkpoint.combine_key_layouts(b, a) for b in backbone_layouts for a in aggregation_layouts]


def mismatch_hints(model):
    """Flag fixes guessed by the model's parts from a checkpoint's missing and unexpected keys."""
    hint_functions = [entry.hints for entry in _entries(model) if entry.hints is not None]
    return lambda missing, unexpected: [hint for hints in hint_functions for hint in hints(missing, unexpected)]


def load_checkpoint_weights(model, state_dict, source):
    """Load a checkpoint's weights into `model`, in our layout or a released one its parts declare; a file that
    fits none is refused, naming its first keys that did not fit and the likely flag fixes."""
    mapped = checkpoint.fit_key_layouts(model.state_dict(), state_dict, checkpoint_layouts(model), source,
                                        mismatch_hints(model))
    model.load_state_dict(mapped, strict=True)


def starts_from_subset(model):
    """Whether the aggregation starts from a checkpoint holding only some of its layers (CRN from NetVLAD)."""
    return any(getattr(entry, "starts_from_subset", False) for entry in _entries(model))


def optimizer_groups(model, args):
    """The aggregation's own parameter groups with their learning rates (CRN), or None."""
    entry = get_aggregation(args.aggregation)
    if entry.optimizer_groups is None:
        return None
    return entry.optimizer_groups(model, option_values(entry.options, args))


# ----------------------------------------------------------------------------------------------------------
# Initialisation of an aggregation from training images (NetVLAD's k-means)

def initialize_aggregation(model, images_dataset, device, batch_size, num_workers, **options):
    """Run the aggregation's initialisation hook (if it has one, with `options`) on backbone outputs of random
    images of `images_dataset` (items: (image, index)): the hook calls backbone_outputs(images_num, description).
    Images are drawn as the original draws them: np.random.choice of the images, then a SubsetRandomSampler."""
    entry = get_aggregation(model.parts[1])
    if entry.initialize is None:
        return

    def backbone_outputs(images_num, description="Initialisation"):
        if len(images_dataset) < images_num:
            logging.info(f"Aggregation initialisation: only {len(images_dataset)} images available (instead of "
                         f"{images_num}), using all of them")
            images_num = len(images_dataset)
        sampler = SubsetRandomSampler(np.random.choice(len(images_dataset), images_num, replace=False))
        loader = datasets_ws.make_loader(images_dataset, batch_size, num_workers, device, sampler=sampler)
        was_training = model.backbone.training
        model.backbone.eval()
        try:
            for outputs, _ in forward_batches(model.backbone, loader, device, description=description):
                yield outputs
        finally:
            model.backbone.train(was_training)
    logging.debug("Extracting features to initialize the aggregation layer")
    entry.initialize(model.aggregation, backbone_outputs, **options)
    model.aggregation.to(device)
