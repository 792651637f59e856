"""The fused backends against the float64 oracle, by the rule of tests/oracle.py."""

import functools

import pytest
import torch

import fastrdrop
from fastrdrop import _native, reference

from conftest import DEVICE, fused_backends
from inputs import grad_output_like, labels, logits_pair
from oracle import assert_oracle_rule, loss_and_grads, oracle_loss

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
REDUCTIONS = ("mean", "sum", "none", "batchmean")


def check_case(backend, shape, dtype, *, has_target=True, masked=0.0, ignored=0.2,
               grad_output=None, logits=None, inplace=False, **kwargs):
    """Loss and both gradients of the fused backend (in place or not) vs eager torch vs the
    float64 oracle."""
    z1, z2 = logits if logits is not None else logits_pair(shape, dtype, masked=masked)
    target = labels(z1.shape[:-1], z1.shape[-1], ignored=ignored, logits=z1) if has_target else None
    fused_fn = functools.partial(fastrdrop.rdrop_loss, target=target, backend=backend,
                                 inplace_backward=inplace, **kwargs)
    eager_fn = functools.partial(reference.rdrop_loss, target=target, **kwargs)
    oracle_fn = functools.partial(oracle_loss, target=target, **kwargs)
    if grad_output is None:
        grad_output = grad_output_like(fused_fn(z1, z2).detach())
    fused = loss_and_grads(fused_fn, z1, z2, grad_output)
    eager = loss_and_grads(eager_fn, z1, z2, grad_output)
    truth = loss_and_grads(oracle_fn, z1.double(), z2.double(), grad_output)
    assert fused[0].dtype == torch.float32
    for what, f, e, t in zip(("loss", "dlogits1", "dlogits2"), fused, eager, truth, strict=True):
        assert f.shape == t.shape, what
        # in place, the gradients are rounded once in the forward pass and again when scaled
        extra = int(inplace and what != "loss")
        assert_oracle_rule(f, e, t, dtype, what, extra_roundings=extra)
    return fused


