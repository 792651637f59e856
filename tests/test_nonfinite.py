"""What every backend does with values that are not finite, and with logits far from 0.

The policy (DESIGN.md section 3, README "Values that are not finite"), per counted token:

- NaN or +inf anywhere in its two rows: its loss is NaN (a row with +inf has no softmax: inf - inf);
- -inf in one pass only: that entry has probability 0 on one side, so the KL is +inf; a label on an
  entry of probability 0 has an infinite cross entropy: the loss is +inf;
- a token whose loss is not finite has NaN gradient rows, both of them, every entry;
- a row with no present entry (-inf in both passes everywhere) and no target: loss 0, gradient 0;
- every other token is untouched: the same loss and gradients as with finite values there;
- an ignored token's rows are never read: loss 0 and gradient 0, whatever they hold.
"""

import functools

import pytest
import torch

import fastrdrop

from conftest import DEVICE, fused_backends
from inputs import labels, logits_pair
from oracle import assert_oracle_rule, loss_and_grads, oracle_loss

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
NAN, INF = float("nan"), float("inf")
BACKENDS = [*fused_backends(), "torch"]
# (backend, in place): the reference has no in-place mode
MODES = [pytest.param(*p.values, inplace, marks=p.marks, id=f"{p.values[0]}-{mode}")
         for p in fused_backends() for inplace, mode in ((False, "default"), (True, "inplace"))]
MODES.append(pytest.param("torch", False, id="torch-default"))


def run(backend, inplace, stacked, z1, z2, target, **kwargs):
    """Per-token loss and the gradients of both logits, through rdrop_loss or, stacked, through
    stacked_rdrop_loss on one [2N, V] tensor."""
    a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    keywords = dict(reduction="none", backend=backend, inplace_backward=inplace, **kwargs)
    if stacked:
        loss = fastrdrop.stacked_rdrop_loss(torch.cat([a, b]), target, **keywords)
    else:
        loss = fastrdrop.rdrop_loss(a * 1, b * 1, target, **keywords)
    return (loss.detach(), *torch.autograd.grad(loss.sum(), (a, b)))


# Row 0 of each case holds the values; (expected loss of that token, what the reference gives).
CASES = {
    "nan in one pass": (lambda z1, z2, y: z1[0].__setitem__(3, NAN), NAN),
    "+inf in one pass": (lambda z1, z2, y: z2[0].__setitem__(5, INF), NAN),
    "+inf in both": (lambda z1, z2, y: (z1[0].__setitem__(5, INF), z2[0].__setitem__(5, INF)),
                     NAN),
    "-inf in one pass": (lambda z1, z2, y: z1[0].__setitem__(int(y[0]) ^ 1, -INF), INF),
    "-inf on the label": (lambda z1, z2, y: z2[0].__setitem__(int(y[0]), -INF), INF),
    "label on an absent entry": (
        lambda z1, z2, y: (z1[0].__setitem__(int(y[0]), -INF), z2[0].__setitem__(int(y[0]), -INF)),
        INF),
    "nothing present": (lambda z1, z2, y: (z1[0].fill_(-INF), z2[0].fill_(-INF)), INF),
    # the other pass's logit so far below its maximum that exp underflows: still probability
    # 0 on one side only, +inf (the kernels once summed it away and gave a finite KL)
    "-inf in one pass, far below in the other": (
        lambda z1, z2, y: (z1[0].__setitem__(7, -INF), z2[0].__setitem__(7, z2[0].max() - 300)),
        INF),
}


