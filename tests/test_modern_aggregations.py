"""MixVPR, Conv-AP, BoQ, SALAD and MegaLoc's aggregator: each forward against a plain re-statement of the
specification's formulas (random weights, odd and even maps, batches of 1 and 3), descriptor sizes and norms, the
released checkpoints' aggregator keys mapped onto ours, the --help groups, and the clear errors."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import network
from checkpoint import apply_key_layout
from commons import UserInputError
from model import functional
from model.aggregations import AGGREGATIONS
from model.parts import MAP, MAP_AND_CLASS_TOKEN, Features

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS_FOLDER = os.path.join(REPO, "tests", "data", "methods_keys")
BATCHES_AND_MAPS = [(1, (4, 6)), (3, (5, 7)), (3, (6, 6)), (1, (5, 5))]
# The layers in float32, and again in float64, against float64 references
ATOL = {torch.float32: 1e-5, torch.float64: 1e-10}
MAX_DIFFS = {}  # the largest difference each check measured (printed with -s)


def randomize(module, seed, scale=0.5):
    """Every parameter of `module` drawn from N(0, scale^2), so that no layer is near an identity or a zero."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)
    return module.eval()


def weights(module):
    return {name: value.detach().double() for name, value in module.state_dict().items()}


def record(name, ours, reference):
    difference = (ours.double() - reference).abs().max().item()
    key = f"{name} {str(ours.dtype).split('.')[-1]}"
    MAX_DIFFS[key] = max(MAX_DIFFS.get(key, 0.0), difference)
    print(f"{key}: max |difference| {difference:.3g}")
    assert difference < ATOL[ours.dtype], (key, difference)


def check_forward(name, module, inputs, reference):
    """`module` on `inputs` in float32, then in float64, against `reference` (float64); unit descriptors."""
    with torch.no_grad():
        ours = module(inputs)
        assert_unit_rows(ours)
        record(name, ours, reference)
        inputs = tuple(x.double() for x in inputs) if isinstance(inputs, tuple) else inputs.double()
        record(name, module.double()(inputs), reference)
    return ours


