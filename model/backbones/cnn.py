"""torchvision CNNs cut and frozen as in the original benchmark: ResNets after conv4 (layer3) or conv5 (layer4),
VGG16 and AlexNet `features` without their last ReLU and max pool."""
import torch.nn as nn
import torchvision

from model import zoo
from model.parts import MAP, Features, KeyLayout, WeightsSource

_TORCHVISION_CNNS = {
    "resnet18": (torchvision.models.resnet18, torchvision.models.ResNet18_Weights.IMAGENET1K_V1),
    "resnet50": (torchvision.models.resnet50, torchvision.models.ResNet50_Weights.IMAGENET1K_V1),
    "resnet101": (torchvision.models.resnet101, torchvision.models.ResNet101_Weights.IMAGENET1K_V1),
    "resnet152": (torchvision.models.resnet152, torchvision.models.ResNet152_Weights.IMAGENET1K_V1),
    "vgg16": (torchvision.models.vgg16, torchvision.models.VGG16_Weights.IMAGENET1K_V1),
    "alexnet": (torchvision.models.alexnet, torchvision.models.AlexNet_Weights.IMAGENET1K_V1),
}
# What every CNN gives: its last convolution's map
LAYOUTS = (MAP,)


def freeze(modules):
    for module in modules:
        for parameter in module.parameters():
            parameter.requires_grad = False


def _last_conv_channels(module):
    return [m for m in module.modules() if isinstance(m, nn.Conv2d)][-1].out_channels


def weights_source(architecture, pretrain):
    """Where `architecture`'s --pretrain weights come from: the original's `pretrained=True` is torchvision's
    IMAGENET1K_V1; places / gldv2 are classifiers of 365 / 512 classes on Google Drive."""
    if pretrain == "imagenet":
        weights = _TORCHVISION_CNNS[architecture][1]
        return WeightsSource(f"torchvision's {weights} weights", weights.url.rsplit("/", 1)[-1], url=weights.url)
    name = f"{architecture}_{pretrain}"
    return WeightsSource(f"the {name} weights", f"{name}.pth", in_hub_cache=False,
                         google_drive_id=zoo.PRETRAINED_NETS_GOOGLE_DRIVE_IDS[name],
                         subfolder=zoo.PRETRAINED_NETS_SUBFOLDER)


def torchvision_classifier(architecture, request):
    """The whole torchvision classifier with the --pretrain weights loaded (random with 'none')."""
    constructor = _TORCHVISION_CNNS[architecture][0]
    if request.pretrain == "none":
        return constructor(weights=None)
    model = constructor(weights=None, num_classes=zoo.PRETRAIN_NUM_CLASSES.get(request.pretrain, 1000))
    request.load_weights(model, weights_source(architecture, request.pretrain))
    return model


def resnet(architecture, cut):
    """Builder of a ResNet cut after layer3 (conv4) or layer4 (conv5); the stem, layer1 and layer2 frozen."""
    def build(request):
        model = torchvision_classifier(architecture, request)
        for name, child in model.named_children():
            if name == "layer3":  # trained from layer3 on
                break
            freeze([child])
        children = list(model.children())  # conv1, bn1, relu, maxpool, layer1..4, avgpool, fc
        backbone = nn.Sequential(*(children[:-3] if cut == "conv4" else children[:-2]))
        return backbone, Features(MAP, _last_conv_channels(backbone))
    return build


def build_vgg16(request):
    """VGG16 features without the last ReLU and max pool (ending at conv5_3); all but the last 5 layers frozen."""
    layers = list(torchvision_classifier("vgg16", request).features.children())[:-2]
    freeze(layers[:-5])
    backbone = nn.Sequential(*layers)
    return backbone, Features(MAP, _last_conv_channels(backbone))


def build_alexnet(request):
    """AlexNet features without the last ReLU and max pool; the first 5 layers frozen."""
    layers = list(torchvision_classifier("alexnet", request).features.children())[:-2]
    freeze(layers[:5])
    backbone = nn.Sequential(*layers)
    return backbone, Features(MAP, _last_conv_channels(backbone))


def resnet_hints(missing, unexpected):
    """Flag fixes guessed from the keys of a checkpoint that does not fit a ResNet."""
    hints = []
    if any(key.startswith("backbone.7.") for key in unexpected):
        hints.append("the checkpoint has a conv5 (layer4) backbone: use a ...conv5 --backbone")
    if any(key.startswith("backbone.7.") for key in missing):
        hints.append("the checkpoint has a conv4 backbone: use a ...conv4 --backbone")
    return hints



# Released checkpoints naming a torchvision ResNet's parts by attribute (MixVPR, Conv-AP: backbone.model.layer1...)
# or by the index of the kept children (BoQ: backbone.net.4...); ours are the kept children's indices
_RESNET_ATTRIBUTES = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
RESNET_KEY_LAYOUTS = (
    KeyLayout("torchvision ResNet attributes", tuple((f"backbone.model.{name}.", f"backbone.{index}.")
                                                     for index, name in enumerate(_RESNET_ATTRIBUTES))),
    KeyLayout("kept ResNet children", (("backbone.net.", "backbone."),)),
)
