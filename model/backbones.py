"""Backbones (image -> feature map or tokens) and their registry.

Every builder has the same keyword-only signature
    build(pretrain, weights_folder, trunc_te=None, freeze_te=None, image_size=None, pooled_output=False,
          trusted=False)
and returns (module, out_channels), out_channels being the size of each local descriptor (or of the
pooled token). `pretrain` is one of zoo.PRETRAININGS; `weights_folder` is where places / gldv2 weights
live (<weights_folder>/pretrained_nets/); ImageNet weights come from torch.hub's cache (TORCH_HOME).
trunc_te / freeze_te / image_size / pooled_output concern only the transformers; CNNs ignore them.
`trusted` (--trust_checkpoint) allows weight files that need full unpickling.
"""
import collections
import logging
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch
import torch.nn as nn
import torchvision

import util
from commons import UserInputError
from model import zoo
from model.cct import CCT384_EMBEDDING_DIM, CCT384_IMAGE_SIZE, cct_14_7x2_384

def _check_pretrain(backbone_name, pretrain, available):
    if pretrain not in available:
        raise UserInputError(f"--pretrain {pretrain} is not available for --backbone {backbone_name}; "
                             f"choose one of: {', '.join(available)}")


def _last_conv_channels(module):
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    return convs[-1].out_channels


def _freeze(modules):
    for module in modules:
        for parameter in module.parameters():
            parameter.requires_grad = False


# ----------------------------------------------------------------------------------------------------------
# CNNs (torchvision), cut and frozen as in the original

_TORCHVISION_CNNS = {
    "resnet18": (torchvision.models.resnet18, torchvision.models.ResNet18_Weights.IMAGENET1K_V1),
    "resnet50": (torchvision.models.resnet50, torchvision.models.ResNet50_Weights.IMAGENET1K_V1),
    "resnet101": (torchvision.models.resnet101, torchvision.models.ResNet101_Weights.IMAGENET1K_V1),
    "vgg16": (torchvision.models.vgg16, torchvision.models.VGG16_Weights.IMAGENET1K_V1),
    "alexnet": (torchvision.models.alexnet, torchvision.models.AlexNet_Weights.IMAGENET1K_V1),
}


def _torchvision_cnn(architecture, pretrain, weights_folder, trusted):
    """A whole torchvision classifier with the requested weights (the original's `pretrained=True` is
    the IMAGENET1K_V1 weights; places / gldv2 are classifiers with 365 / 512 classes). The weights are
    fetched before building, so that missing ones fail fast."""
    constructor, imagenet_weights = _TORCHVISION_CNNS[architecture]
    if pretrain == "none":
        return constructor(weights=None)
    if pretrain == "imagenet":
        state_dict = util.torchvision_state_dict(imagenet_weights, trusted)
        model = constructor(weights=None)
    else:
        state_dict = util.pretrained_net_state_dict(f"{architecture}_{pretrain}", weights_folder, trusted)
        model = constructor(weights=None, num_classes=zoo.PRETRAIN_NUM_CLASSES[pretrain])
    util.load_model_weights(model, state_dict, source=f"the {architecture} {pretrain} weights")
    return model


def _resnet_builder(architecture, cut):
    """ResNet cut after layer3 (conv4) or layer4 (conv5); the stem, layer1 and layer2 frozen."""
    def build(*, pretrain, weights_folder, trunc_te=None, freeze_te=None, image_size=None, pooled_output=False,
              trusted=False):
        _check_pretrain(f"{architecture}{cut}", pretrain, zoo.PRETRAININGS)
        resnet = _torchvision_cnn(architecture, pretrain, weights_folder, trusted)
        for name, child in resnet.named_children():
            if name == "layer3":  # train from layer3 on
                break
            _freeze([child])
        children = list(resnet.children())  # conv1, bn1, relu, maxpool, layer1..4, avgpool, fc
        layers = children[:-3] if cut == "conv4" else children[:-2]
        backbone = nn.Sequential(*layers)
        return backbone, _last_conv_channels(backbone)
    return build


def _build_vgg16(*, pretrain, weights_folder, trunc_te=None, freeze_te=None, image_size=None, pooled_output=False,
                 trusted=False):
    """VGG16 features without the last ReLU and max pool; all but the last 5 of those layers frozen."""
    _check_pretrain("vgg16", pretrain, zoo.PRETRAININGS)
    layers = list(_torchvision_cnn("vgg16", pretrain, weights_folder, trusted).features.children())[:-2]
    _freeze(layers[:-5])
    backbone = nn.Sequential(*layers)
    return backbone, _last_conv_channels(backbone)


def _build_alexnet(*, pretrain, weights_folder, trunc_te=None, freeze_te=None, image_size=None,
                   pooled_output=False, trusted=False):
    """AlexNet features without the last ReLU and max pool; the first 5 layers frozen."""
    _check_pretrain("alexnet", pretrain, ("imagenet", "none"))
    layers = list(_torchvision_cnn("alexnet", pretrain, weights_folder, trusted).features.children())[:-2]
    _freeze(layers[:5])
    backbone = nn.Sequential(*layers)
    return backbone, _last_conv_channels(backbone)


# ----------------------------------------------------------------------------------------------------------
# Transformers. As in the original, trunc_te / freeze_te of None or 0 change nothing (it tests them for
# truthiness); freeze_te N freezes everything but the encoders with index > N.