def assert_unit_rows(descriptors):
    assert torch.allclose(descriptors.norm(dim=1), torch.ones(len(descriptors)), atol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# Plain re-statements of the formulas (float64, no call into the modules' code)

def ref_l2(x):
    return x / torch.sqrt((x ** 2).sum(-1, keepdim=True)).clamp(min=1e-12)


def ref_layer_norm(x, weight, bias, eps=1e-5):
    mean = x.mean(-1, keepdim=True)
    variance = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(variance + eps) * weight + bias


def ref_linear(x, weight, bias):
    return x @ weight.T + bias


def ref_conv1x1(x, weight, bias):
    """[B, C, h, w] -> [B, O, h, w] with weight [O, C, 1, 1]."""
    return torch.einsum("oc,bchw->bohw", weight[:, :, 0, 0], x) + bias[None, :, None, None]


def ref_softmax(x):
    e = torch.exp(x - x.max(-1, keepdim=True).values)
    return e / e.sum(-1, keepdim=True)


def ref_attention(query, key, value, w, prefix, heads):
    """Multi-head attention as the spec words it: in_proj rows 0..E-1 / E..2E-1 / 2E..3E-1 project query / key /
    value, heads of consecutive channels, softmax(Q K^T / sqrt(d)) V per head, concatenation, out_proj."""
    in_weight, in_bias = w[prefix + "in_proj_weight"], w[prefix + "in_proj_bias"]
    width = query.shape[-1]
    q = ref_linear(query, in_weight[:width], in_bias[:width])
    k = ref_linear(key, in_weight[width:2 * width], in_bias[width:2 * width])
    v = ref_linear(value, in_weight[2 * width:], in_bias[2 * width:])
    head_width = width // heads
    out = torch.empty_like(q)
    for head in range(heads):
        cols = slice(head * head_width, (head + 1) * head_width)
        attention = ref_softmax(q[..., cols] @ k[..., cols].transpose(-1, -2) / math.sqrt(head_width))
        out[..., cols] = attention @ v[..., cols]
    return ref_linear(out, w[prefix + "out_proj.weight"], w[prefix + "out_proj.bias"])


def ref_mixvpr(x, w, depth):
    batch, channels = x.shape[:2]
    tokens = x.reshape(batch, channels, -1)  # index row * w + col
    for i in range(depth):
        p = f"mix.{i}.mix."
        y = ref_layer_norm(tokens, w[p + "0.weight"], w[p + "0.bias"])
        y = ref_linear(torch.relu(ref_linear(y, w[p + "1.weight"], w[p + "1.bias"])), w[p + "3.weight"],
                       w[p + "3.bias"])
        tokens = tokens + y
    projected = ref_linear(tokens.transpose(1, 2), w["channel_proj.weight"], w["channel_proj.bias"])  # [B, hw, C']
    rows = ref_linear(projected.transpose(1, 2), w["row_proj.weight"], w["row_proj.bias"])  # [B, C', R]
    out_channels, out_rows = rows.shape[1:]
    flat = torch.stack([torch.stack([rows[b, c, r] for c in range(out_channels) for r in range(out_rows)])
                        for b in range(batch)])
    return ref_l2(flat)


def ref_convap(x, w, s1, s2):
    y = ref_conv1x1(x, w["channel_pool.weight"], w["channel_pool.bias"])
    batch, channels, h, width = y.shape
    cells = {}
    for i in range(s1):
        rows = range(math.floor(i * h / s1), math.ceil((i + 1) * h / s1))
        for j in range(s2):
            cols = range(math.floor(j * width / s2), math.ceil((j + 1) * width / s2))
            cells[i, j] = sum(y[:, :, r, c] for r in rows for c in cols) / (len(rows) * len(cols))
    flat = torch.stack([cells[i, j][:, c] for c in range(channels) for i in range(s1) for j in range(s2)], dim=1)
    return ref_l2(flat)


def ref_boq(x, w, layers, heads):
    batch, _, h, width = x.shape
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1))
    kernel = w["proj_c.weight"]
    y = sum(torch.einsum("oc,bchw->bohw", kernel[:, :, dy, dx], padded[:, :, dy:dy + h, dx:dx + width])
            for dy in range(3) for dx in range(3)) + w["proj_c.bias"][None, :, None, None]
    tokens = ref_layer_norm(y.reshape(batch, y.shape[1], -1).transpose(1, 2), w["norm_input.weight"],
                            w["norm_input.bias"])
    outputs = []
    for layer in range(layers):
        p = f"boqs.{layer}."
        e = p + "encoder."
        x1 = ref_layer_norm(tokens + ref_attention(tokens, tokens, tokens, w, e + "self_attn.", heads),
                            w[e + "norm1.weight"], w[e + "norm1.bias"])
        ffn = ref_linear(torch.relu(ref_linear(x1, w[e + "linear1.weight"], w[e + "linear1.bias"])),
                         w[e + "linear2.weight"], w[e + "linear2.bias"])
        tokens = ref_layer_norm(x1 + ffn, w[e + "norm2.weight"], w[e + "norm2.bias"])
        q0 = w[p + "queries"].expand(batch, -1, -1)
        q = ref_layer_norm(q0 + ref_attention(q0, q0, q0, w, p + "self_attn.", heads), w[p + "norm_q.weight"],
                           w[p + "norm_q.bias"])
        out = ref_attention(q, tokens, tokens, w, p + "cross_attn.", heads)  # no residual
        outputs.append(ref_layer_norm(out, w[p + "norm_out.weight"], w[p + "norm_out.bias"]))
    stacked = torch.cat(outputs, dim=1)  # [B, L*Q, E], block 0 first
    rows = ref_linear(stacked.transpose(1, 2), w["fc.weight"], w["fc.bias"])  # [B, E, R]
    return ref_l2(rows.reshape(batch, -1))  # index e * R + r


