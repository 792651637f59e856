"""Calls that returned a wrong number without an error, or failed late with an internal message:
second-order gradients, labels of any integer width, empty and meta batches, fp8 logits, module
keywords checked at construction, and exported modules' backward."""

import copy
import functools
import math

import pytest
import torch

import fastrdrop
from fastrdrop import _common

from conftest import DEVICE, fused_backends
from inputs import labels, logits_pair

BACKENDS = [*fused_backends(), "torch"]


@pytest.mark.parametrize("backend", fused_backends())
@pytest.mark.parametrize("mode", ["default", "parts", "bf16", "inplace", "linear"])
def test_create_graph_is_refused_by_the_fused_backends(backend, mode):
    # the fused backward passes are kernels: with create_graph=True their gradients would come
    # back without a graph, and a gradient penalty would silently lose their part. default:
    # gradients made in the forward pass; parts, bf16: in the backward pass
    dtype = torch.bfloat16 if mode == "bf16" else torch.float32
    z1, z2 = (z.requires_grad_() for z in logits_pair((3, 40), dtype))
    target = labels((3,), 40)
    if mode == "linear":
        weight = torch.randn(40, 40, device=DEVICE)
        loss = fastrdrop.linear_rdrop_loss(z1, z2, weight, target, backend=backend)
    else:
        loss = fastrdrop.rdrop_loss(z1 * 1, z2 * 1, target, backend=backend,
                                    inplace_backward=mode == "inplace",
                                    return_parts=mode == "parts")
        loss = loss.loss if mode == "parts" else loss
    with pytest.raises(RuntimeError, match="create_graph"):
        torch.autograd.grad(loss, (z1, z2), create_graph=True)


def test_create_graph_works_with_the_reference():
    z1, z2 = (z.requires_grad_() for z in logits_pair((3, 40), torch.float64))
    target = labels((3,), 40)
    loss = fastrdrop.rdrop_loss(z1, z2, target, backend="torch", label_smoothing=0.1)
    g1, _ = torch.autograd.grad(loss, (z1, z2), create_graph=True)
    (h1,) = torch.autograd.grad(g1.square().sum(), z1)  # a gradient penalty's gradient
    assert torch.isfinite(h1).all() and h1.abs().sum() > 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.int16, torch.int32],
                         ids=str)
def test_labels_of_any_integer_width(backend, dtype):
    # The labels count as int64: V (past int16) and ignore_index (-100, 156 in uint8) do not
    # wrap to the labels' dtype.
    vocab = 40_000
    z1, z2 = logits_pair((4, vocab), torch.float32)
    top = min(vocab - 1, torch.iinfo(dtype).max)
    ignored = -100 if dtype.is_signed else 0
    target = torch.tensor([top, 156 % (top + 1), 1, ignored], device=z1.device)
    got = fastrdrop.rdrop_loss(z1, z2, target.to(dtype), backend=backend, return_parts=True)
    want = fastrdrop.rdrop_loss(z1, z2, target, backend=backend, return_parts=True)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("inplace", [False, True])
def test_empty_batches(backend, inplace):
    # [B, 0, V]: no token, a loss of 0 and an empty gradient, in place or not
    z = torch.randn(4, 0, 30, device=DEVICE, requires_grad=True)
    loss = fastrdrop.stacked_rdrop_loss(z * 1, torch.zeros(2, 0, dtype=torch.long,
                                                           device=DEVICE),
                                        backend=backend, inplace_backward=inplace)
    (grad,) = torch.autograd.grad(loss, z)
    assert loss.item() == 0.0 and grad.shape == z.shape


@pytest.mark.parametrize("label_check", [False, True])
def test_meta_tensors_give_shapes(label_check, monkeypatch):
    # as F.cross_entropy does: shape propagation without data, labels included, even with the
    # label check forced on (it once read a meta label: "Tensor.item() cannot be called")
    monkeypatch.setitem(_common._LABEL_CHECK, "always", label_check)
    z1, z2 = (torch.empty(2, 3, 50, device="meta") for _ in range(2))
    h1, h2, weight = (torch.empty(*shape, device="meta") for shape in ((6, 8), (6, 8), (50, 8)))
    target = torch.empty(2, 3, dtype=torch.long, device="meta")
    for reduction, shape in (("mean", ()), ("none", (2, 3))):
        for loss in (fastrdrop.rdrop_loss(z1, z2, target, reduction=reduction),
                     fastrdrop.stacked_rdrop_loss(torch.cat([z1, z2]), target,
                                                  reduction=reduction),
                     fastrdrop.linear_rdrop_loss(h1, h2, weight, target.reshape(6),
                                                 reduction=reduction).reshape(shape)):
            assert loss.device.type == "meta" and loss.shape == shape


def test_fp8_logits_are_a_type_error():
    z = torch.randn(2, 10).to(torch.float8_e4m3fn)
    with pytest.raises(TypeError, match=r"logits1 must be a floating-point tensor \(float32"):
        fastrdrop.rdrop_loss(z, z)


@pytest.mark.parametrize("module", [fastrdrop.RDropLoss, fastrdrop.StackedRDropLoss,
                                    fastrdrop.LinearRDropLoss])
