"""fastrdrop.reference against the float64 oracle, against torch's own definitions, and the
reduction mappings that README.md documents."""

import pytest
import torch
import torch.nn.functional as F

from fastrdrop import reference

from inputs import labels, logits_pair
from oracle import oracle_loss


@pytest.mark.parametrize("reduction", ["mean", "sum", "none", "batchmean"])
@pytest.mark.parametrize("has_target", [True, False])
@pytest.mark.parametrize("masked", [0.0, 0.3])
def test_reference_matches_oracle_in_float64(reduction, has_target, masked):
    z1, z2 = logits_pair((3, 4, 257), torch.float64, masked=masked)
    target = labels((3, 4), 257, logits=z1) if has_target else None
    kwargs = dict(alpha=0.8, reduction=reduction, label_smoothing=0.1, softcap=20.0)
    a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    ref = reference.rdrop_loss(a, b, target, **kwargs)
    ref.sum().backward()
    c, d = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    truth = oracle_loss(c, d, target, **kwargs)
    truth.sum().backward()
    torch.testing.assert_close(ref, truth, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(a.grad, c.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(b.grad, d.grad, rtol=1e-9, atol=1e-12)


def test_reference_is_torch_cross_entropy_and_kl_div():
    # Without masked entries: CE is F.cross_entropy's (smoothing included), KL is F.kl_div's.
    z1, z2 = logits_pair((6, 100), torch.float64)
    target = labels((6,), 100, ignored=0.0)
    parts = reference.rdrop_loss(z1, z2, target, reduction="none", label_smoothing=0.2,
                                 return_parts=True)
    for ce, z in ((parts.ce1, z1), (parts.ce2, z2)):
        torch.testing.assert_close(
            ce, F.cross_entropy(z, target, label_smoothing=0.2, reduction="none"))
    logp, logq = F.log_softmax(z1, -1), F.log_softmax(z2, -1)
    kl_pq = F.kl_div(logq, logp, log_target=True, reduction="none").sum(-1)
    kl_qp = F.kl_div(logp, logq, log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(parts.kl, (kl_pq + kl_qp) / 2)


def test_official_rdrop_mapping():
    # The official R-Drop code: 0.5 (CE_1 + CE_2) with mean CE, plus alpha * KL summed over
    # tokens, each direction's KL halved. README.md: two ways to get it from fastrdrop.
    z1, z2 = logits_pair((8, 50), torch.float64)
    target = labels((8,), 50, ignored=0.0)
    alpha = 4.0
    p_loss = F.kl_div(F.log_softmax(z1, -1), F.softmax(z2, -1), reduction="none").sum()
    q_loss = F.kl_div(F.log_softmax(z2, -1), F.softmax(z1, -1), reduction="none").sum()
    official = 0.5 * (F.cross_entropy(z1, target) + F.cross_entropy(z2, target)) + alpha * (
        p_loss + q_loss) / 2

    parts = reference.rdrop_loss(z1, z2, target, reduction="sum", return_parts=True)
    n_tokens = target.numel()
    torch.testing.assert_close(0.5 * (parts.ce1 + parts.ce2) / n_tokens + alpha * parts.kl,
                               official)
    one_call = 0.5 * reference.rdrop_loss(z1, z2, target, alpha=2 * n_tokens * alpha)
    torch.testing.assert_close(one_call, official)


@pytest.mark.parametrize("kl_div_reduction, ours, scale", [
    ("batchmean", "batchmean", 1.0), ("sum", "sum", 1.0), ("mean", "mean", 1 / 50)])
def test_kl_div_reduction_mapping(kl_div_reduction, ours, scale):
    # target=None gives alpha * symKL alone; F.kl_div's reductions map as README.md says.
    z1, z2 = logits_pair((8, 50), torch.float64)
    logp, logq = F.log_softmax(z1, -1), F.log_softmax(z2, -1)
    sym = 0.5 * (F.kl_div(logq, logp, log_target=True, reduction=kl_div_reduction)
                 + F.kl_div(logp, logq, log_target=True, reduction=kl_div_reduction))
    torch.testing.assert_close(reference.rdrop_loss(z1, z2, reduction=ours, alpha=scale), sym)


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # torch's vmap of kl_div
def test_reference_runs_under_torch_func():
    # per-sample gradients, Jacobians and forward mode of the reference, torch.func's transforms,
    # against autograd's results; a row with a NaN logit keeps its NaN gradient row
    z1, z2 = logits_pair((4, 3, 33), torch.float64)
    z1[1, 2, 5] = float("nan")
    target = labels((4, 3), 33)
    target[1, 2] = 7  # counted: an ignored token's rows are never read, NaN or not
    kwargs = dict(alpha=0.7, label_smoothing=0.1)

    def loss(a, b, y):
        return reference.rdrop_loss(a, b, y, **kwargs)

    def autograd_grad(a, b, y):
        a = a.clone().requires_grad_()
        return torch.autograd.grad(loss(a, b, y), a)[0]

    per_sample = torch.func.vmap(torch.func.grad(loss))(z1, z2, target)
    want = torch.stack([autograd_grad(*sample) for sample in zip(z1, z2, target, strict=True)])
    torch.testing.assert_close(per_sample, want, equal_nan=True)
    assert per_sample[1, 2].isnan().all() and not per_sample[0].isnan().any()

    a, b, y = z1[0], z2[0], target[0]
    jacobian = torch.func.jacrev(lambda x: reference.rdrop_loss(x, b, y, reduction="none"))(a)
    rows = [torch.autograd.grad(reference.rdrop_loss(x, b, y, reduction="none")[i], x)[0]
            for i, x in enumerate([a.clone().requires_grad_() for _ in range(len(a))])]
    torch.testing.assert_close(jacobian, torch.stack(rows))
    tangent = torch.randn_like(a)
    _, directional = torch.func.jvp(lambda x: loss(x, b, y), (a,), (tangent,))
    torch.testing.assert_close(directional, (autograd_grad(a, b, y) * tangent).sum())
