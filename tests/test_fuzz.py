"""Fuzzed memory layouts: hypothesis draws, for every backend and both APIs (rdrop_loss on two
tensors, stacked_rdrop_loss on one), shapes, dtypes, reductions and keywords, and logits that are
strided views of a flat buffer: a storage offset, rows with gaps between them, leading dimensions
permuted or expanded (stride 0), a last dimension that is not contiguous, and, for two tensors,
one buffer under both (overlapping or not). Each call either equals the reference (by the oracle
rule of tests/oracle.py, for the loss and the gradient of each buffer) or raises a ValueError or
TypeError that names the argument, with every input unchanged.

The spec of when a call may raise: only with inplace_backward=True on a fused backend, and then
exactly when the gradient cannot be written over the logits: a tensor that torch cannot view as
[N, V] rows with a contiguous last dimension, rows that share memory, or two logits that do.

FASTRDROP_FUZZ_EXAMPLES=1000 draws more examples than CI's bounded count.
"""

import functools
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastrdrop

from conftest import DEVICE, fused_backends
from oracle import FLOOR, assert_oracle_rule, native_floor, oracle_loss

EXAMPLES = int(os.environ.get("FASTRDROP_FUZZ_EXAMPLES", "60"))
BACKENDS = [*fused_backends(), "torch"]


@st.composite
def layouts(draw, shape):
    """(strides, storage offset) of a view of ``shape`` [..., V] into a flat buffer."""
    *lead, vocab = shape
    elem_stride = draw(st.sampled_from([1, 1, 2]))  # 2: every other element
    stride = vocab * elem_stride + draw(st.sampled_from([0, 0, 1, 3]))  # a gap after each row
    strides = [0] * len(lead)
    expanded = draw(st.sampled_from([None, *range(len(lead))]))  # stride 0
    for position, dim in enumerate(draw(st.permutations(range(len(lead))))[::-1]):
        stride += draw(st.sampled_from([0, 0, vocab])) if position else 0  # a gap between blocks
        strides[dim] = 0 if dim == expanded else stride
        stride *= max(lead[dim], 1)
    return [*strides, elem_stride], draw(st.sampled_from([0, 1, 8]))


def extent(shape, strides, offset):
    """Elements of the buffer that a view reaches, plus one."""
    return offset + 1 + sum((n - 1) * s for n, s in zip(shape, strides, strict=True) if n > 0)


