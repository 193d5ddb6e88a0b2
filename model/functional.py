"""Pure tensor functions behind the aggregation layers (GeM, R-MAC, the VLAD core)."""
import math

import torch
import torch.nn.functional as F


def gem(x, p=3, eps=1e-6, work_with_tokens=False):
    """Generalised-mean pooling of a [N, D, H, W] map, or of tokens [N, T, D] when `work_with_tokens`.

    On tokens the result is [N, D, 1, 1] (pooled over T), so the same Flatten works after it.
    """
    if work_with_tokens:
        x = x.permute(0, 2, 1)
        return F.avg_pool1d(x.clamp(min=eps).pow(p), x.size(-1)).pow(1.0 / p).unsqueeze(3)
    return F.avg_pool2d(x.clamp(min=eps).pow(p), (x.size(-2), x.size(-1))).pow(1.0 / p)


def spoc(x):
    """Sum-pooling of convolutions (an average over the whole map): [N, D, H, W] -> [N, D, 1, 1]."""
    return F.avg_pool2d(x, (x.size(-2), x.size(-1)))


def mac(x):
    """Maximum activation of convolutions: [N, D, H, W] -> [N, D, 1, 1]."""
    return F.max_pool2d(x, (x.size(-2), x.size(-1)))


def rmac(x, L=3, eps=1e-6):
    """Regional MAC (Tolias et al.), as Radenovic's cnnimageretrieval-pytorch computes it.

    The region grid is computed with float32 tensors on purpose, so that the region corners are
    exactly those of the reference implementation. Returns [N, D, 1, 1] (not L2-normalised).
    """
    ovr = 0.4  # desired overlap of neighbouring regions
    steps = torch.Tensor([2, 3, 4, 5, 6, 7])  # possible numbers of regions along the long side
    W = x.size(3)
    H = x.size(2)
    w = min(W, H)
    b = (max(H, W) - w) / (steps - 1)
    _, idx = torch.min(torch.abs(((w ** 2 - w * b) / w ** 2) - ovr), 0)  # regions along the long side
    # extra regions along the long dimension
    Wd = 0
    Hd = 0
    if H < W:
        Wd = idx.item() + 1
    elif H > W:
        Hd = idx.item() + 1

    v = F.max_pool2d(x, (x.size(-2), x.size(-1)))
    v = v / (torch.norm(v, p=2, dim=1, keepdim=True) + eps).expand_as(v)

    for level in range(1, L + 1):
        wl = math.floor(2 * w / (level + 1))
        wl2 = math.floor(wl / 2 - 1)
        b = 0 if level + Wd == 1 else (W - wl) / (level + Wd - 1)
        cenW = torch.floor(wl2 + torch.Tensor(range(level - 1 + Wd + 1)) * b) - wl2  # region corners
        b = 0 if level + Hd == 1 else (H - wl) / (level + Hd - 1)
        cenH = torch.floor(wl2 + torch.Tensor(range(level - 1 + Hd + 1)) * b) - wl2
        for i_ in cenH.tolist():
            for j_ in cenW.tolist():
                if wl == 0:
                    continue
                region = x[:, :, int(i_):int(i_) + wl, int(j_):int(j_) + wl]
                vt = F.max_pool2d(region, (region.size(-2), region.size(-1)))
                vt = vt / (torch.norm(vt, p=2, dim=1, keepdim=True) + eps).expand_as(vt)
                v = v + vt
    return v


def vlad_core(x_flatten, soft_assign, centroids):
    """Aggregate residuals to the centroids, in one pass of matrix products.

    x_flatten: [N, D, L] local descriptors; soft_assign: [N, K, L] (weights, already softmaxed and
    possibly reweighted); centroids: [K, D]. Returns the intra-normalised, flattened and
    L2-normalised VLAD vector [N, K * D].
    sum_l a[k, l] * (x[:, l] - c[k]) == (a @ x^T)[k] - c[k] * sum_l a[k, l]
    """
    vlad = torch.bmm(soft_assign, x_flatten.transpose(1, 2))  # [N, K, D]
    vlad = vlad - centroids.unsqueeze(0) * soft_assign.sum(dim=2, keepdim=True)
    vlad = F.normalize(vlad, p=2, dim=2)  # intra-normalisation
    vlad = vlad.reshape(vlad.shape[0], -1)
    return F.normalize(vlad, p=2, dim=1)


def log_optimal_transport(scores, dustbin, iterations=3):
    """SALAD's optimal-transport assignment of n local features to m clusters and a dustbin, by log-domain Sinkhorn
    (regularisation 1) exactly as serizba/salad computes it.

    scores: [B, m, n]; dustbin: a scalar tensor filling the extra row m. Log-marginals: -log(n+m) for each cluster
    row and each column, log(n-m) - log(n+m) for the dustbin row (so n must exceed m), built as float32 tensors from
    math.log; each of the `iterations` updates the rows, then the columns. Returns log P + log(n+m), [B, m+1, n]:
    after the last (column) update every column of its exp sums to 1.
    """
    batch_size, m, n = scores.shape
    if n <= m:
        raise ValueError(f"The optimal transport needs more local features than clusters, got {n} for {m}")
    z = torch.cat((scores, dustbin.to(scores.dtype).expand(batch_size, 1, n)), dim=1)
    norm = -torch.tensor(math.log(n + m), dtype=torch.float32, device=scores.device)
    log_a = norm.expand(m + 1).clone()
    log_a[-1] = log_a[-1] + math.log(n - m)  # the dustbin takes the mass the clusters leave
    log_a, log_b = log_a.expand(batch_size, -1), norm.expand(batch_size, n)
    u, v = torch.zeros_like(log_a), torch.zeros_like(log_b)
    for _ in range(iterations):
        u = log_a - torch.logsumexp(z + v.unsqueeze(1), dim=2)
        v = log_b - torch.logsumexp(z + u.unsqueeze(2), dim=1)
    return z + u.unsqueeze(2) + v.unsqueeze(1) - norm