def ref_sinkhorn(scores, dustbin, iterations=3):
    """The spec's log-domain Sinkhorn with a dustbin for one image, element by element in float64: scores [m, n]
    -> P [m + 1, n] (dustbin row last), times n + m. The marginals' constants are float32 tensors made from
    math.log, as the authors build them."""
    m, n = scores.shape
    z = [[float(scores[i, j]) for j in range(n)] for i in range(m)] + [[float(dustbin)] * n]
    norm = torch.tensor(-math.log(n + m), dtype=torch.float32)
    a = [norm.item()] * m + [(norm + math.log(n - m)).item()]
    b = [norm.item()] * n
    u, v = [0.0] * (m + 1), [0.0] * n

    def logsumexp(values):
        top = max(values)
        return top + math.log(sum(math.exp(value - top) for value in values))
    for _ in range(iterations):
        u = [a[i] - logsumexp([z[i][j] + v[j] for j in range(n)]) for i in range(m + 1)]
        v = [b[j] - logsumexp([z[i][j] + u[i] for i in range(m + 1)]) for j in range(n)]
    return torch.tensor([[math.exp(z[i][j] + u[i] + v[j] - norm.item()) for j in range(n)]
                         for i in range(m + 1)], dtype=torch.float64)


def ref_salad(feature_map, token, w, prefix=""):
    def mlp(x, name, conv):
        first, second = (w[f"{prefix}{name}.0.weight"], w[f"{prefix}{name}.0.bias"]), \
            (w[f"{prefix}{name}.{2 if not conv else 3}.weight"], w[f"{prefix}{name}.{2 if not conv else 3}.bias"])
        if conv:
            return ref_conv1x1(torch.relu(ref_conv1x1(x, *first)), *second)
        return ref_linear(torch.relu(ref_linear(x, *first)), *second)
    batch = feature_map.shape[0]
    f = mlp(feature_map, "cluster_features", True).reshape(batch, -1, feature_map.shape[2] * feature_map.shape[3])
    scores = mlp(feature_map, "score", True).reshape(batch, -1, f.shape[2])
    t = mlp(token, "token_features", False)
    descriptors = []
    for b in range(batch):
        p = ref_sinkhorn(scores[b], w[prefix + "dust_bin"])[:-1]  # [m, n], dustbin dropped
        cluster_dim, clusters = f.shape[1], p.shape[0]
        v = torch.tensor([[sum(f[b, c, j] * p[k, j] for j in range(f.shape[2])) for k in range(clusters)]
                          for c in range(cluster_dim)], dtype=torch.float64)  # [l, m]
        v = v / torch.sqrt((v ** 2).sum(0, keepdim=True)).clamp(min=1e-12)  # each cluster over its channels
        flat = [v[c, k] for c in range(cluster_dim) for k in range(clusters)]  # channel-major
        descriptors.append(ref_l2(torch.cat((ref_l2(t[b]), torch.stack(flat)))))
    return torch.stack(descriptors)


def build(name, features, **options):
    entry = AGGREGATIONS[name]
    return network.make_aggregation(name, features, fc_output_dim=options.pop("fc_output_dim",
                                                                             entry.default_fc_output_dim),
                                    options=options)


# ----------------------------------------------------------------------------------------------------------
# Forwards against the references

@pytest.mark.parametrize("batch,map_size", BATCHES_AND_MAPS)
def test_mixvpr_forward_is_the_spec(batch, map_size):
    channels, depth = 6, 2
    module, dim = build("mixvpr", Features(MAP, channels, map_size), mixvpr_out_channels=5, mixvpr_out_rows=3,
                        mixvpr_mix_depth=depth, mixvpr_mlp_ratio=2)
    assert dim == 15
    randomize(module, 0)
    x = torch.randn(batch, channels, *map_size)
    ours = check_forward("mixvpr", module, x, ref_mixvpr(x.double(), weights(module), depth))
    assert ours.shape == (batch, dim)