@pytest.mark.parametrize(("backend", "inplace"), MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("stacked", [False, True], ids=["pair", "stacked"])
@pytest.mark.parametrize("case", list(CASES))
def test_a_token_that_is_not_finite_touches_nothing_else(case, stacked, dtype, backend, inplace):
    make, expected = CASES[case]
    z1, z2 = logits_pair((4, 40), dtype)
    target = labels((4,), 40, ignored=0.0)
    target[2] = -100
    dirty1, dirty2 = z1.clone(), z2.clone()
    make(dirty1, dirty2, target)
    got = run(backend, inplace, stacked, dirty1, dirty2, target, label_smoothing=0.1)
    clean = run(backend, inplace, stacked, z1, z2, target, label_smoothing=0.1)
    loss, grads = got[0], got[1:]
    if expected != expected:
        assert torch.isnan(loss[0]), (case, loss)
    else:
        assert loss[0].item() == expected, (case, loss)
    for grad in grads:
        assert torch.isnan(grad[0]).all(), (case, grad[0])
        assert torch.equal(grad[2], torch.zeros_like(grad[2]))  # the ignored token
    for g, c in zip(got, clean, strict=True):
        assert torch.equal(g[1:], c[1:]), case  # the other tokens, bit for bit


@pytest.mark.parametrize(("backend", "inplace"), MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("stacked", [False, True], ids=["pair", "stacked"])
def test_nothing_present_without_target_is_zero(backend, inplace, dtype, stacked):
    # symKL of a row with no present entry is the empty sum: 0, and so is its gradient
    z1, z2 = logits_pair((3, 40), dtype)
    z1[1], z2[1] = -INF, -INF
    loss, *grads = run(backend, inplace, stacked, z1, z2, None)
    assert loss[1].item() == 0.0 and torch.isfinite(loss).all()
    for grad in grads:
        assert torch.equal(grad[1], torch.zeros_like(grad[1]))
        assert torch.isfinite(grad).all()


def assert_fp32_oracle_rule(backend, z1, z2, keywords, label=""):
    """The oracle rule in fp32 for the loss and both gradients, with an upstream gradient of 1.3."""
    grad_output = torch.tensor(1.3, device=DEVICE)
    fused = loss_and_grads(functools.partial(fastrdrop.rdrop_loss, backend=backend, **keywords),
                           z1, z2, grad_output)
    eager = loss_and_grads(functools.partial(fastrdrop.reference.rdrop_loss, **keywords),
                           z1, z2, grad_output)
    truth = loss_and_grads(functools.partial(oracle_loss, **keywords), z1.double(), z2.double(),
                           grad_output)
    for what, f, e, t in zip(("loss", "dlogits1", "dlogits2"), fused, eager, truth, strict=True):
        assert_oracle_rule(f, e, t, torch.float32, label + what)


@pytest.mark.parametrize(("backend", "inplace"), MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("stacked", [False, True], ids=["pair", "stacked"])
def test_ignored_tokens_are_never_read(backend, inplace, dtype, stacked):
    # an ignored token is loss 0 and gradient 0 whatever its rows hold, and the other tokens are
    # the same as with finite values there
    z1, z2 = logits_pair((5, 300), dtype)
    target = labels((5,), 300, ignored=0.0)
    target[1] = target[3] = -100
    dirty1, dirty2 = z1.clone(), z2.clone()
    dirty1[1], dirty2[1, 7] = NAN, NAN
    dirty1[3, 5], dirty2[3] = INF, -INF
    for got, clean in zip(run(backend, inplace, stacked, dirty1, dirty2, target,
                              label_smoothing=0.1),
                          run(backend, inplace, stacked, z1, z2, target, label_smoothing=0.1),
                          strict=True):
        assert torch.equal(got[[1, 3]], torch.zeros_like(got[[1, 3]]))
        assert torch.equal(got, clean)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("offset", [1e3, 1e4])
def test_large_logits_keep_fp32_accuracy(backend, offset, label_smoothing):
    # Rows of randn * 2 + C: a log-sum-exp of ~C rounded to fp32 is off by C * 2^-24, which would
    # cost p that much relative accuracy; kept as two terms it costs nothing.
    z1, z2 = logits_pair((6, 3000), torch.float32, spread=2.0)
    z1, z2 = z1 + offset, z2 + offset
    target = labels((6,), 3000, ignored=0.0)
    keywords = dict(target=target, label_smoothing=label_smoothing, alpha=0.7)
    assert_fp32_oracle_rule(backend, z1, z2, keywords, f"C={offset:g} ")


# Finite logits whose differences D = z1 - z2, or D times alpha / 2, overflow fp32 where p = q = 0:
# 0 * D is still 0. Exact gradients: 0.
@pytest.mark.parametrize("backend, inplace", MODES[:-1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("entries", [1, 2])
def test_differences_past_the_float_range(backend, inplace, dtype, entries):
    # the last entry's D = -4e38 is past fp32's range itself
    z1 = torch.tensor([[3e38] + [1e38] * entries + [-2e38]], dtype=dtype, device=DEVICE)
    z2 = torch.tensor([[3e38] + [-2e38] * entries + [2e38]], dtype=dtype, device=DEVICE)
    z1, z2 = z1.requires_grad_(), z2.requires_grad_()
    loss = fastrdrop.rdrop_loss(z1 * 1, z2 * 1, torch.tensor([0], device=DEVICE), alpha=4.0,
                                backend=backend, inplace_backward=inplace)
    assert loss.item() == 0.0
    for grad in torch.autograd.grad(loss, (z1, z2)):
        assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("backend, inplace", [m for m in MODES if m.values[0] == "triton"])
def test_a_distance_from_the_mean_past_the_float_range(backend, inplace):
    # D - E_p[D] overflows fp32 at an entry where p = 0 (its logit is one ulp below the label's,
    # so that exp of the difference is 0), in a row whose loss is 0: its gradient is 0 too. (The
    # native kernel folds E_p[D] into a coefficient per row, an FMA less per entry, exact to the
    # rounding of terms of 1e38 here: it gives -1.5 at the label.)
    largest, u = torch.finfo(torch.float32).max, 4.0723276e31
    below = torch.nextafter(torch.tensor(u), torch.tensor(0.0)).item()
    z1 = torch.tensor([[u, below, 0.0, 0.0]], device=DEVICE, requires_grad=True)
    z2 = torch.tensor([[largest, -largest, 0.0, 0.0]], device=DEVICE, requires_grad=True)
    loss = fastrdrop.rdrop_loss(z1 * 1, z2 * 1, torch.tensor([0], device=DEVICE),
                                backend=backend, inplace_backward=inplace)
    assert loss.item() == 0.0
    for grad in torch.autograd.grad(loss, (z1, z2)):
        assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_at_the_largest_bf16(backend):
    # every logit at bf16's maximum: both passes are uniform, so each cross entropy is log V
    vocab_size = 96
    z = torch.full((2, vocab_size), torch.finfo(torch.bfloat16).max, dtype=torch.bfloat16,
                   device=DEVICE)
    target = labels((2,), vocab_size, ignored=0.0)
    parts = fastrdrop.rdrop_loss(z, z.clone(), target, backend=backend, return_parts=True)
    expected = torch.log(torch.tensor(float(vocab_size)))
    torch.testing.assert_close(parts.loss.cpu(), 2 * expected)
    assert parts.kl.item() == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_pass_minus_inf_then_a_rising_maximum(backend):
    # a -inf in one pass in the first block, and logits 300 higher in a later one: rescaling the
    # first block's sums by exp(-300) = 0 once made inf * 0 = NaN of the KL instead of +inf
    z1, z2 = logits_pair((2, 3000), torch.float32)
    z1[0, 5] = -INF
    z1[0, 2500:], z2[0, 2500:] = z1[0, 2500:] + 300, z2[0, 2500:] + 300
    loss, *grads = run(backend, False, False, z1, z2, labels((2,), 3000, ignored=0.0))
    assert loss[0].item() == INF and torch.isfinite(loss[1])
    for grad in grads:
        assert torch.isnan(grad[0]).all() and torch.isfinite(grad[1]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_that_rise_far_above_their_first_block(backend):
    # Later vocabulary blocks far above the first (where a kernel's shifts start): 150 and 300
    # above it, past exp's range, and rises of 40 per block, which stay in range for a while.
    vocab_size = 4 * 2048 + 100
    z1, z2 = logits_pair((3, vocab_size), torch.float32)
    target = labels((3,), vocab_size, ignored=0.0)
    rise = torch.zeros(3, vocab_size, device=DEVICE)
    rise[0, 3000:], rise[0, 7000:] = 150.0, 300.0
    rise[1] = 40.0 * (torch.arange(vocab_size, device=DEVICE) // 2048)
    rise[2, -1] = 200.0  # one entry in the last, partial block
    z1, z2 = z1 + rise, z2 + rise
    keywords = dict(target=target, alpha=0.7)
    assert_fp32_oracle_rule(backend, z1, z2, keywords)


@pytest.mark.parametrize("backend", BACKENDS)
def test_plus_inf_under_softcap_is_its_cap(backend):
    # softcap maps +inf to c, as it maps a huge logit: the loss is finite, the same as with 1e30
    z1, z2 = logits_pair((3, 40), torch.float32)
    target = labels((3,), 40, ignored=0.0)
    huge = z1.clone()
    z1[0, 5], huge[0, 5] = INF, 1e30
    got = run(backend, False, False, z1, z2, target, softcap=5.0)
    want = run(backend, False, False, huge, z2, target, softcap=5.0)
    for g, w in zip(got, want, strict=True):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, w)