def _build_cct384(*, pretrain, weights_folder, trunc_te=None, freeze_te=None, image_size=None,
                  pooled_output=False, trusted=False):
    """CCT-14/7x2 at 384x384; returns tokens [N, 576, 384], or the sequence-pooled vector [N, 384]
    when `pooled_output` (aggregations cls and seqpool)."""
    _check_pretrain("cct384", pretrain, ("imagenet", "none"))
    state_dict = util.cct384_imagenet_state_dict(trusted) if pretrain == "imagenet" else None
    backbone = cct_14_7x2_384(pooled_output=pooled_output)
    if state_dict is not None:
        util.load_model_weights(backbone, state_dict, source="the CCT ImageNet weights")
    classifier = backbone.classifier
    if trunc_te:
        logging.debug(f"Truncate CCT at transformer encoder {trunc_te}")
        classifier.blocks = nn.ModuleList(list(classifier.blocks.children())[:trunc_te])
    if freeze_te:
        logging.debug(f"Freeze all the layers up to transformer encoder {freeze_te}")
        _freeze([backbone])
        for name, child in classifier.blocks.named_children():
            if int(name) > freeze_te:
                for parameter in child.parameters():
                    parameter.requires_grad = True
    return backbone, CCT384_EMBEDDING_DIM


class ViTBackbone(nn.Module):
    """torchvision's ViT-B/16 without its head; returns the CLS token [N, 768] when `pooled_output`
    (aggregation cls), else the patch tokens without the CLS token [N, T, 768]."""

    def __init__(self, vit, pooled_output):
        super().__init__()
        self.vit = vit
        self.pooled_output = pooled_output

    def forward(self, x):
        x = self.vit._process_input(x)  # patches -> [N, T, D] (checks the image size)
        class_token = self.vit.class_token.expand(x.shape[0], -1, -1)
        x = self.vit.encoder(torch.cat([class_token, x], dim=1))  # positional embedding, encoders, final LayerNorm
        return x[:, 0] if self.pooled_output else x[:, 1:]


VIT_IMAGE_SIZES = (224, 384)
# ImageNet weights per image size: the original's Hugging Face models are replaced by torchvision's
_VIT_IMAGENET_WEIGHTS = {224: torchvision.models.ViT_B_16_Weights.IMAGENET1K_V1,
                         384: torchvision.models.ViT_B_16_Weights.IMAGENET1K_SWAG_E2E_V1}


def _build_vit(*, pretrain, weights_folder, trunc_te=None, freeze_te=None, image_size=None, pooled_output=False,
               trusted=False):
    _check_pretrain("vit", pretrain, ("imagenet", "none"))
    if image_size not in VIT_IMAGE_SIZES:
        raise UserInputError(f"ViT needs square images of {' or '.join(map(str, VIT_IMAGE_SIZES))} pixels, "
                             f"got {image_size}; use --resize 224 224 or --resize 384 384")
    state_dict = util.torchvision_state_dict(_VIT_IMAGENET_WEIGHTS[image_size], trusted) \
        if pretrain == "imagenet" else None
    vit = torchvision.models.vit_b_16(weights=None, image_size=image_size)
    if state_dict is not None:
        util.load_model_weights(vit, state_dict, source="the ViT ImageNet weights")
    vit.heads = nn.Sequential()  # no classification head
    encoder_layers = vit.encoder.layers  # Sequential of encoder_layer_0, encoder_layer_1...
    if trunc_te:
        logging.debug(f"Truncate ViT at transformer encoder {trunc_te}")
        vit.encoder.layers = nn.Sequential(collections.OrderedDict(list(encoder_layers.named_children())[:trunc_te]))
    if freeze_te:
        logging.debug(f"Freeze all the layers up to transformer encoder {freeze_te}")
        _freeze([vit])
        for name, child in vit.encoder.layers.named_children():
            if int(name.rsplit("_", 1)[1]) > freeze_te:
                for parameter in child.parameters():
                    parameter.requires_grad = True
    return ViTBackbone(vit, pooled_output), vit.hidden_dim


# ----------------------------------------------------------------------------------------------------------
# Registry

@dataclass(frozen=True)
class BackboneSpec:
    """build: see the module docstring. family: "cnn", "cct" or "vit" (decides the aggregations it
    supports). image_sizes: the only (H, W) it accepts for --resize, or None for any size."""
    build: Callable
    family: str
    image_sizes: Optional[Tuple[Tuple[int, int], ...]] = None

    @property
    def yields_tokens(self):
        return self.family in ("cct", "vit")


BACKBONES = {
    "alexnet": BackboneSpec(_build_alexnet, "cnn"),
    "vgg16": BackboneSpec(_build_vgg16, "cnn"),
    "resnet18conv4": BackboneSpec(_resnet_builder("resnet18", "conv4"), "cnn"),
    "resnet18conv5": BackboneSpec(_resnet_builder("resnet18", "conv5"), "cnn"),
    "resnet50conv4": BackboneSpec(_resnet_builder("resnet50", "conv4"), "cnn"),
    "resnet50conv5": BackboneSpec(_resnet_builder("resnet50", "conv5"), "cnn"),
    "resnet101conv4": BackboneSpec(_resnet_builder("resnet101", "conv4"), "cnn"),
    "resnet101conv5": BackboneSpec(_resnet_builder("resnet101", "conv5"), "cnn"),
    "cct384": BackboneSpec(_build_cct384, "cct", image_sizes=((CCT384_IMAGE_SIZE, CCT384_IMAGE_SIZE),)),
    "vit": BackboneSpec(_build_vit, "vit", image_sizes=tuple((size, size) for size in VIT_IMAGE_SIZES)),
}


def get_backbone_spec(name):
    if name not in BACKBONES:
        raise ValueError(f"Unknown backbone '{name}'; valid names: {', '.join(BACKBONES)}")
    return BACKBONES[name]