def test_mixvpr_training_initialisation():
    module, _ = build("mixvpr", Features(MAP, 8, (10, 10)), mixvpr_out_channels=4, mixvpr_mix_depth=3)
    mixer_linears = [layer for name, layer in module.named_modules() if name.startswith("mix.")
                     and isinstance(layer, nn.Linear)]
    assert len(mixer_linears) == 6
    for layer in mixer_linears:  # truncated normal std 0.02 (PyTorch's default cut at +-2), zero bias
        assert layer.weight.abs().max() <= 2 and 0.015 < layer.weight.std() < 0.025
        assert torch.all(layer.bias == 0)
    with torch.no_grad():  # the projections keep PyTorch's defaults (uniform within 1/sqrt(fan_in))
        assert module.channel_proj.weight.abs().max() <= 1 / math.sqrt(8)
        assert module.row_proj.weight.abs().max() <= 1 / math.sqrt(100)


@pytest.mark.parametrize("batch,map_size", BATCHES_AND_MAPS)
@pytest.mark.parametrize("pool", [(2, 2), (3, 2)])
def test_convap_forward_is_the_spec(batch, map_size, pool):
    channels = 5
    module, dim = build("convap", Features(MAP, channels, map_size), convap_out_channels=4, convap_pool=pool)
    assert dim == 4 * pool[0] * pool[1]
    randomize(module, 1)
    x = torch.randn(batch, channels, *map_size)
    check_forward("convap", module, x, ref_convap(x.double(), weights(module), *pool))


def test_convap_odd_map_shares_its_middle_row():
    """h = 5, two cells: rows 0..2 and 2..4, so changing row 2 moves both cells and changing row 0 only the
    first."""
    module, _ = build("convap", Features(MAP, 3, (5, 4)), convap_out_channels=2)
    randomize(module, 2)

    def pooled(x):
        return module.AAP(module.channel_pool(x))
    x = torch.randn(1, 3, 5, 4)
    with torch.no_grad():
        base = pooled(x)
        for row, moved in ((2, {0, 1}), (0, {0}), (4, {1})):
            changed = x.clone()
            changed[:, :, row] += 1.0
            difference = (pooled(changed) - base).abs().amax(dim=(0, 1, 3))
            assert {i for i in range(2) if difference[i] > 1e-6} == moved, row


@pytest.mark.parametrize("batch,map_size", BATCHES_AND_MAPS)
def test_boq_forward_is_the_spec(batch, map_size):
    channels, width, queries, layers, rows = 7, 128, 5, 2, 3
    module, dim = build("boq", Features(MAP, channels, map_size), boq_proj_channels=width, boq_queries=queries,
                        boq_layers=layers, boq_row_dim=rows)
    assert dim == width * rows
    assert module.boqs[0].self_attn.num_heads == width // 64 == 2
    randomize(module, 3, scale=0.2)
    x = torch.randn(batch, channels, *map_size)
    ours = check_forward("boq", module, x, ref_boq(x.double(), weights(module), layers, heads=2))
    assert isinstance(ours, torch.Tensor) and ours.shape == (batch, dim)  # the descriptor only, no attention maps


def test_boq_queries_ignore_the_image_and_the_encoder_output_feeds_the_next_block():
    """Block 0's queries after norm_q are the same for every image; changing block 0's cross-attention changes only
    the first half of the query axis before fc (block 1 reads the encoder's output, not block 0's queries)."""
    module, _ = build("boq", Features(MAP, 4, (3, 3)), boq_proj_channels=64, boq_queries=3, boq_layers=2,
                      boq_row_dim=2)
    randomize(module, 4, scale=0.2)
    fc_inputs, queries = [], []
    module.fc.register_forward_hook(lambda layer, inputs, output: fc_inputs.append(inputs[0].clone()))
    module.boqs[0].norm_q.register_forward_hook(lambda layer, inputs, output: queries.append(output.clone()))
    x = torch.randn(2, 4, 3, 3)
    with torch.no_grad():
        module(x)
        # (a shift or a scale would not pass norm_out)
        module.boqs[0].cross_attn.out_proj.weight += torch.randn(64, 64) * 0.1
        module(x)
    assert torch.equal(queries[0][0], queries[0][1])
    before, after = fc_inputs  # [B, E, L*Q]
    assert torch.equal(before[..., 3:], after[..., 3:]) and not torch.allclose(before[..., :3], after[..., :3])


