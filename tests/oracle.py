"""The float64 ground truth and the rule every fused result is held to.

The oracle is written from the definitions (softmax, sum p log p/q, smoothed cross entropy), not
with fastrdrop.reference or the kernels' E_p[D] identity, so it checks both. Rule (DESIGN.md 5):

    err(fused, dtype) <= 2 * err(eager torch, same dtype) + atol * scale + FLOOR

for the loss and both gradients, where err is the max abs difference to the oracle, "eager
torch" is fastrdrop.reference run on the same inputs, and scale is max |oracle|. FLOOR is fp32's
rounding of logits of magnitude ~10, for results whose exact value is 0 (V = 1, say).
"""

import torch

# One table of tolerances: atol in units of the largest oracle value. Half-precision gradients are
# rounded to their dtype (about 2^-9 relative for bf16), and so are eager torch's.
ATOL = {torch.float32: 1e-5, torch.bfloat16: 2e-3, torch.float16: 5e-4, torch.float64: 1e-10}
FLOOR = 1e-6


def oracle_loss(logits1, logits2, target=None, *, alpha=1.0, ignore_index=-100, reduction="mean",
                label_smoothing=0.0, softcap=None):
    """R-Drop loss in float64 from the definitions; differentiable (for gradient ground truth)."""
    vocab_size = logits1.shape[-1]
    z1 = logits1.reshape(-1, vocab_size).double()
    z2 = logits2.reshape(-1, vocab_size).double()
    present = ~(torch.isneginf(z1) & torch.isneginf(z2))
    if softcap is not None:
        z1 = torch.where(present, softcap * torch.tanh(z1 / softcap), float("-inf"))
        z2 = torch.where(present, softcap * torch.tanh(z2 / softcap), float("-inf"))
    # log-probabilities over the present entries; set to 0 where absent (p = 0 there), so that
    # neither the values nor the float64 gradients ever see -inf - -inf
    logp = torch.where(present, z1 - torch.logsumexp(z1, -1, keepdim=True), 0.0)
    logq = torch.where(present, z2 - torch.logsumexp(z2, -1, keepdim=True), 0.0)
    p, q = logp.exp() * present, logq.exp() * present
    # KL(p || q) = sum p (log p - log q), and the same the other way round
    kl = ((p * (logp - logq)).sum(-1) + (q * (logq - logp)).sum(-1)) / 2

    if target is None:
        counted = torch.ones_like(kl, dtype=torch.bool)
        ce = torch.zeros_like(kl)
    else:
        y = target.reshape(-1)
        counted = y != ignore_index
        y_safe = torch.where(counted, y, 0)
        # smoothed target: (1 - eps) on y plus eps spread evenly over the row's present entries
        uniform = present.double() / present.sum(-1, keepdim=True)
        one_hot = torch.nn.functional.one_hot(y_safe, vocab_size).double()
        t = (1 - label_smoothing) * one_hot + label_smoothing * uniform
        ce1 = -(t * logp).sum(-1)
        ce2 = -(t * logq).sum(-1)
        ce = ce1 + ce2
    per_token = torch.where(counted, ce + alpha * kl, 0.0)
    if reduction == "none":
        return per_token.reshape(logits1.shape[:-1])
    total = per_token.sum()
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / max(int(counted.sum()), 1)
    return total / max(logits1.shape[0] if logits1.dim() > 1 else 1, 1)  # batchmean; 0 if empty


def loss_and_grads(fn, logits1, logits2, grad_output, **kwargs):
    """fn's loss and its gradients w.r.t. both logits for the upstream gradient grad_output."""
    a = logits1.detach().clone().requires_grad_()
    b = logits2.detach().clone().requires_grad_()
    loss = fn(a, b, **kwargs)
    ga, gb = torch.autograd.grad(loss, (a, b), grad_output.to(loss.dtype))
    return loss.detach(), ga, gb


def max_err(x, truth):
    return (x.double() - truth).abs().max().item() if truth.numel() else 0.0


def native_floor(z1, z2, alpha, upstream, reduction, target=None, ignore_index=-100):
    """The floor for the native kernel's results: it folds E_p[D] into one coefficient per row
    (README, "The math"), so it rounds terms h p D, h = alpha / 2 times the upstream gradient
    and the row's weight, which cancel where the gradient is 0 (V = 1: 1.4e-6 at |D| = 7.5,
    h = 1.6)."""
    if reduction == "mean":
        counted = z1.shape[:-1].numel() if target is None else int((target != ignore_index).sum())
        upstream /= max(counted, 1)
    elif reduction == "batchmean" and z1.dim() > 1:
        upstream /= max(z1.shape[0], 1)
    d = (z1.float() - z2.float()).abs()
    d = d[torch.isfinite(d)]
    largest = d.max().item() if d.numel() else 0.0
    return FLOOR + 2 * torch.finfo(torch.float32).eps * alpha / 2 * upstream * largest


def assert_oracle_rule(fused, eager, truth, dtype, what, extra_roundings=0, floor=FLOOR):
    """err(fused) <= 2 err(eager) + atol * max|truth| + floor, with both errors in the message.
    ``extra_roundings``: roundings to ``dtype`` that fused does and eager does not, each allowed
    half an epsilon of the scale. ``floor``: FLOOR, or more where the fused result rounds terms
    larger than ~10 that cancel (the native kernel's folded E_p[D])."""
    err_fused, err_eager = max_err(fused, truth), max_err(eager, truth)
    scale = truth.abs().max().item() if truth.numel() else 0.0
    bound = 2 * err_eager + ATOL[dtype] * scale + floor
    bound += extra_roundings * torch.finfo(dtype).eps / 2 * scale
    assert err_fused <= bound, (
        f"{what}: err {err_fused:.3g} > 2 * eager err {err_eager:.3g} + atol "
        f"{ATOL[dtype]:.1g} * scale {scale:.3g}")
    assert not torch.isnan(fused).any(), f"{what} has NaN"
