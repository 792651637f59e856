"""torch.compile(fullgraph=True) traces rdrop_loss, StackedRDropLoss and linear_rdrop_loss
through their custom ops, without graph breaks, and gives eager's results: static shapes, a
sequence length that changes between calls (the recompile with dynamic shapes), dynamic=True,
and a second backward of a compiled in-place loss."""

import pytest
import torch

import fastrdrop

from conftest import DEVICE, fused_backends
from inputs import labels, logits_pair


@pytest.mark.parametrize("backend", fused_backends())
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("stacked", [False, True])
def test_compile_fullgraph_matches_eager(backend, inplace, stacked):
    torch._dynamo.reset()
    keywords = dict(alpha=0.5, label_smoothing=0.1, softcap=30.0, backend=backend,
                    return_parts=True, inplace_backward=inplace)
    criterion = fastrdrop.StackedRDropLoss(**keywords)

    def step(logits, target):
        if stacked:
            parts = criterion(logits, target)
        else:
            parts = fastrdrop.rdrop_loss(*logits.chunk(2), target, **keywords)
        return parts.loss * 3.0, parts.kl

    z1, z2 = logits_pair((5, 700), torch.float32)
    base = torch.cat([z1, z2])
    target = labels((5,), 700)
    compiled = torch.compile(step, fullgraph=True)
    if inplace and not stacked:
        # views of one tensor, mutated in place, can reach the kernel at the wrong offset once a
        # graph recompiles with dynamic shapes: refused at trace time, naming the way that works
        with pytest.raises(Exception, match="stacked_rdrop_loss"):
            compiled(base.clone().requires_grad_() * 1, target)
        return
    results = []
    for fn in (step, compiled):
        leaf = base.clone().requires_grad_()
        loss, kl = fn(leaf * 1, target)
        loss.backward()
        results.append((loss.detach(), kl.detach(), leaf.grad))
    for eager, compiled_result in zip(*results, strict=True):
        torch.testing.assert_close(compiled_result, eager, rtol=1e-5, atol=1e-6)


def inplace_step(backend):
    """stacked_rdrop_loss in place, a function to compile (Dynamo's caches emptied first)."""
    torch._dynamo.reset()

    def step(logits, target):
        return fastrdrop.stacked_rdrop_loss(logits, target, backend=backend,
                                            inplace_backward=True)

    return step


@pytest.mark.parametrize("backend", fused_backends())
def test_fp16_in_place(backend):
    # fp16 in place writes its gradients in the backward pass, into the saved logits, which a
    # compiled backward graph cannot: compiled, it runs the default mode, with eager's results
    step = inplace_step(backend)
    base = torch.cat(logits_pair((4, 300), torch.float16))
    target = labels((4,), 300)
    results = []
    for fn in (step, torch.compile(step, fullgraph=True)):
        leaf = base.clone().requires_grad_()
        loss = fn(leaf * 1, target)
        loss.backward(torch.tensor(2.0 ** 16, device=DEVICE))
        results.append((loss.detach(), leaf.grad))
    for eager, compiled_result in zip(*results, strict=True):
        torch.testing.assert_close(compiled_result, eager, rtol=1e-3, atol=0)


@pytest.mark.parametrize("backend", fused_backends())
@pytest.mark.parametrize("inplace", [False, True])
def test_sequence_length_changing_between_calls(backend, inplace):
    # T = 3, then 5 and 7: the second shape makes dynamo recompile with dynamic shapes, where a
    # mutated view once reached the kernel at storage offset 0 (the loss 6.04 instead of 7.13)
    torch._dynamo.reset()

    def step(logits, target):
        return fastrdrop.stacked_rdrop_loss(logits, target, backend=backend, alpha=0.7,
                                            inplace_backward=inplace, label_smoothing=0.1)

    compiled = torch.compile(step, fullgraph=True)
    for length in (3, 5, 7):
        z1, z2 = logits_pair((2, length, 60), torch.float32)
        base, target = torch.cat([z1, z2]), labels((2, length), 60)
        results = []
        for fn in (step, compiled):
            leaf = base.clone().requires_grad_()
            loss = fn(leaf * 1, target)
            loss.backward(torch.tensor(1.7))
            results.append((loss.detach(), leaf.grad))
        for eager, compiled_result in zip(*results, strict=True):
            torch.testing.assert_close(compiled_result, eager, rtol=1e-5, atol=1e-6,
                                       msg=f"T={length}")