@pytest.mark.parametrize(("keyword", "value", "error"), [
    ("alpha", -1.0, ValueError), ("reduction", "avg", ValueError),
    ("label_smoothing", 1.5, ValueError), ("ignore_index", 1.0, TypeError),
    ("softcap", 0.0, ValueError), ("backend", "cuda", ValueError),
    ("vocab_parallel_group", "world", TypeError), ("return_parts", 1, TypeError),
])
def test_modules_check_their_keywords_at_construction(module, keyword, value, error):
    with pytest.raises(error, match=keyword):
        module(**{keyword: value})


@pytest.mark.parametrize("module", [fastrdrop.RDropLoss, fastrdrop.StackedRDropLoss,
                                    fastrdrop.LinearRDropLoss])
def test_module_reprs_name_every_keyword(module):
    text = repr(module())
    for keyword in ("alpha", "ignore_index", "reduction", "label_smoothing", "softcap",
                    "return_parts", "backend", "vocab_parallel_group"):
        assert f"{keyword}=" in text, (keyword, text)
    if module is not fastrdrop.LinearRDropLoss:
        assert "inplace_backward=" in text


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("stacked", [False, True])
def test_exported_module_backward(backend, stacked):
    # torch.export keeps the custom op in its graph: the op's own autograd gives the gradients
    z1, z2 = logits_pair((2, 3, 50), torch.float32)
    target = labels((2, 3), 50)
    module = (fastrdrop.StackedRDropLoss if stacked else fastrdrop.RDropLoss)(
        alpha=0.7, backend=backend)
    inputs = (torch.cat([z1, z2]),) if stacked else (z1, z2)
    exported = torch.export.export(module, (*inputs, target)).module()
    grads = []
    for fn in (module, exported):
        leaves = [t.clone().requires_grad_() for t in inputs]
        loss = fn(*leaves, target)
        grads.append((loss.detach(), *torch.autograd.grad(loss, leaves)))
    for eager, exported_result in zip(*grads, strict=True):
        torch.testing.assert_close(exported_result, eager, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_keywords_must_be_finite(backend):
    # checked by comparisons now (math.isfinite cannot be traced by torch.compile)
    check = functools.partial(fastrdrop.rdrop_loss, backend=backend)
    z1, z2 = logits_pair((3, 20), torch.float32)
    with pytest.raises(ValueError, match="alpha must be finite"):
        check(z1, z2, alpha=float("nan"))
    with pytest.raises(ValueError, match="label_smoothing must be finite"):
        check(z1, z2, label_smoothing=float("inf"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_softcap_is_a_normal_float32(backend):
    # The kernels take it as a float32, where 1e-50 is 0 (no softcap) and 1e39 is inf; the
    # native one multiplies by 1 / c, subnormal above 2^126 (0 where denormals are flushed).
    z1, z2 = logits_pair((4, 20), torch.float32)
    target = labels((4,), 20)
    for value in (1e-50, 1e39, 2.0 ** 126 * 1.01):
        with pytest.raises(ValueError, match="softcap must be None or > 0, a normal float32"):
            fastrdrop.rdrop_loss(z1, z2, target, softcap=value, backend=backend)
    # the smallest: every logit becomes +-1.2e-38, both distributions uniform
    loss = fastrdrop.rdrop_loss(z1, z2, target, softcap=torch.finfo(torch.float32).tiny,
                                backend=backend, reduction="none")
    want = torch.where(target != -100, 2 * math.log(20), 0.0)
    torch.testing.assert_close(loss, want.to(loss.device))


@pytest.mark.parametrize("backend", BACKENDS)
def test_negated_views_are_read_as_their_values(backend):
    # A view with torch's negative bit holds -values in its storage, which the kernels read.
    z1, z2 = (z.requires_grad_() for z in logits_pair((3, 50), torch.float32))
    target = labels((3,), 50)
    negated = torch._neg_view(-z1)  # the values of z1
    assert negated.is_neg()
    got = fastrdrop.rdrop_loss(negated, z2, target, backend=backend)
    want = fastrdrop.rdrop_loss(z1, z2, target, backend=backend)
    torch.testing.assert_close(got, want)
    for g, w in zip(torch.autograd.grad(got, (z1, z2)), torch.autograd.grad(want, (z1, z2)),
                    strict=True):
        torch.testing.assert_close(g, w)
    if backend != "torch":
        with pytest.raises(ValueError, match="logits1 must not be a negated view"):
            fastrdrop.rdrop_loss(negated, z2 * 1, target, backend=backend, inplace_backward=True)


def test_a_copy_of_a_compiled_loss_module_runs_its_own_settings():
    # copy.deepcopy of the module forms shares a process group (which cannot be copied); the
    # copy must not keep the compiled call of the original's (nn.Module's state leaves it out)
    loss = fastrdrop.RDropLoss(alpha=1.0, backend="torch")
    loss.compile(backend="eager")
    twin = copy.deepcopy(loss)
    twin.alpha = 0.0
    z1, z2 = logits_pair((4, 20), torch.float32)
    target = labels((4,), 20)
    torch.testing.assert_close(twin(z1, z2, target),
                               fastrdrop.rdrop_loss(z1, z2, target, alpha=0.0, backend="torch"))