@st.composite
def cases(draw):
    api = draw(st.sampled_from(["pair", "stacked"]))
    lead = draw(st.lists(st.integers(0, 3), min_size=1, max_size=3))
    if api == "stacked":
        lead[0] *= 2  # [2B, ..., V]
    shape = [*lead, draw(st.integers(1, 300))]
    views = [draw(layouts(shape)) for _ in range(1 if api == "stacked" else 2)]
    if api == "pair" and draw(st.booleans()):  # one buffer under both, the second further on
        (strides, offset), start = views[1], draw(st.integers(0, extent(shape, *views[0])))
        views[1] = (strides, offset + start)
        buffers = [max(extent(shape, *view) for view in views)] * 2
        shared = True
    else:
        buffers, shared = [extent(shape, *view) for view in views], False
    batch = [lead[0] // 2, *lead[1:]] if api == "stacked" else lead
    target = None
    if draw(st.booleans()):
        target = torch.randint(0, shape[-1], batch)
        target[torch.rand(batch) < 0.3] = -100
    keywords = dict(
        alpha=draw(st.sampled_from([0.0, 1.0, 2.5])),
        reduction=draw(st.sampled_from(["mean", "sum", "none", "batchmean"])),
        label_smoothing=draw(st.sampled_from([0.0, 0.1])),
        softcap=draw(st.sampled_from([None, 20.0])),
        inplace_backward=draw(st.booleans()),
    )
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    return dict(api=api, shape=shape, views=views, buffers=buffers, shared=shared, dtype=dtype,
                target=target, keywords=keywords, seed=draw(st.integers(0, 2**31 - 1)))


def writable(case) -> bool:
    """Whether the in-place mode can write the gradients over these logits (the spec above,
    from torch's own view() and the elements each view reaches)."""
    reached = []
    for strides, offset in case["views"]:
        index = torch.arange(max(case["buffers"])).as_strided(case["shape"], strides, offset)
        try:
            index.view(-1, case["shape"][-1])
        except RuntimeError:
            return False
        if index.numel() and case["shape"][-1] > 1 and index.stride(-1) != 1:
            return False
        if index.unique().numel() != index.numel():
            return False
        reached.append(set(index.flatten().tolist()))
    return not (case["shared"] and reached[0] & reached[1])


def logits_of(case, dtype):
    """(leaf buffers, the logits: views of an activation of each), from the case's seed."""
    generator = torch.Generator().manual_seed(case["seed"])
    sizes = case["buffers"][:1] if case["shared"] else case["buffers"]
    leaves = [(3 * torch.randn(size, dtype=torch.float64, generator=generator))
              .to(case["dtype"]).to(DEVICE, dtype).requires_grad_() for size in sizes]
    activations = [leaf * 1 for leaf in leaves]  # in place writes over activations, as in training
    logits = [activations[0 if case["shared"] else i].as_strided(case["shape"], *view)
              for i, view in enumerate(case["views"])]
    return leaves, logits


def loss_and_grads(fn, case, dtype):
    """The loss of fn on the case's logits, and the gradients of its leaf buffers."""
    leaves, logits = logits_of(case, dtype)
    target = None if case["target"] is None else case["target"].to(DEVICE)
    loss = fn(*logits, target)
    grads = torch.autograd.grad(loss, leaves, torch.full_like(loss, 1.3), allow_unused=True)
    return loss.detach(), *(torch.zeros_like(x) if g is None else g
                            for g, x in zip(grads, leaves, strict=True))


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(case=cases())
def test_layouts_equal_the_reference_or_raise_a_named_error(backend, case):
    stacked = case["api"] == "stacked"
    keywords = dict(case["keywords"], backend=backend)
    fused = fastrdrop.stacked_rdrop_loss if stacked else fastrdrop.rdrop_loss
    may_raise = keywords["inplace_backward"] and backend != "torch" and not writable(case)

    _, logits = logits_of(case, case["dtype"])
    before = [t.detach().clone() for t in logits]
    target = None if case["target"] is None else case["target"].to(DEVICE)
    try:
        loss = fused(*logits, target, **keywords)
        torch.autograd.grad(loss, logits, torch.full_like(loss, 1.3), allow_unused=True)
    except (ValueError, TypeError) as error:
        assert may_raise, f"raised on a layout it takes: {error}"
        assert "logits" in str(error), error
        for now, then in zip(logits, before, strict=True):
            assert torch.equal(now.detach(), then), "an input was changed by a call that raised"
        return
    assert not may_raise, "took a layout whose gradients it cannot write in place"

    def on_halves(fn):
        return (lambda z, y, **kw: fn(*z.chunk(2), y, **kw)) if stacked else fn

    options = {k: v for k, v in keywords.items() if k not in ("inplace_backward", "backend")}
    got = loss_and_grads(functools.partial(fused, **keywords), case, case["dtype"])
    eager = loss_and_grads(on_halves(functools.partial(fastrdrop.reference.rdrop_loss,
                                                       **options)), case, case["dtype"])
    truth = loss_and_grads(on_halves(functools.partial(oracle_loss, **options)), case,
                           torch.float64)
    whats = ("loss", *(f"gradient of buffer {i}" for i in range(len(got) - 1)))
    # in place, the gradients for the upstream gradient 1.3 are rounded to the dtype twice: in
    # the forward pass, and after the scaling (fp16's once, in the backward pass). Without this
    # allowance a drawn example failed (bf16 in place, 0.8 of an ulp off at the largest entry)
    extra = int(keywords["inplace_backward"] and backend != "torch"
                and case["dtype"] != torch.float16)
    floor = FLOOR if backend != "native" else native_floor(
        *(before[0].chunk(2) if stacked else before), keywords["alpha"], 1.3,
        keywords["reduction"], case["target"], keywords.get("ignore_index", -100))
    for what, f, e, t in zip(whats, got, eager, truth, strict=True):
        assert_oracle_rule(f, e, t, case["dtype"], what,
                           extra_roundings=extra if what != "loss" else 0, floor=floor)