@pytest.mark.parametrize("backend", fused_backends())
def test_inplace_pair_that_shares_memory(backend):
    # Two leaves that share one storage without being views (detached slices of one tensor): once
    # a graph recompiled with dynamic shapes, the kernel read logits1's rows as logits2's (the
    # loss of (z1, z1)). The two-tensor form in place is refused when traced with fullgraph=True;
    # without it, the call runs eagerly, where the kernels see the real memory.
    torch._dynamo.reset()

    def step(logits1, logits2, target):
        return fastrdrop.rdrop_loss(logits1, logits2, target, backend=backend,
                                    label_smoothing=0.1, inplace_backward=True)

    def inputs(rows):
        z1, z2 = logits_pair((rows, 40), torch.float32)
        base = torch.cat([z1, z2])
        halves = [base[:rows].detach().requires_grad_(), base[rows:].detach().requires_grad_()]
        return halves, [z1.clone().requires_grad_(), z2.clone().requires_grad_()]

    with pytest.raises(Exception, match="stacked_rdrop_loss"):
        torch.compile(step, fullgraph=True)(*inputs(3)[0], labels((3,), 40))
    compiled = torch.compile(step)
    for rows in (3, 5, 7):  # 5: the recompile with dynamic shapes
        shared, apart = inputs(rows)
        target = labels((rows,), 40)
        losses = [compiled(*shared, target), step(*apart, target)]
        for loss in losses:
            loss.backward()
        torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
        for got, want in zip(shared, apart, strict=True):
            torch.testing.assert_close(got.grad, want.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", fused_backends())
@pytest.mark.parametrize("api", ["rdrop_loss", "RDropLoss", "linear_rdrop_loss"])
def test_dynamic_true(backend, api):
    # symbolic sizes from the first call; the argument checks once called math.isfinite, which
    # dynamo cannot trace
    torch._dynamo.reset()
    weight = torch.randn(60, 8, device=DEVICE) / 8 ** 0.5

    def fn(x, target):
        if api == "rdrop_loss":
            return fastrdrop.rdrop_loss(*x.chunk(2), target, alpha=0.5, backend=backend)
        if api == "RDropLoss":
            return fastrdrop.RDropLoss(alpha=0.5, backend=backend)(*x.chunk(2), target)
        return fastrdrop.linear_rdrop_loss(*x.chunk(2), weight, target, alpha=0.5,
                                           backend=backend, chunk_size=4)

    compiled = torch.compile(fn, dynamic=True, fullgraph=True)
    for rows in (3, 5):
        width = 8 if api == "linear_rdrop_loss" else 60
        x = 2 * torch.randn(2 * rows, width, device=DEVICE)
        target = labels((rows,), 60)
        torch.testing.assert_close(compiled(x, target), fn(x, target), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", fused_backends())
def test_compiled_inplace_second_backward(backend):
    # retain_graph=True: two backward passes of a compiled in-place loss accumulate twice its
    # gradient (the upstream gradient was applied in place to the logits on every run: 4x)
    step = inplace_step(backend)
    z1, z2 = logits_pair((4, 90), torch.float32)
    base, target = torch.cat([z1, z2]), labels((4,), 90)
    grads = []
    for fn in (step, torch.compile(step, fullgraph=True)):
        leaf = base.clone().requires_grad_()
        loss = 3.0 * fn(leaf * 1, target)
        loss.backward(retain_graph=True)
        if fn is step:  # eager: the gradients served one backward; a second is refused
            with pytest.raises(RuntimeError, match="already used"):
                loss.backward()
            grads.append(2 * leaf.grad)
        else:
            loss.backward()
            grads.append(leaf.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", fused_backends())
@pytest.mark.parametrize("dtype, reduction", [(torch.float32, "none"), (torch.float16, "mean")])
def test_compiled_linear_keeps_no_logits_for_its_backward(backend, dtype, reduction):
    # reduction="none" and fp16 redo the chunks in the backward pass, with the upstream gradient.
    # Compiled, the joint graph's common subexpressions made those matmuls the forward's, and the
    # forward kept every chunk's logits for them: the [2N, V] that the fused linear loss avoids
    torch._dynamo.reset()
    n, h, v = 16, 8, 300
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(2 * n, h, generator=gen).to(DEVICE, dtype)
    weight = (torch.randn(v, h, generator=gen) / h ** 0.5).to(DEVICE, dtype).requires_grad_()
    target = labels((n,), v)

    def fn(x):
        return fastrdrop.linear_rdrop_loss(*x.chunk(2), weight, target, backend=backend,
                                           reduction=reduction, chunk_size=4).sum()

    saved, grads = [], []
    for f in (fn, torch.compile(fn, fullgraph=True)):
        sizes = []
        x = hidden.clone().requires_grad_()
        with torch.autograd.graph.saved_tensors_hooks(
                lambda t, sizes=sizes: sizes.append(t.numel() * t.element_size()) or t,
                lambda t: t):
            loss = f(x)
        grads.append(torch.autograd.grad(loss, (x, weight)))
        saved.append(sum(sizes))
    logits_bytes = 2 * n * v * hidden.element_size()
    assert saved[1] <= saved[0] + logits_bytes // 8, (saved, logits_bytes)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-6)