@pytest.mark.parametrize("batch,map_size", [(1, (3, 4)), (3, (5, 7)), (2, (4, 4))])
def test_sinkhorn_is_the_spec_and_columns_sum_to_one(batch, map_size):
    clusters, n = 6, map_size[0] * map_size[1]
    generator = torch.Generator().manual_seed(5)
    scores = torch.randn(batch, clusters, n, generator=generator) * 3
    dustbin = torch.tensor(0.7)
    log_p = functional.log_optimal_transport(scores, dustbin, iterations=3)
    assert log_p.shape == (batch, clusters + 1, n) and log_p.dtype == torch.float32
    p = torch.exp(log_p)
    p_double = torch.exp(functional.log_optimal_transport(scores.double(), dustbin.double(), iterations=3))
    for b in range(batch):
        reference = ref_sinkhorn(scores[b], dustbin)
        assert torch.allclose(reference.sum(0), torch.ones(n, dtype=torch.float64), atol=1e-12)
        record("sinkhorn", p[b], reference)
        record("sinkhorn", p_double[b], reference)
    assert torch.allclose(p.sum(1), torch.ones(batch, n), atol=1e-5)  # every column of the full matrix
    assert torch.allclose(p_double.sum(1), torch.ones(batch, n, dtype=torch.float64), atol=1e-12)
    with pytest.raises(ValueError, match="more local features than clusters"):
        functional.log_optimal_transport(torch.randn(1, 6, 6), dustbin)


@pytest.mark.parametrize("batch,map_size", BATCHES_AND_MAPS)
def test_salad_forward_is_the_spec(batch, map_size):
    channels, clusters, cluster_dim, token_dim = 6, 5, 3, 4
    module, dim = build("salad", Features(MAP_AND_CLASS_TOKEN, channels, map_size), salad_clusters=clusters,
                        salad_cluster_dim=cluster_dim, salad_token_dim=token_dim)
    assert dim == token_dim + clusters * cluster_dim
    randomize(module, 6)
    feature_map, token = torch.randn(batch, channels, *map_size), torch.randn(batch, channels)
    check_forward("salad", module, (feature_map, token), ref_salad(feature_map.double(), token.double(),
                                                                   weights(module)))


def test_salad_flattening_is_token_first_then_channel_major():
    """With one-hot cluster features the cluster part's layout is visible: channel c of cluster k sits at
    token_dim + c * clusters + k."""
    channels, clusters, cluster_dim, token_dim = 4, 3, 2, 5
    module, _ = build("salad", Features(MAP_AND_CLASS_TOKEN, channels, (3, 3)), salad_clusters=clusters,
                      salad_cluster_dim=cluster_dim, salad_token_dim=token_dim)
    randomize(module, 7)
    with torch.no_grad():  # channel 0 of every patch's feature is 1, channel 1 is 0
        module.cluster_features[3].weight.zero_()
        module.cluster_features[3].bias.copy_(torch.tensor([1.0, 0.0]))
        out = module((torch.randn(1, channels, 3, 3), torch.randn(1, channels)))[0]
    cluster_part = out[token_dim:]
    # Each cluster's vector is (1, 0) after intra-normalisation, then the whole vector is scaled by one factor
    assert torch.all(cluster_part[:clusters] > 0) and torch.all(cluster_part[clusters:] == 0)
    assert torch.allclose(cluster_part[:clusters], cluster_part[0].expand(clusters))
    token_part = out[:token_dim]
    assert torch.allclose(token_part.norm() / cluster_part[0], torch.tensor(1.0), atol=1e-6)


