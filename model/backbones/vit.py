"""The original benchmark's ViT: Hugging Face transformers' ViTModel (ViT-B/16) written in plain PyTorch with the
same module names, so that the original's ViT checkpoints and the Hugging Face weights load as they are.

Forward (eval): patch embedding (conv 16x16, stride 16), tokens row-major, class token prepended, learned position
embeddings added (no interpolation: only the trained 224x224 or 384x384 inputs); 12 pre-norm blocks
x = x + O(Attn(LN_before(x))), x = x + W2(GELU(W1(LN_after(x)))) with exact GELU and 12 heads of 64; a final
LayerNorm. Every LayerNorm has transformers' eps 1e-12. The pooler is in the state dict but unused, as in the
original, whose wrapper gives netvlad and gem the patch tokens and cls the class token.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from model.backbones.encoders import depth_hints, encoder_check, freeze_encoders, truncate
from model.parts import CLASS_TOKEN, TOKENS, Features, FixedSizes, KeyLayout, WeightsSource

DIM, DEPTH, HEADS, MLP_DIM, PATCH = 768, 12, 12, 3072, 16
LAYER_NORM_EPS = 1e-12
IMAGE_SIZES = (224, 384)
_HUGGING_FACE = "https://huggingface.co/google/{}/resolve/main/pytorch_model.bin"
# The original's ViTModel.from_pretrained weights for each image size
WEIGHTS = {size: WeightsSource(f"the Hugging Face {name} weights", f"{name}.bin", url=_HUGGING_FACE.format(name),
                               in_hub_cache=False, subfolder="pretrained_nets")
           for size, name in ((224, "vit-base-patch16-224-in21k"), (384, "vit-base-patch16-384"))}
# Hugging Face files: ViTModel's keys, or ViTForImageClassification's (under vit., with a classifier and, at 384,
# no pooler: it keeps its initialisation, as transformers does)
HUGGING_FACE_LAYOUT = KeyLayout("Hugging Face ViT", renames=(("vit.", ""),), dropped=("classifier.",),
                                optional=("pooler.",))


class SelfAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.query = nn.Linear(DIM, DIM)
        self.key = nn.Linear(DIM, DIM)
        self.value = nn.Linear(DIM, DIM)

    def forward(self, x):
        batch, tokens, _ = x.shape

        def heads(linear):  # [B, T, D] -> [B, heads, T, 64]
            return linear(x).view(batch, tokens, HEADS, DIM // HEADS).transpose(1, 2)
        context = F.scaled_dot_product_attention(heads(self.query), heads(self.key), heads(self.value))
        return context.transpose(1, 2).reshape(batch, tokens, DIM)


class Dense(nn.Module):
    """transformers' holder of one Linear named `dense`."""

    def __init__(self, in_features, out_features):
        super().__init__()
        self.dense = nn.Linear(in_features, out_features)


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention = SelfAttention()
        self.output = Dense(DIM, DIM)

    def forward(self, x):
        return self.output.dense(self.attention(x))


class Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention = Attention()
        self.intermediate = Dense(DIM, MLP_DIM)
        self.output = Dense(MLP_DIM, DIM)
        self.layernorm_before = nn.LayerNorm(DIM, eps=LAYER_NORM_EPS)
        self.layernorm_after = nn.LayerNorm(DIM, eps=LAYER_NORM_EPS)

    def forward(self, x):
        x = x + self.attention(self.layernorm_before(x))
        return x + self.output.dense(F.gelu(self.intermediate.dense(self.layernorm_after(x))))


class PatchEmbeddings(nn.Module):
    def __init__(self):
        super().__init__()
        self.projection = nn.Conv2d(3, DIM, kernel_size=PATCH, stride=PATCH)


class Embeddings(nn.Module):
    def __init__(self, image_size):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, DIM))
        self.position_embeddings = nn.Parameter(torch.zeros(1, (image_size // PATCH) ** 2 + 1, DIM))
        self.patch_embeddings = PatchEmbeddings()
        for parameter in (self.cls_token, self.position_embeddings):
            nn.init.trunc_normal_(parameter, std=0.02)

    def forward(self, images):
        patches = self.patch_embeddings.projection(images).flatten(2).transpose(1, 2)  # [B, h*w, D], row-major
        if patches.shape[1] + 1 != self.position_embeddings.shape[1]:
            side = round((self.position_embeddings.shape[1] - 1) ** 0.5) * PATCH
            raise ValueError(f"This ViT was built for {side}x{side} images, got {tuple(images.shape[-2:])}; use "
                             f"--resize {side} {side}")
        tokens = torch.cat([self.cls_token.expand(len(patches), -1, -1), patches], dim=1)
        return tokens + self.position_embeddings


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.ModuleList(Layer() for _ in range(DEPTH))


class ViTModel(nn.Module):
    """transformers' ViTModel for ViT-B/16; returns last_hidden_state (after the final LayerNorm) [B, 1 + T, D]."""

    def __init__(self, image_size):
        super().__init__()
        self.embeddings = Embeddings(image_size)
        self.encoder = Encoder()
        self.layernorm = nn.LayerNorm(DIM, eps=LAYER_NORM_EPS)
        self.pooler = Dense(DIM, DIM)  # unused, in the state dict as transformers has it

    def forward(self, images):
        x = self.embeddings(images)
        for layer in self.encoder.layer:
            x = layer(x)
        return self.layernorm(x)


class ViTBackbone(nn.Module):
    """The original's wrapper: patch tokens [B, T, D] (TOKENS) or the class token [B, D] (CLASS_TOKEN)."""

    def __init__(self, image_size, output):
        super().__init__()
        self.vit_model = ViTModel(image_size)
        self.output = output

    def forward(self, images):
        hidden = self.vit_model(images)
        return hidden[:, 0] if self.output == CLASS_TOKEN else hidden[:, 1:]


LAYOUTS = (TOKENS, CLASS_TOKEN)
SIZES = FixedSizes(tuple((size, size) for size in IMAGE_SIZES))
CHECK = encoder_check(DEPTH)
hints = depth_hints("backbone.vit_model.encoder.layer.", "encoder layers")


def build(request):
    size = request.resize[0]
    backbone = ViTBackbone(size, request.layout)
    if request.pretrain == "imagenet":
        request.load_weights(backbone.vit_model, WEIGHTS[size], layout=HUGGING_FACE_LAYOUT)
    backbone.vit_model.encoder.layer = truncate(backbone.vit_model.encoder.layer, request.options["trunc_te"])
    freeze_encoders(backbone, backbone.vit_model.encoder.layer, request.options["freeze_te"])
    return backbone, Features(request.layout, DIM)