# The full grid at V=1271 (not a power of 2, smaller than one block): every combination of
# reduction, target / no target, smoothing, softcap and dtype.
@pytest.mark.parametrize("backend", fused_backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("softcap", [None, 30.0])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("has_target", [True, False])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_grid_v1271(backend, reduction, has_target, label_smoothing, softcap, dtype):
    check_case(backend, (6, 1271), dtype, has_target=has_target, reduction=reduction,
               label_smoothing=label_smoothing, softcap=softcap, alpha=0.7)


# V=1: every distribution is a point mass, the loss and gradients are 0 (a degenerate row).
# V=32000: several blocks per row. Each keyword value appears; combinations kept few for speed.
COVERING = [  # reduction, has_target, label_smoothing, softcap, dtype
    ("mean", True, 0.1, 30.0, torch.bfloat16),
    ("sum", False, 0.0, None, torch.float32),
    ("none", True, 0.0, 30.0, torch.float16),
    ("batchmean", True, 0.1, None, torch.float32),
    ("mean", False, 0.1, 30.0, torch.float16),
    ("none", False, 0.0, None, torch.bfloat16),
    ("sum", True, 0.1, None, torch.bfloat16),
    ("batchmean", False, 0.0, 30.0, torch.float16),
]


@pytest.mark.parametrize("backend", fused_backends())
@pytest.mark.parametrize("case", COVERING, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("vocab_size", [1, 32000])
def test_covering(backend, vocab_size, case):
    reduction, has_target, label_smoothing, softcap, dtype = case
    check_case(backend, (4, vocab_size), dtype, has_target=has_target, reduction=reduction,
               label_smoothing=label_smoothing, softcap=softcap, alpha=1.3)


# V=131072 (Llama 3 class vocabulary): rows much longer than a block.
@pytest.mark.parametrize("backend", fused_backends())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_long_row(backend, dtype):
    check_case(backend, (2, 131072), dtype, ignored=0.0, label_smoothing=0.1, softcap=30.0)


@pytest.mark.parametrize("backend", fused_backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_strided_halves(backend, dtype):
    # The usual layout: one [2N, V] tensor from the model on [x; x], split without a copy.
    base = torch.cat(logits_pair((5, 777), dtype))
    check_case(backend, None, dtype, logits=base.chunk(2), reduction="sum", label_smoothing=0.1)
    # Interleaved rows: row stride 2V.
    check_case(backend, None, dtype, logits=(base[0::2], base[1::2]), reduction="mean")


@pytest.mark.parametrize("backend", fused_backends())
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_leading_dims(backend, reduction):
    # [B, T, V]: "none" keeps [B, T]; "batchmean" divides by B.
    loss = check_case(backend, (2, 3, 515), torch.float32, reduction=reduction, softcap=30.0)[0]
    assert loss.shape == ((2, 3) if reduction == "none" else ())


@pytest.mark.parametrize("backend", fused_backends())
@pytest.mark.parametrize("softcap", [2.0, 1e3, 1e5, 1e7])
def test_a_large_softcap_keeps_the_logits(backend, softcap):
    # c tanh(x / c) where x / c is small: 1 - exp(-2 |x / c|) cancelled, and left an error of
    # about c 2^-25 in each logit (6e-5 of the loss at c = 1e4, 2e-2 at 1e7, 50-200x eager's).
    # Now a polynomial below |x / c| = 1/2; c = 2 takes logits on both sides of that seam
    check_case(backend, (4, 300), torch.float32, softcap=softcap, label_smoothing=0.1)


@pytest.mark.parametrize("backend", fused_backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_masked_vocabulary(backend, dtype, reduction):
    # 30% of the positions are -inf in both passes: absent, gradient 0, never NaN.
    for label_smoothing, softcap in [(0.0, None), (0.1, 30.0)]:
        _, d1, d2 = check_case(backend, (5, 1000), dtype, masked=0.3, reduction=reduction,
                               label_smoothing=label_smoothing, softcap=softcap)
    check_case(backend, (5, 1000), dtype, masked=0.3, has_target=False, reduction=reduction)


@pytest.mark.parametrize("backend", fused_backends())
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("inplace", [False, True])
def test_all_ignored(backend, reduction, inplace):
    # No token counts: loss 0 (not NaN), gradients exactly 0.
    z1, z2 = (z.requires_grad_() for z in logits_pair((3, 700), torch.bfloat16))
    target = torch.full((3,), -100, device=DEVICE)
    loss = fastrdrop.rdrop_loss(z1 * 1, z2 * 1, target, reduction=reduction, backend=backend,
                                label_smoothing=0.1, inplace_backward=inplace)
    loss.sum().backward()
    assert torch.all(loss == 0)
    assert torch.all(z1.grad == 0) and torch.all(z2.grad == 0)


@pytest.mark.parametrize("backend", fused_backends())
def test_empty_batch(backend):
    z1, z2 = (z.requires_grad_() for z in logits_pair((0, 300), torch.float32))
    target = torch.zeros(0, dtype=torch.long, device=DEVICE)
    loss = fastrdrop.rdrop_loss(z1, z2, target, backend=backend)
    loss.backward()
    assert loss.item() == 0.0 and z1.grad.shape == (0, 300)


@pytest.mark.parametrize("backend", fused_backends())
def test_true_class_gradient_in_fp32(backend):
    # p[y] close to 1 in bf16: dz[y] = p[y] - 1 is tiny, and must not be lost to a bf16 rounding.
    z1, z2 = logits_pair((4, 2000), torch.bfloat16, spread=1.0)
    target = torch.arange(4, device=DEVICE)
    z1[torch.arange(4), target] = 14.0
    z2[torch.arange(4), target] = 14.5
    _, d1, d2 = loss_and_grads(
        functools.partial(fastrdrop.rdrop_loss, target=target, backend=backend, alpha=0.0),
        z1, z2, torch.tensor(1.0))
    _, t1, t2 = loss_and_grads(functools.partial(oracle_loss, target=target, alpha=0.0),
                               z1.double(), z2.double(), torch.tensor(1.0))
    rows = torch.arange(4)
    for d, t in ((d1, t1), (d2, t2)):
        rel = ((d[rows, target].double() - t[rows, target]) / t[rows, target]).abs().max()
        assert rel < 1e-2


@pytest.mark.parametrize("backend", fused_backends())
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_parts(backend, reduction):
    # RDropParts: each part reduced like the loss; loss = ce1 + ce2 + alpha * kl.
    z1, z2 = logits_pair((2, 4, 333), torch.float32)
    target = labels((2, 4), 333)
    kwargs = dict(alpha=0.3, reduction=reduction, label_smoothing=0.1, return_parts=True)
    fused = fastrdrop.rdrop_loss(z1, z2, target, backend=backend, **kwargs)
    eager = reference.rdrop_loss(z1, z2, target, **kwargs)
    assert isinstance(fused, fastrdrop.RDropParts)
    for f, e in zip(fused, eager, strict=True):
        torch.testing.assert_close(f, e, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused.loss, fused.ce1 + fused.ce2 + 0.3 * fused.kl)


@pytest.mark.parametrize("backend", fused_backends())
def test_parts_carry_gradient(backend):
    # The official R-Drop composition, 0.5 (CE_1 + CE_2) + alpha KL, built from the parts.
    z1, z2 = logits_pair((6, 500), torch.float32)
    target = labels((6,), 500)
    g = torch.tensor(1.0)

    def official(fn):
        def loss(a, b):
            parts = fn(a, b, target, return_parts=True)
            return 0.5 * (parts.ce1 + parts.ce2) + 4.0 * parts.kl
        return loss

    fused = loss_and_grads(official(functools.partial(fastrdrop.rdrop_loss, backend=backend)),
                           z1, z2, g)
    eager = loss_and_grads(official(reference.rdrop_loss), z1, z2, g)
    # the parts' formulas are checked against the oracle elsewhere: float64 reference is truth here
    truth = loss_and_grads(official(reference.rdrop_loss), z1.double(), z2.double(), g)
    for f, e, t, what in zip(fused, eager, truth, ("loss", "grad 1", "grad 2"), strict=True):
        assert_oracle_rule(f, e, t, torch.float32, what)


@pytest.mark.parametrize("backend", fused_backends())
def test_module_and_non_contiguous_vocab(backend):
    # RDropLoss equals rdrop_loss; logits whose vocabulary is not the contiguous dim still work.
    z1, z2 = (z.t().contiguous().t() for z in logits_pair((4, 300), torch.float32))
    assert z1.stride(-1) != 1
    target = labels((4,), 300)
    module = fastrdrop.RDropLoss(alpha=0.5, label_smoothing=0.1, backend=backend)
    torch.testing.assert_close(
        module(z1, z2, target),
        reference.rdrop_loss(z1, z2, target, alpha=0.5, label_smoothing=0.1))
    assert "alpha=0.5" in repr(module)


@pytest.mark.parametrize("backend", fused_backends())
def test_no_grad_runs_forward_only(backend, monkeypatch):
    # Without grad, or with logits that do not both require grad, the in-place kernel never runs
    # and the logits are left alone, even with inplace_backward=True.
    from fastrdrop import ops

    launched = []
    launcher = ops.FORWARD[backend]
    monkeypatch.setitem(ops.FORWARD, backend,
                        lambda *args: launched.append(args[-1]) or launcher(*args))
    z1, z2 = logits_pair((3, 400), torch.float32)
    target = labels((3,), 400)
    z1.requires_grad_()
    before = (z1.detach().clone(), z2.clone())
    with torch.no_grad():
        fastrdrop.rdrop_loss(z1, z2, target, backend=backend, inplace_backward=True)
    loss = fastrdrop.rdrop_loss(z1, z2, target, backend=backend, inplace_backward=True)
    loss.backward()  # z2 takes no gradient: the default mode ran
    assert launched == [None, None]  # no gradients written in the forward pass
    assert torch.equal(z1.detach(), before[0]) and torch.equal(z2, before[1])


@pytest.mark.parametrize("backend", fused_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_logits_rising_far_along_the_row(backend, dtype):
    # Blocks late in the row far above the first ones (by 150, past exp's range in fp32): the
    # online softmax must move its shift, not overflow.
    z1, z2 = logits_pair((3, 7000), torch.float64)
    z1[:, 4500:] += 150.0
    z2[:, 5000:] += 150.0
    check_case(backend, None, dtype, logits=(z1.to(dtype), z2.to(dtype)), label_smoothing=0.1)


@pytest.mark.parametrize("backend", fused_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_absent_spans_and_a_lone_maximum(backend, dtype, label_smoothing):
    # The kernels keep statistics per lane (a thread's entries) and combine the lanes after the
    # row: lanes that never see a present entry (a span of -inf), lanes that see few (one entry
    # in 37 present), a row with only its last 100 entries, and a row's maximum far above
    # everything else, so that one lane holds it.
    z1, z2 = logits_pair((4, 5000), torch.float64)
    position = torch.arange(5000, device=DEVICE)
    absent = ((position >= 1000) & (position < 3000)) | (
        (position >= 3000) & (position < 4500) & (position % 37 != 0))
    absent = absent.expand(4, -1).clone()
    absent[1, :4900] = True
    z1[absent] = z2[absent] = float("-inf")
    z1[2, 4321] += 60.0
    z2[3, 17] += 60.0
    check_case(backend, None, dtype, logits=(z1.to(dtype), z2.to(dtype)),
               label_smoothing=label_smoothing)


@pytest.mark.parametrize("backend", fused_backends())
def test_strided_target(backend):
    # labels taken from a larger tensor with a stride, as for interleaved rows
    z1, z2 = logits_pair((4, 300), torch.float32)
    full = labels((8,), 300)
    target = full[0::2]
    assert target.stride() == (2,)
    torch.testing.assert_close(fastrdrop.rdrop_loss(z1, z2, target, backend=backend),
                               reference.rdrop_loss(z1, z2, target.contiguous()))


@pytest.mark.parametrize("backend", [*fused_backends(), "torch"])
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_label_on_a_masked_entry_has_infinite_cross_entropy(backend, softcap):
    # probability 0 for the label: every backend says inf, for that row only
    z1, z2 = logits_pair((3, 50), torch.float32)
    target = labels((3,), 50, ignored=0.0)
    z1[1, target[1]] = z2[1, target[1]] = float("-inf")
    loss = fastrdrop.rdrop_loss(z1, z2, target, reduction="none", softcap=softcap,
                                backend=backend)
    assert torch.isinf(loss[1]) and torch.isfinite(loss[[0, 2]]).all()


def test_auto_backend_choice():
    # auto: Triton on GPU tensors, the native kernel on CPU tensors where it was built, else
    # the reference; float64 (no fused kernel) always runs the reference, in float64.
    z1, z2 = logits_pair((3, 50), torch.float32)
    target = labels((3,), 50)
    expected_backend = "triton" if DEVICE.type != "cpu" else (
        "native" if _native.unavailable_reason() is None else "torch")
    assert fastrdrop.loss.default_backend(DEVICE) == expected_backend
    expected = reference.rdrop_loss(z1, z2, target)
    torch.testing.assert_close(fastrdrop.rdrop_loss(z1, z2, target), expected)
    torch.testing.assert_close(fastrdrop.rdrop_loss(z1, z2, target, backend="torch"), expected)
    loss64 = fastrdrop.rdrop_loss(z1.double(), z2.double(), target)
    assert loss64.dtype == torch.float64


def test_grid_is_complete():
    # Every value of each keyword appears at every vocabulary size of the covering set.
    for position, values in enumerate([REDUCTIONS, (True, False), (0.0, 0.1), (None, 30.0),
                                       DTYPES]):
        assert {case[position] for case in COVERING} == set(values)


@pytest.mark.parametrize("backend", fused_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_one_entry_rows_have_zero_loss(backend, dtype):
    # V = 1: a point mass, so CE (smoothed or not) and KL are exactly 0, whatever the logit's
    # size: a difference of rounded products (lse - 0.9 z - 0.1 z) would leave ~|z| 2^-24.
    z1 = torch.tensor([[11.3125], [-9.6875], [7.09375], [10.90625], [-12.4375], [3.1875]])
    z2 = z1 + torch.tensor([[0.5], [-1.25], [2.0], [0.125], [3.0], [-0.75]])
    target = torch.zeros(6, dtype=torch.long)
    for smoothing in (0.0, 0.1):
        parts = fastrdrop.rdrop_loss(z1.to(DEVICE, dtype), z2.to(DEVICE, dtype),
                                     target.to(DEVICE), backend=backend, reduction="sum",
                                     label_smoothing=smoothing, return_parts=True)
        assert all(part.item() == 0.0 for part in parts), (smoothing, parts)

