"""Each loss against a plain loop written the way the original benchmark computes it."""
import pytest
import torch
import torch.nn.functional as F

from model.losses import LOSSES


def _reference(name, queries, positives, negatives, margin):
    batch_size, negs_num, _ = negatives.shape
    total = 0.0
    if name == "triplet":
        criterion = torch.nn.TripletMarginLoss(margin=margin, p=2, reduction="sum")
        for b in range(batch_size):
            for n in range(negs_num):
                total += criterion(queries[b:b + 1], positives[b:b + 1], negatives[b, n:n + 1])
    elif name == "sare_ind":
        for b in range(batch_size):
            for n in range(negs_num):
                dist_pos = ((queries[b] - positives[b]) ** 2).sum().view(1)
                dist_neg = ((queries[b] - negatives[b, n]) ** 2).sum().view(1)
                total += -F.log_softmax(-torch.cat((dist_pos, dist_neg)), 0)[0]
    elif name == "sare_joint":
        for b in range(batch_size):
            dist_pos = ((queries[b] - positives[b]) ** 2).sum().view(1)
            dist_neg = ((queries[b:b + 1] - negatives[b]) ** 2).sum(1)
            total += -F.log_softmax(-torch.cat((dist_pos, dist_neg)), 0)[0]
    return total / (batch_size * negs_num)


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("batch_size,negs_num", [(1, 1), (4, 10), (3, 7)])
def test_loss_equals_plain_loop(name, batch_size, negs_num):
    generator = torch.Generator().manual_seed(batch_size * 100 + negs_num)
    dim = 16
    queries = F.normalize(torch.randn(batch_size, dim, generator=generator), dim=1)
    positives = F.normalize(torch.randn(batch_size, dim, generator=generator), dim=1)
    negatives = F.normalize(torch.randn(batch_size, negs_num, dim, generator=generator), dim=2)
    margin = 0.1
    got = LOSSES[name](queries, positives, negatives, margin)
    expected = _reference(name, queries, positives, negatives, margin)
    assert torch.allclose(got, expected, atol=1e-6), (got, expected)


def test_triplet_loss_hand_computed():
    # Query at origin, positive at distance 1, negatives at 1.05 and 3: only the first violates margin 0.1.
    queries = torch.zeros(1, 2)
    positives = torch.tensor([[1.0, 0.0]])
    negatives = torch.tensor([[[0.0, 1.05], [3.0, 0.0]]])
    loss = LOSSES["triplet"](queries, positives, negatives, 0.1)
    # pairwise_distance adds eps=1e-6 to the difference, hence the tolerance
    assert loss.item() == pytest.approx((1.0 - 1.05 + 0.1) / 2, abs=1e-5)
