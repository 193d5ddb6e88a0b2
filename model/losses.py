"""Training losses over groups of (query, positive, negatives) descriptors.

Every loss takes queries [B, D], positives [B, D] and negatives [B, N, D] and returns
the summed loss divided by B * N, which is how the original benchmark normalises all three.
"""
import torch
import torch.nn.functional as F


def _squared_distances(queries, positives, negatives):
    """Squared L2 distances query-positive [B] and query-negatives [B, N]."""
    dist_pos = ((queries - positives) ** 2).sum(dim=1)
    dist_neg = ((queries.unsqueeze(1) - negatives) ** 2).sum(dim=2)
    return dist_pos, dist_neg


def triplet_loss(queries, positives, negatives, margin):
    """Sum over every (query, positive, negative_i) of TripletMarginLoss(margin, p=2), over B * N."""
    batch_size, negs_num, dim = negatives.shape
    loss = F.triplet_margin_loss(
        queries.unsqueeze(1).expand(-1, negs_num, -1).reshape(-1, dim),
        positives.unsqueeze(1).expand(-1, negs_num, -1).reshape(-1, dim),
        negatives.reshape(-1, dim),
        margin=margin, p=2, reduction="sum")
    return loss / (batch_size * negs_num)


def sare_ind_loss(queries, positives, negatives, margin=None):
    """SARE, independent form: -log softmax over (positive, negative_i) for each negative separately."""
    dist_pos, dist_neg = _squared_distances(queries, positives, negatives)
    # -log(exp(-dp) / (exp(-dp) + exp(-dn))) == softplus(dp - dn)
    loss = F.softplus(dist_pos.unsqueeze(1) - dist_neg).sum()
    return loss / negatives.shape[0] / negatives.shape[1]


def sare_joint_loss(queries, positives, negatives, margin=None):
    """SARE, joint form: -log softmax of the positive against all the negatives of its query at once."""
    dist_pos, dist_neg = _squared_distances(queries, positives, negatives)
    logits = -torch.cat([dist_pos.unsqueeze(1), dist_neg], dim=1)
    loss = -F.log_softmax(logits, dim=1)[:, 0].sum()
    return loss / negatives.shape[0] / negatives.shape[1]


# --criterion name -> loss(queries, positives, negatives, margin)
LOSSES = {
    "triplet": triplet_loss,
    "sare_ind": sare_ind_loss,
    "sare_joint": sare_joint_loss,
}