def test_salad_dropout_is_one_shared_instance_and_identity_in_eval():
    module, _ = build("salad", Features(MAP_AND_CLASS_TOKEN, 4, (3, 3)), salad_clusters=2)
    assert module.cluster_features[1] is module.score[1] and isinstance(module.score[1], nn.Dropout)
    assert module.score[1].p == 0.3
    assert list(module.state_dict())[:3] == ["dust_bin", "token_features.0.weight", "token_features.0.bias"]
    assert module.dust_bin.shape == () and module.dust_bin.item() == 1.0
    inputs = (torch.randn(2, 4, 3, 3), torch.randn(2, 4))
    module.eval()
    with torch.no_grad():
        assert torch.equal(module(inputs), module(inputs))


@pytest.mark.parametrize("batch,map_size", [(1, (4, 6)), (3, (5, 5))])
def test_megaloc_aggregator_is_the_spec(batch, map_size):
    """SALAD with its own cluster width, then the generic --fc_output_dim Linear and L2 norm."""
    channels, clusters, cluster_dim, token_dim, out_dim = 6, 4, 5, 3, 7
    module, dim = build("megaloc", Features(MAP_AND_CLASS_TOKEN, channels, map_size), salad_clusters=clusters,
                        salad_cluster_dim=cluster_dim, salad_token_dim=token_dim, fc_output_dim=out_dim)
    assert dim == out_dim
    assert module[1].in_features == token_dim + clusters * cluster_dim
    randomize(module, 8)
    feature_map, token = torch.randn(batch, channels, *map_size), torch.randn(batch, channels)
    w = weights(module)
    reference = ref_l2(ref_linear(ref_salad(feature_map.double(), token.double(), w, prefix="0."), w["1.weight"],
                                  w["1.bias"]))
    check_forward("megaloc", module, (feature_map, token), reference)


# ----------------------------------------------------------------------------------------------------------
# Declarations, sizes, released keys

def test_entries_declare_what_the_methods_need():
    assert {name: AGGREGATIONS[name].accepts for name in ("mixvpr", "convap", "boq", "salad", "megaloc")} == \
        {"mixvpr": (MAP,), "convap": (MAP,), "boq": (MAP,), "salad": (MAP_AND_CLASS_TOKEN,),
         "megaloc": (MAP_AND_CLASS_TOKEN,)}
    assert AGGREGATIONS["boq"].final_norm is False
    assert all(AGGREGATIONS[name].final_norm for name in ("mixvpr", "convap", "salad", "megaloc"))
    assert AGGREGATIONS["megaloc"].rounds_input_to_patch and not AGGREGATIONS["salad"].rounds_input_to_patch
    assert AGGREGATIONS["megaloc"].default_fc_output_dim == 8448 and AGGREGATIONS["salad"].default_fc_output_dim is None
    defaults = {name: {option.name: option.default for option in AGGREGATIONS[name].options}
                for name in ("mixvpr", "convap", "boq", "salad", "megaloc")}
    assert defaults == {
        "mixvpr": {"mixvpr_out_channels": 1024, "mixvpr_out_rows": 4, "mixvpr_mix_depth": 4, "mixvpr_mlp_ratio": 1},
        "convap": {"convap_out_channels": 2048, "convap_pool": (2, 2)},
        "boq": {"boq_proj_channels": 384, "boq_queries": 64, "boq_layers": 2, "boq_row_dim": 32},
        "salad": {"salad_clusters": 64, "salad_cluster_dim": 128, "salad_token_dim": 256},
        "megaloc": {"salad_clusters": 64, "salad_cluster_dim": 256, "salad_token_dim": 256},
    }
    options = [option for name in defaults for option in AGGREGATIONS[name].options]
    assert all(option.minimum == (64 if option.name == "boq_proj_channels" else 1) for option in options)


