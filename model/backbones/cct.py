"""Compact Convolutional Transformer CCT-14/7x2 at 384 px (Hassani et al., SHI-Labs Compact-Transformers).

Written to match the original benchmark's copy of it: same module names (so its checkpoints and the
SHI-Labs ImageNet weights load), no classification head. It outputs what its aggregation takes: the tokens after
the final norm, their sequence pooling (seqpool), or, for cls, the first token. CCT has no class token: the
original's cls returns the top-left patch's token, a quirk kept because its CCT-CLS checkpoints and the paper's
numbers come from it.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from model.backbones.encoders import depth_hints, encoder_check, freeze_encoders, truncate
from model.parts import CLASS_TOKEN, SEQPOOL, TOKENS, Features, FixedSizes, KeyLayout, WeightsSource


def drop_path(x, drop_prob=0.0, training=False):
    """Stochastic depth per sample (only while training)."""
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    random_tensor = keep_prob + torch.rand(shape, dtype=x.dtype, device=x.device)
    random_tensor.floor_()
    return x.div(keep_prob) * random_tensor


class DropPath(nn.Module):
    def __init__(self, drop_prob=None):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        return drop_path(x, self.drop_prob, self.training)


class Attention(nn.Module):
    def __init__(self, dim, num_heads=8, attention_dropout=0.1, projection_dropout=0.1):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // self.num_heads
        self.scale = head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.attn_drop = nn.Dropout(attention_dropout)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(projection_dropout)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = attn.softmax(dim=-1)
        attn = self.attn_drop(attn)
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))


class TransformerEncoderLayer(nn.Module):
    """Pre-norm attention, then a post-norm MLP, as in CCT."""

    def __init__(self, d_model, nhead, dim_feedforward=2048, dropout=0.1, attention_dropout=0.1,
                 drop_path_rate=0.1):
        super().__init__()
        self.pre_norm = nn.LayerNorm(d_model)
        self.self_attn = Attention(dim=d_model, num_heads=nhead, attention_dropout=attention_dropout,
                                   projection_dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.dropout2 = nn.Dropout(dropout)
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()
        self.activation = F.gelu

    def forward(self, src):
        src = src + self.drop_path(self.self_attn(self.pre_norm(src)))
        src = self.norm1(src)
        src2 = self.linear2(self.dropout1(self.activation(self.linear1(src))))
        return src + self.drop_path(self.dropout2(src2))


class Tokenizer(nn.Module):
    """Convolutional tokenizer: n x (conv, ReLU, max pool), then the map flattened to tokens [N, T, D]."""

    def __init__(self, kernel_size, stride, padding, pooling_kernel_size=3, pooling_stride=2,
                 pooling_padding=1, n_conv_layers=1, n_input_channels=3, n_output_channels=64,
                 in_planes=64):
        super().__init__()
        n_filter_list = [n_input_channels] + [in_planes] * (n_conv_layers - 1) + [n_output_channels]
        self.conv_layers = nn.Sequential(*[
            nn.Sequential(
                nn.Conv2d(n_filter_list[i], n_filter_list[i + 1], kernel_size=(kernel_size, kernel_size),
                          stride=(stride, stride), padding=(padding, padding), bias=False),
                nn.ReLU(),
                nn.MaxPool2d(kernel_size=pooling_kernel_size, stride=pooling_stride, padding=pooling_padding))
            for i in range(n_conv_layers)])
        self.flattener = nn.Flatten(2, 3)
        self.apply(self.init_weight)

    def forward(self, x):
        return self.flattener(self.conv_layers(x)).transpose(-2, -1)

    @staticmethod
    def init_weight(m):
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight)


class TransformerClassifier(nn.Module):
    """The encoder of CCT with a learnable positional embedding and sequence pooling (no class token)."""

    def __init__(self, embedding_dim, num_layers, num_heads, mlp_ratio, sequence_length, dropout=0.0,
                 attention_dropout=0.1, stochastic_depth=0.1, output=TOKENS):
        super().__init__()
        dim_feedforward = int(embedding_dim * mlp_ratio)
        self.embedding_dim = embedding_dim
        self.sequence_length = sequence_length
        # TOKENS [N, T, D], SEQPOOL or CLASS_TOKEN [N, D]
        self.output = output
        self.attention_pool = nn.Linear(self.embedding_dim, 1)
        self.positional_emb = nn.Parameter(torch.zeros(1, sequence_length, embedding_dim), requires_grad=True)
        nn.init.trunc_normal_(self.positional_emb, std=0.2)
        self.dropout = nn.Dropout(p=dropout)
        dpr = [x.item() for x in torch.linspace(0, stochastic_depth, num_layers, device="cpu")]
        self.blocks = nn.ModuleList([
            TransformerEncoderLayer(d_model=embedding_dim, nhead=num_heads, dim_feedforward=dim_feedforward,
                                    dropout=dropout, attention_dropout=attention_dropout,
                                    drop_path_rate=dpr[i])
            for i in range(num_layers)])
        self.norm = nn.LayerNorm(embedding_dim)
        self.apply(self.init_weight)

    @staticmethod
    def init_weight(m):
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    def forward(self, x):
        if x.shape[1] != self.positional_emb.shape[1]:
            raise ValueError(f"CCT expects {self.positional_emb.shape[1]} tokens (a 384x384 image), "
                             f"got {x.shape[1]}; use --resize 384 384")
        x = x + self.positional_emb
        x = self.dropout(x)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        if self.output == SEQPOOL:
            return torch.matmul(F.softmax(self.attention_pool(x), dim=1).transpose(-1, -2), x).squeeze(-2)
        if self.output == CLASS_TOKEN:
            return x[:, 0]
        return x


class CCT(nn.Module):
    def __init__(self, img_size=224, embedding_dim=768, n_input_channels=3, n_conv_layers=1, kernel_size=7,
                 stride=2, padding=3, pooling_kernel_size=3, pooling_stride=2, pooling_padding=1,
                 dropout=0.0, attention_dropout=0.1, stochastic_depth=0.1, num_layers=14, num_heads=6,
                 mlp_ratio=4.0, output=TOKENS):
        super().__init__()
        self.tokenizer = Tokenizer(n_input_channels=n_input_channels, n_output_channels=embedding_dim,
                                   kernel_size=kernel_size, stride=stride, padding=padding,
                                   pooling_kernel_size=pooling_kernel_size, pooling_stride=pooling_stride,
                                   pooling_padding=pooling_padding, n_conv_layers=n_conv_layers)
        sequence_length = _tokens_num(img_size, n_conv_layers, kernel_size, stride, padding,
                                      pooling_kernel_size, pooling_stride, pooling_padding)
        self.classifier = TransformerClassifier(
            embedding_dim=embedding_dim, num_layers=num_layers, num_heads=num_heads, mlp_ratio=mlp_ratio,
            sequence_length=sequence_length, dropout=dropout, attention_dropout=attention_dropout,
            stochastic_depth=stochastic_depth, output=output)

    def forward(self, x):
        return self.classifier(self.tokenizer(x))


def _tokens_num(img_size, n_conv_layers, kernel_size, stride, padding, pool_kernel, pool_stride, pool_padding):
    size = img_size
    for _ in range(n_conv_layers):
        size = (size + 2 * padding - kernel_size) // stride + 1
        size = (size + 2 * pool_padding - pool_kernel) // pool_stride + 1
    return size * size


CCT384_IMAGE_SIZE = 384
CCT384_EMBEDDING_DIM = 384
CCT384_LAYERS_NUM = 14


def cct_14_7x2_384(output=TOKENS):
    """CCT-14/7x2 at 384x384: 2 conv layers of kernel 7 (stride 2, padding 3), 14 encoder layers,
    embedding 384, 6 heads, MLP ratio 3; 576 tokens. Randomly initialised (weights are loaded by the caller).
    """
    return CCT(img_size=CCT384_IMAGE_SIZE, embedding_dim=CCT384_EMBEDDING_DIM, n_conv_layers=2, kernel_size=7,
               stride=2, padding=3, num_layers=CCT384_LAYERS_NUM, num_heads=6, mlp_ratio=3,
               output=output)


CCT384_IMAGENET = WeightsSource(
    "the CCT-14/7x2-384 ImageNet weights", "cct_14_7x2_384_imagenet.pth",
    url="https://shi-labs.com/projects/cct/checkpoints/finetuned/cct_14_7x2_384_imagenet.pth")
# The SHI-Labs file holds an ImageNet classification head that the benchmark drops
IMAGENET_LAYOUT = KeyLayout("SHI-Labs CCT", dropped=("classifier.fc.",))
LAYOUTS = (TOKENS, SEQPOOL, CLASS_TOKEN)
SIZES = FixedSizes(((CCT384_IMAGE_SIZE, CCT384_IMAGE_SIZE),))
CHECK = encoder_check(CCT384_LAYERS_NUM)


def build(request):
    """CCT-14/7x2 at 384x384, with the SHI-Labs ImageNet weights (without their classification head)."""
    backbone = cct_14_7x2_384(output=request.layout)
    if request.pretrain == "imagenet":
        request.load_weights(backbone, CCT384_IMAGENET, layout=IMAGENET_LAYOUT)
    blocks = backbone.classifier.blocks
    backbone.classifier.blocks = truncate(blocks, request.options["trunc_te"])
    freeze_encoders(backbone, backbone.classifier.blocks, request.options["freeze_te"])
    return backbone, Features(request.layout, CCT384_EMBEDDING_DIM)


hints = depth_hints("backbone.classifier.blocks.", "transformer encoders")
