"""stacked_rdrop_loss: both passes in one [2B, ..., V] tensor; one gradient, none in place."""

import functools

import pytest
import torch
from allocations import AllocationLog

import fastrdrop
from fastrdrop import reference
from fastrdrop.ops import N_STATS

from conftest import DEVICE, fused_backends
from inputs import grad_output_like, labels, logits_pair
from oracle import assert_oracle_rule, oracle_loss

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
REDUCTIONS = ("mean", "sum", "none", "batchmean")
BACKENDS = [*fused_backends(), "torch"]


def stacked_logits(batch_shape, vocab_size, dtype, **kwargs):
    """[2B, ..., V]: the first pass's logits, then the second's (z2 = z1 + noise)."""
    return torch.cat(logits_pair((*batch_shape, vocab_size), dtype, **kwargs))


def loss_and_grad(fn, logits, grad_output):
    """fn's loss on a non-leaf copy of logits (as a model's output is) and the gradient."""
    leaf = logits.detach().clone().requires_grad_()
    loss = fn(leaf * 1)
    (grad,) = torch.autograd.grad(loss, leaf, grad_output.to(loss.dtype))
    return loss.detach(), grad


def on_halves(loss_fn):
    """loss_fn(logits1, logits2, ...) as a function of the stacked logits."""
    def fn(logits, **kwargs):
        half = logits.shape[0] // 2
        return loss_fn(logits[:half], logits[half:], **kwargs)
    return fn


def check_stacked(backend, logits, target, *, inplace, grad_output=None, **kwargs):
    """Loss and gradient of stacked_rdrop_loss vs eager torch on the halves vs the oracle."""
    stacked = functools.partial(fastrdrop.stacked_rdrop_loss, target=target, backend=backend,
                                inplace_backward=inplace, **kwargs)
    eager = functools.partial(on_halves(reference.rdrop_loss), target=target, **kwargs)
    truth = functools.partial(on_halves(oracle_loss), target=target, **kwargs)
    if grad_output is None:
        grad_output = grad_output_like(stacked(logits.detach()))
    got = loss_and_grad(stacked, logits, grad_output)
    want = loss_and_grad(eager, logits, grad_output)
    exact = loss_and_grad(truth, logits.double(), grad_output)
    # in place, a gradient scaled by grad_output != 1 is rounded to the dtype a second time
    extra = int(inplace and backend != "torch")
    for what, g, e, t in zip(("loss", "dlogits"), got, want, exact, strict=True):
        assert g.shape == t.shape, what
        assert_oracle_rule(g, e, t, logits.dtype, what, extra_roundings=extra * (what != "loss"))
    return got


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("inplace", [False, True])
def test_stacked_matches_oracle(backend, dtype, reduction, inplace):
    logits = stacked_logits((2, 3), 515, dtype, masked=0.05)
    target = labels((2, 3), 515, logits=logits[:2])
    loss, grad = check_stacked(backend, logits, target, inplace=inplace, reduction=reduction,
                               alpha=0.7, label_smoothing=0.1, softcap=30.0)
    assert loss.shape == ((2, 3) if reduction == "none" else ())
    assert grad.shape == logits.shape


