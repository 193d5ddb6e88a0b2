"""What the transformer backbones share: --trunc_te and --freeze_te, with the original's meaning for CCT and ViT
(0 or None change nothing, as the original tests them for truthiness; freeze_te N freezes the whole backbone
but the encoder layers of index > N)."""
import torch.nn as nn

from model.parts import Option

ENCODER_OPTIONS = (
    Option("trunc_te", int, None, "Keep only the first N transformer encoder layers (cct384, vit, dinov2_*)"),
    Option("freeze_te", int, None, "cct384, vit: freeze the backbone but the encoder layers of index > N (the "
                                   "original's meaning); dinov2_*: freeze the patch embedding and the first N "
                                   "blocks (SALAD trains the last 4 of 12: --freeze_te 8)"),
)


def encoder_check(depth, lowest_freeze=-1):
    """The check of --trunc_te and --freeze_te for a backbone of `depth` encoder layers."""
    def check(options):
        trunc_te, freeze_te = options.get("trunc_te"), options.get("freeze_te")
        if trunc_te is not None and not 0 <= trunc_te <= depth:
            return f"--trunc_te must be in 0..{depth} for this backbone ({depth} encoder layers), got {trunc_te}"
        if freeze_te is not None and not lowest_freeze <= freeze_te <= depth:
            return f"--freeze_te must be in {lowest_freeze}..{depth} for this backbone, got {freeze_te}"
        return None
    return check


def depth_hints(prefix, what):
    """The hints of a transformer backbone: --trunc_te fixes guessed from the encoder layers (keys `prefix`<index>.)
    a mismatching checkpoint has more or fewer of."""
    def hints(missing, unexpected):
        def indices(keys):
            return {int(key[len(prefix):].split(".")[0]) for key in keys if key.startswith(prefix)}
        checkpoint_layers, model_layers = indices(unexpected), indices(missing)
        if model_layers and not checkpoint_layers:
            return [f"the checkpoint has {min(model_layers)} {what}: use --trunc_te {min(model_layers)}"]
        if checkpoint_layers and not model_layers:
            return [f"the checkpoint has {max(checkpoint_layers) + 1} {what}: use a larger --trunc_te (or none)"]
        return []
    return hints


def truncate(layers, trunc_te):
    """The first `trunc_te` layers of a ModuleList or Sequential (all of them for None or 0), same type and names."""
    if not trunc_te:
        return layers
    if isinstance(layers, nn.Sequential):
        return nn.Sequential(dict(list(layers.named_children())[:trunc_te]))
    return nn.ModuleList(list(layers)[:trunc_te])


def freeze_encoders(backbone, layers, freeze_te):
    """The original's freezing: with a truthy `freeze_te`, every parameter of `backbone` but those of the
    `layers` whose position is greater than freeze_te."""
    if not freeze_te:
        return
    for parameter in backbone.parameters():
        parameter.requires_grad = False
    for index, layer in enumerate(layers):
        if index > freeze_te:
            for parameter in layer.parameters():
                parameter.requires_grad = True