@pytest.mark.parametrize("name,features,dim", [
    ("mixvpr", Features(MAP, 1024, (20, 20)), 4096),
    ("convap", Features(MAP, 2048, (10, 10)), 8192),
    ("boq", Features(MAP, 768, (23, 23)), 12288),
    ("salad", Features(MAP_AND_CLASS_TOKEN, 768, (23, 23)), 8448),
    ("megaloc", Features(MAP_AND_CLASS_TOKEN, 768, (23, 23)), 8448),
])
def test_default_descriptor_sizes(name, features, dim):
    with torch.device("meta"):  # sizes only: no memory for MegaLoc's 16640 x 8448 matrix
        module, features_dim = build(name, features)
    assert features_dim == dim
    if name == "megaloc":
        assert (module[1].in_features, module[1].out_features) == (16640, 8448)


def released_aggregators(family):
    """[(file name, {aggregator key: shape})] of tests/data/methods_keys/<family>.json."""
    with open(os.path.join(KEYS_FOLDER, f"{family}.json")) as file:
        releases = json.load(file)
    return [(file_name, {key: shape for key, shape in keys.items() if key.startswith("aggregator.")})
            for file_name, keys in releases.items()]


def options_of_release(family, keys):
    """(Features, options, descriptor size) of our aggregation for a release, read from its shapes."""
    if family == "mixvpr":
        out_channels, channels = keys["aggregator.channel_proj.weight"]
        rows, hw = keys["aggregator.row_proj.weight"]
        side = math.isqrt(hw)
        depth = len({key.split(".")[2] for key in keys if key.startswith("aggregator.mix.")})
        return Features(MAP, channels, (side, side)), dict(
            mixvpr_out_channels=out_channels, mixvpr_out_rows=rows, mixvpr_mix_depth=depth,
            mixvpr_mlp_ratio=keys["aggregator.mix.0.mix.1.weight"][0] // hw), out_channels * rows
    if family == "convap":
        out_channels, channels = keys["aggregator.channel_pool.weight"][:2]
        return Features(MAP, channels, (10, 10)), dict(convap_out_channels=out_channels), out_channels * 4
    if family == "boq":
        width, channels = keys["aggregator.proj_c.weight"][:2]
        rows, stacked = keys["aggregator.fc.weight"]
        layers = len({key.split(".")[2] for key in keys if key.startswith("aggregator.boqs.")})
        return Features(MAP, channels, (23, 23)), dict(
            boq_proj_channels=width, boq_queries=keys["aggregator.boqs.0.queries"][1], boq_layers=layers,
            boq_row_dim=rows), width * rows
    prefix = "aggregator.agg." if family == "megaloc" else "aggregator."
    channels = keys[prefix + "token_features.0.weight"][1]
    options = dict(salad_clusters=keys[prefix + "score.3.weight"][0],
                   salad_cluster_dim=keys[prefix + "cluster_features.3.weight"][0],
                   salad_token_dim=keys[prefix + "token_features.2.weight"][0])
    dim = options["salad_token_dim"] + options["salad_clusters"] * options["salad_cluster_dim"]
    if family == "megaloc":
        options["fc_output_dim"] = dim = keys["aggregator.linear.weight"][0]
    return Features(MAP_AND_CLASS_TOKEN, channels, (23, 23)), options, dim


RELEASED_DIMS = {"mixvpr": [4096, 512, 128], "convap": [8192, 4096, 2048, 512], "boq": [16384, 12288],
                 "salad": [8448], "megaloc": [8448, 8448]}


@pytest.mark.parametrize("family", ["mixvpr", "convap", "boq", "salad", "megaloc"])
def test_released_aggregator_keys_map_onto_ours(family):
    """Each release's `aggregator.*` keys, through the entry's KeyLayout and the network's layout search, equal
    our `aggregation.*` keys and shapes (in the same order) and load strictly."""
    releases = released_aggregators(family)
    assert [options_of_release(family, keys)[2] for _, keys in releases] == RELEASED_DIMS[family]
    for file_name, keys in releases:
        features, options, dim = options_of_release(family, keys)
        with torch.device("meta"):
            module, features_dim = build(family, features, **options)
        assert features_dim == dim, file_name
        ours = {f"aggregation.{key}": list(value.shape) for key, value in module.state_dict().items()}
        layouts = AGGREGATIONS[family].key_layouts
        assert len(layouts) == 1
        mapped = apply_key_layout(keys, layouts[0], ours)
        assert list(mapped.items()) == list(ours.items()), file_name
        # The loading path: every combination of backbone and aggregation layouts, then a strict load
        model = network.GeoLocalizationNet(nn.Identity(), module, features_dim, parts=("resnet50conv4", family))
        state_dict = {key: torch.empty(shape, device="meta") for key, shape in keys.items()}
        network.load_checkpoint_weights(model, state_dict, source=file_name)
        if family != "megaloc":  # small enough for real random tensors on the CPU
            cpu_module, _ = build(family, features, **options)
            generator = torch.Generator().manual_seed(9)
            values = {key: torch.randn(shape, generator=generator) for key, shape in keys.items()}
            cpu_model = network.GeoLocalizationNet(nn.Identity(), cpu_module, features_dim, parts=("resnet50conv4",
                                                                                                     family))
            network.load_checkpoint_weights(cpu_model, values, source=file_name)
            loaded = cpu_module.state_dict()
            assert all(torch.equal(loaded[key[len("aggregator."):]], value) for key, value in values.items())


# ----------------------------------------------------------------------------------------------------------
# --help and errors

def test_help_shows_the_flags_under_their_aggregations():
    result = subprocess.run([sys.executable, "eval.py", "--help"], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    sections, title = {}, None
    for line in result.stdout.splitlines():
        if line and not line.startswith(" ") and line.endswith(":"):
            title = line[:-1]
        elif title is not None:
            sections.setdefault(title, []).append(line)
    expected = {
        "--aggregation mixvpr": ["--mixvpr_out_channels", "--mixvpr_out_rows", "--mixvpr_mix_depth",
                                 "--mixvpr_mlp_ratio"],
        "--aggregation convap": ["--convap_out_channels", "--convap_pool H W"],
        "--aggregation boq": ["--boq_proj_channels", "--boq_queries", "--boq_layers", "--boq_row_dim"],
        "--aggregation salad, megaloc": ["--salad_clusters", "--salad_cluster_dim", "--salad_token_dim"],
    }
    for title, flags in expected.items():
        assert title in sections, (title, list(sections))
        text = " ".join(" ".join(sections[title]).split())  # whatever the wrapping width
        for flag in flags:
            assert f" {flag} " in f" {text} ", (title, flag)
    assert "128 with salad, 256 with megaloc" in " ".join(" ".join(sections["--aggregation salad, megaloc"]).split())
    for name in ("mixvpr", "convap", "boq", "salad", "megaloc"):
        assert name in result.stdout


@pytest.mark.parametrize("name", ["salad", "megaloc"])
def test_salad_with_too_few_patches_is_a_clear_error(name):
    with pytest.raises(UserInputError) as error:
        build(name, Features(MAP_AND_CLASS_TOKEN, 8, (8, 8)))
    message = str(error.value)
    assert "64 clusters" in message and "8x8 = 64 patches" in message
    assert "--resize 126 126" in message and "9x9" in message and "at most 63" in message
    build(name, Features(MAP_AND_CLASS_TOKEN, 8, (5, 13)), salad_cluster_dim=2, salad_token_dim=2,
          fc_output_dim=None)  # 65 patches are enough


def test_mixvpr_without_a_map_size_is_a_clear_error():
    with pytest.raises(UserInputError, match="mixvpr sizes its layers by the backbone's map"):
        build("mixvpr", Features(MAP, 8))
    module, _ = build("mixvpr", Features(MAP, 8, (4, 4)), mixvpr_out_channels=2)
    with pytest.raises(ValueError, match="built for 4x4 maps"):
        module(torch.randn(1, 8, 2, 8))


def test_boq_width_must_split_into_heads():
    with pytest.raises(UserInputError, match="boq_proj_channels"):
        build("boq", Features(MAP, 8, (3, 3)), boq_proj_channels=200)  # 3 heads do not divide 200
    build("boq", Features(MAP, 8, (3, 3)), boq_proj_channels=100, boq_queries=2)  # 1 head of 100, as the authors
