"""Gradient buffers on CPU whose memory is kept for the next call (fastrdrop/buffers.py): a
reused buffer is written whole, a buffer is not lent again while any view of it lives, what is
kept stays bounded, and compiled graphs take them too. The size threshold is lowered to one
byte and blocks are rounded to 4 KiB pages, so that small cases take the reused path."""

import gc

import pytest
import torch

import fastrdrop
from fastrdrop import buffers

from conftest import DEVICE, fused_backends
from inputs import labels, logits_pair

pytestmark = pytest.mark.skipif(DEVICE.type != "cpu", reason="buffers are reused on CPU only")

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@pytest.fixture
def reused(monkeypatch):
    """Every gradient buffer through buffers.py; none kept before or after the test."""
    freed()  # buffers of earlier tests that cycles still hold come back now, then go
    buffers.release()
    monkeypatch.setattr(buffers, "MIN_BYTES", 1)
    monkeypatch.setattr(buffers, "HUGE_PAGE", 4096)  # blocks of whole 4 KiB pages
    yield
    buffers.release()


@pytest.fixture
def taken(monkeypatch):
    """The sizes asked of buffers._take, in order."""
    sizes = []
    take = buffers._take
    monkeypatch.setattr(buffers, "_take", lambda nbytes: sizes.append(nbytes) or take(nbytes))
    return sizes


def gradients(backend, logits, target, api, upstream=1.0, **kwargs):
    """The gradients that the loss's backward pass hands to autograd: of the stacked tensor, or
    of each half."""
    z = logits.detach().clone().requires_grad_()
    if api == "stacked":
        inputs = (z * 1,)
        loss = fastrdrop.stacked_rdrop_loss(*inputs, target, backend=backend, **kwargs)
    else:
        inputs = (z * 1).chunk(2)
        loss = fastrdrop.rdrop_loss(*inputs, target, backend=backend, **kwargs)
    return list(torch.autograd.grad(loss, inputs, torch.tensor(upstream, dtype=loss.dtype)))


def freed():
    """After del: collects too, as the Triton interpreter leaves reference cycles behind."""
    gc.collect()


def storages(tensors):
    return sorted(t.untyped_storage().data_ptr() for t in tensors)


def stacked_case(dtype, vocab_size=300, batch=6):
    z1, z2 = logits_pair((batch, vocab_size), dtype)
    return torch.cat([z1, z2]), labels((batch,), vocab_size)


@pytest.mark.parametrize("backend", fused_backends())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("api", ["stacked", "halves"])
@pytest.mark.parametrize("upstream", [1.0, 0.5])  # 0.5: 16-bit rows are computed again
def test_reused_buffers_are_written_whole(reused, monkeypatch, backend, dtype, api, upstream):
    logits, target = stacked_case(dtype)
    with monkeypatch.context() as m:
        m.setattr(buffers, "MIN_BYTES", 1 << 62)
        want = gradients(backend, logits, target, api, upstream, alpha=0.7)
    first = gradients(backend, logits, target, api, upstream, alpha=0.7)
    lent = storages(first)
    for grad in first:
        grad.fill_(float("nan"))  # anything the kernel leaves unwritten shows
    del first, grad
    freed()
    assert len(buffers._free) == len(lent)  # given back
    second = gradients(backend, logits, target, api, upstream, alpha=0.7)
    assert len(buffers._free) == 0 and storages(second) == lent  # and lent again
    for got, expected in zip(second, want, strict=True):
        assert torch.equal(got, expected)


@pytest.mark.parametrize("backend", fused_backends())
def test_a_lent_buffer_is_not_lent_again(reused, backend):
    logits, target = stacked_case(torch.float32)
    (first,) = gradients(backend, logits, target, "stacked")
    kept = first[3:, 1:]  # a view holds the whole buffer
    snapshot = kept.clone()
    del first
    freed()
    (second,) = gradients(backend, logits, target, "stacked")
    assert second.untyped_storage().data_ptr() != kept.untyped_storage().data_ptr()
    second.fill_(float("nan"))
    assert torch.equal(kept, snapshot)


@pytest.mark.parametrize("backend", fused_backends())
def test_what_is_kept_is_bounded(reused, backend):
    logits, target = stacked_case(torch.float32)
    alive = [gradients(backend, logits, target, "stacked") for _ in range(buffers.KEPT + 2)]
    assert len(buffers._free) == 0  # all lent
    del alive
    freed()
    assert len(buffers._free) == buffers.KEPT
    # the sizes change: the kept blocks are too small and are dropped, one new block is mapped
    larger, target = stacked_case(torch.float32, vocab_size=1200)
    gradients(backend, larger, target, "stacked")
    freed()
    pages = -(-larger.numel() * 4 // buffers.HUGE_PAGE)
    assert [len(block) for block in buffers._free] == [pages * buffers.HUGE_PAGE]
    buffers.release()
    assert len(buffers._free) == 0


@pytest.mark.parametrize("backend", fused_backends())
def test_one_buffer_stacked_two_on_halves(reused, taken, backend):
    logits, target = stacked_case(torch.bfloat16)
    gradient = logits.numel() * logits.element_size()
    gradients(backend, logits, target, "stacked")
    assert taken == [gradient]
    taken.clear()
    gradients(backend, logits, target, "halves")
    assert taken == [gradient // 2, gradient // 2]


@pytest.mark.parametrize("backend", fused_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])  # fp16: the backward allocates
def test_compiled_graphs_take_reused_buffers(reused, taken, backend, dtype):
    torch._dynamo.reset()
    logits, target = stacked_case(dtype)

    def step(z):
        return fastrdrop.stacked_rdrop_loss(z * 1, target, backend=backend, label_smoothing=0.1)

    results = []
    for fn in (step, torch.compile(step, fullgraph=True)):
        taken.clear()
        z = logits.detach().clone().requires_grad_()
        fn(z).backward()
        assert taken == [logits.numel() * logits.element_size()]
        results.append(z.grad)
    torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=1e-6)