@pytest.mark.parametrize("backend", fused_backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize(("label_smoothing", "masked"), [(0.0, 0.0), (0.1, 0.05)])
def test_labels_on_every_lane(backend, dtype, inplace, label_smoothing, masked):
    # The native kernel reads 16-bit rows as 32-bit words of two elements. With V odd, every
    # other row starts in the middle of a word and ends in a single element. Labels sit on both
    # lanes of a word, on both sides of the 2048-entry block edges, and on the last element.
    vocab_size = 4099
    positions = [0, 1, 2046, 2047, 2048, 2049, 4096, 4097, 4098]
    logits = stacked_logits((len(positions),), vocab_size, dtype, masked=masked)
    rows = torch.arange(2 * len(positions), device=DEVICE)  # each label present, likely: p_y ~ 1/2
    logits[rows, torch.tensor(positions * 2, device=DEVICE)] = (
        10 + torch.randn(len(rows), device=DEVICE)).to(dtype)
    target = torch.tensor(positions, device=DEVICE)
    check_stacked(backend, logits, target, inplace=inplace, reduction="none",
                  label_smoothing=label_smoothing, alpha=0.8)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("inplace", [False, True])
def test_stacked_without_target(backend, reduction, inplace):
    check_stacked(backend, stacked_logits((3, 2), 777, torch.bfloat16), None, inplace=inplace,
                  reduction=reduction, alpha=1.5)


@pytest.mark.parametrize("backend", fused_backends())
@pytest.mark.parametrize("inplace", [False, True])
def test_stacked_equals_the_halves(backend, inplace):
    # The same kernels on the same rows: the same bits as rdrop_loss on the two halves.
    logits = stacked_logits((4,), 1000, torch.bfloat16)
    target = labels((4,), 1000)
    g = torch.tensor(1.7, device=DEVICE)
    kwargs = dict(backend=backend, inplace_backward=inplace, label_smoothing=0.1)
    stacked = loss_and_grad(functools.partial(fastrdrop.stacked_rdrop_loss, target=target,
                                              **kwargs), logits, g)
    halves = loss_and_grad(functools.partial(on_halves(fastrdrop.rdrop_loss), target=target,
                                             **kwargs), logits, g)
    for got, want in zip(stacked, halves, strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize("backend", fused_backends())
@pytest.mark.parametrize("grad_scale", [1.0, 0.25])
def test_inplace_gradient_is_the_logits_storage(backend, grad_scale):
    # Autograd receives logits' own storage as their gradient: zero extra bytes.
    leaf = stacked_logits((2, 3), 640, torch.bfloat16).requires_grad_()
    logits = leaf * 1
    seen = []
    logits.register_hook(lambda g: seen.append(g.untyped_storage().data_ptr()))
    target = labels((2, 3), 640)
    with AllocationLog() as log:
        loss = fastrdrop.stacked_rdrop_loss(logits, target, backend=backend,
                                            inplace_backward=True)
        (grad,) = torch.autograd.grad(loss, logits, torch.tensor(grad_scale, device=DEVICE))
    assert seen == [logits.untyped_storage().data_ptr()] == [grad.untyped_storage().data_ptr()]
    assert max(log.sizes) <= N_STATS * 6 * 4, log.sizes  # O(rows): the stats of 6 tokens
    eager = loss_and_grad(functools.partial(on_halves(reference.rdrop_loss), target=target),
                          leaf, torch.tensor(grad_scale))
    torch.testing.assert_close(grad, eager[1], rtol=2e-2, atol=1e-3 * grad_scale)


@pytest.mark.parametrize("backend", fused_backends())
def test_default_mode_allocates_one_gradient(backend):
    batch, vocab_size = 5, 2048
    leaf = stacked_logits((batch,), vocab_size, torch.bfloat16).requires_grad_()
    target = labels((batch,), vocab_size)
    gradient = 2 * batch * vocab_size * leaf.element_size()

    def large_allocations(loss_fn):
        logits = leaf * 1
        with AllocationLog() as log:
            torch.autograd.grad(loss_fn(logits, target, backend=backend), logits)
        return sorted(size for size in log.sizes if size >= gradient // 2)

    assert large_allocations(fastrdrop.stacked_rdrop_loss) == [gradient]
    # the halves, by contrast: one gradient per half, then autograd's copy of both into one
    assert large_allocations(lambda z, y, **kw: fastrdrop.rdrop_loss(*z.chunk(2), y, **kw)) == [
        gradient // 2, gradient // 2, gradient]


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_with_gaps(backend):
    # logits[:, :-1] of [2B, T, V] (the shift of a causal LM): rows do not share one stride, so
    # the default mode copies them first; in place there is no storage to write into.
    full = stacked_logits((2, 4), 300, torch.float32)
    target = labels((2, 3), 300)
    check_stacked(backend, full[:, :-1], target, inplace=False, reduction="sum")
    if backend != "torch":
        logits = full.clone().requires_grad_() * 1
        before = logits.detach().clone()
        with pytest.raises(ValueError, match="logits must be viewable as"):
            fastrdrop.stacked_rdrop_loss(logits[:, :-1], target, backend=backend,
                                         inplace_backward=True)
        assert torch.equal(logits.detach(), before)


@pytest.mark.parametrize("backend", fused_backends())
def test_inplace_refuses_rows_that_overlap(backend):
    # expand: every row is the same memory; the default mode reads them, in place cannot write
    row = stacked_logits((1,), 300, torch.float32)[:1].requires_grad_()
    logits = row.expand(4, 300)
    target = labels((2,), 300)
    check_stacked(backend, logits.detach(), target, inplace=False)
    with pytest.raises(ValueError, match="logits's rows overlap in memory"):
        fastrdrop.stacked_rdrop_loss(logits, target, backend=backend, inplace_backward=True)


def test_module_form_and_repr():
    criterion = fastrdrop.StackedRDropLoss(alpha=2.0, ignore_index=-1, reduction="sum",
                                           inplace_backward=True)
    logits = stacked_logits((3,), 50, torch.float32)
    target = labels((3,), 50, ignore_index=-1)
    torch.testing.assert_close(
        criterion(logits, target),
        fastrdrop.stacked_rdrop_loss(logits, target, alpha=2.0, ignore_index=-1,
                                     reduction="sum"))
    text = repr(criterion)
    for word in ("alpha=2.0", "ignore_index=-1", "reduction='sum'", "inplace_backward=True",
                 "return_parts=False", "backend='auto'"):
        assert word in text, text


@pytest.mark.parametrize("logits_shape, target_shape, error, match", [
    ((3, 10), (1,), ValueError, r"logits must have shape \[2B, \.\.\., V\]"),
    ((10,), None, ValueError, r"logits must have shape \[2B, \.\.\., V\]"),
    ((4, 0), None, ValueError, r"V >= 1"),
    ((4, 3, 10), (4, 3), ValueError, r"target must have shape \[2, 3\] \(logits\[:B\]'s shape"),
])
def test_stacked_errors(logits_shape, target_shape, error, match):
    logits = torch.randn(logits_shape, device=DEVICE)
    target = None if target_shape is None else torch.zeros(target_shape, dtype=torch.long,
                                                           device=DEVICE)
    with pytest.raises(error, match=match):
        fastrdrop.stacked_rdrop_loss(logits, target)
    with pytest.raises(TypeError, match="logits must be a floating-point tensor"):
        fastrdrop.stacked_rdrop_loss(torch.zeros(4, 5, dtype=torch.long, device=DEVICE))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("inplace", [False, True])
def test_logits_rising_far_along_the_row(backend, dtype, inplace):
    # Blocks late in the row far above the first ones (by 150, past exp's range in fp32): the
    # gradients written in the forward pass, from the exponentials of the stats pass, too.
    logits = stacked_logits((3,), 7000, torch.float64)
    logits[:3, 4500:] += 150.0
    logits[3:, 5000:] += 150.0
    check_stacked(backend, logits.to(dtype), labels((3,), 7000), inplace=inplace,
                  label_smoothing=0.1, reduction="sum")


@pytest.mark.parametrize("backend", fused_backends())
def test_compiled_autograd_second_backward(backend):
    # Compiled autograd traces the backward pass: the gradients of an fp32 loss made in the
    # forward pass are then computed again, each time, rather than scaled twice.
    enable = getattr(torch._dynamo.compiled_autograd, "_enable", None)
    if enable is None:
        pytest.skip("this torch has no compiled autograd")
    torch._dynamo.reset()
    logits = stacked_logits((3,), 200, torch.float32)
    target = labels((3,), 200)
    want = loss_and_grad(functools.partial(on_halves(reference.rdrop_loss), target=target,
                                           reduction="sum"), logits, torch.tensor(2.0))[1]
    leaf = logits.detach().clone().requires_grad_()
    loss = fastrdrop.stacked_rdrop_loss(leaf * 1, target, backend=backend, reduction="sum")
    for retain in (True, False):
        leaf.grad = None
        with enable(torch.compile(backend="eager")):
            (loss * 2.0).backward(retain_graph=retain)
        torch.testing.assert_close(leaf.grad, want, rtol=1e-4, atol=1e-6)
