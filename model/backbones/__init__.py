"""Backbones (image -> feature map or tokens) and their registry: one entry per --backbone name.

An entry builds from a model.parts.BackboneRequest and returns (module, model.parts.Features). It declares the
layouts it can output (the aggregation picks one), its --pretrain weights, its own options (argparse flags), the
image sizes it accepts, a check of its options, the key layouts of released checkpoints, and hints that turn a
checkpoint's mismatching keys into flag fixes. To add a backbone: a file like cnn.py or vit.py and one line below.
"""
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

from model.backbones import cct, cnn, dinov2, vit
from model.backbones.encoders import ENCODER_OPTIONS
from model.parts import AnySize, KeyLayout, Option


@dataclass(frozen=True)
class BackboneEntry:
    build: Callable
    layouts: Tuple[str, ...]
    pretrainings: Tuple[str, ...] = ("imagenet", "none")
    options: Tuple[Option, ...] = ()
    sizes: object = AnySize()
    check: Optional[Callable] = None  # options dict -> error message or None
    key_layouts: Tuple[KeyLayout, ...] = ()
    hints: Optional[Callable] = None  # (missing keys, unexpected keys) -> list of flag fixes


def _resnet(depth, cut):
    return BackboneEntry(cnn.resnet(f"resnet{depth}", cut), cnn.LAYOUTS, ("imagenet", "places", "gldv2", "none")
                         if depth != 152 else ("imagenet", "none"), key_layouts=cnn.RESNET_KEY_LAYOUTS,
                         hints=cnn.resnet_hints)


BACKBONES = {
    "alexnet": BackboneEntry(cnn.build_alexnet, cnn.LAYOUTS),
    "vgg16": BackboneEntry(cnn.build_vgg16, cnn.LAYOUTS, ("imagenet", "places", "gldv2", "none")),
    "resnet18conv4": _resnet(18, "conv4"),
    "resnet18conv5": _resnet(18, "conv5"),
    "resnet50conv4": _resnet(50, "conv4"),
    "resnet50conv5": _resnet(50, "conv5"),
    "resnet101conv4": _resnet(101, "conv4"),
    "resnet101conv5": _resnet(101, "conv5"),
    "cct384": BackboneEntry(cct.build, cct.LAYOUTS, options=ENCODER_OPTIONS, sizes=cct.SIZES, check=cct.CHECK,
                            hints=cct.hints),
    "vit": BackboneEntry(vit.build, vit.LAYOUTS, options=ENCODER_OPTIONS, sizes=vit.SIZES, check=vit.CHECK,
                         hints=vit.hints),
    "resnet152conv4": _resnet(152, "conv4"),
    "resnet152conv5": _resnet(152, "conv5"),
    "dinov2_vits14": dinov2.entry("vits14"),
    "dinov2_vitb14": dinov2.entry("vitb14"),
    "dinov2_vitl14": dinov2.entry("vitl14"),
    "dinov2_vitg14": dinov2.entry("vitg14"),
}


def get_backbone(name):
    if name not in BACKBONES:
        raise ValueError(f"Unknown backbone '{name}'; valid names: {', '.join(BACKBONES)}")
    return BACKBONES[name]
