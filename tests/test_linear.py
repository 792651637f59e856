"""linear_rdrop_loss against the float64 oracle on hidden @ weight.T + bias, by the rule of
tests/oracle.py, for the loss and the gradients of hidden1, hidden2, weight and bias."""

import pytest
import torch

import fastrdrop
from fastrdrop import linear, ops, reference

from conftest import DEVICE, fused_backends
from inputs import labels
from oracle import assert_oracle_rule, oracle_loss

BACKENDS = [*fused_backends(), "torch"]
N, H, V = 37, 67, 1271  # H=67, V=1271: not powers of 2; N=37: not a multiple of the chunk


def linear_inputs(dtype, with_bias, frozen_weight, n_rows=N):
    h1 = torch.randn(n_rows, H, dtype=torch.float64)
    h2 = h1 + 0.1 * torch.randn_like(h1)
    weight = torch.randn(V, H, dtype=torch.float64) / H ** 0.5 * 3
    bias = torch.randn(V, dtype=torch.float64) if with_bias else None
    tensors = [t.to(DEVICE, dtype) for t in (h1, h2, weight)] + [
        None if bias is None else bias.to(DEVICE, dtype)]
    trainable = [True, True, not frozen_weight, with_bias]
    return tensors, trainable


def loss_and_grads(fn, tensors, trainable, grad_output, dtype=None):
    leaves = [None if t is None else t.detach().clone().to(dtype or t.dtype).requires_grad_(r)
              for t, r in zip(tensors, trainable, strict=True)]
    loss = fn(*leaves)
    wanted = [t for t in leaves if t is not None and t.requires_grad]
    grads = iter(torch.autograd.grad(loss, wanted, grad_output.to(loss.dtype)))
    return [loss.detach()] + [next(grads) if t is not None and t.requires_grad else None
                              for t in leaves]


def check_linear(backend, dtype, *, reduction="mean", has_target=True, label_smoothing=0.0,
                 softcap=None, with_bias=False, frozen_weight=False, chunk_size=8):
    tensors, trainable = linear_inputs(dtype, with_bias, frozen_weight)
    target = labels((N,), V) if has_target else None
    kwargs = dict(alpha=0.8, reduction=reduction, label_smoothing=label_smoothing,
                  softcap=softcap)

    def fused(h1, h2, w, b):
        return fastrdrop.linear_rdrop_loss(h1, h2, w, target, b, chunk_size=chunk_size,
                                           backend=backend, **kwargs)

    def eager(h1, h2, w, b, loss=reference.rdrop_loss):  # matmul (bias inside), then the loss
        z1, z2 = (h @ w.t() if b is None else torch.addmm(b, h, w.t()) for h in (h1, h2))
        return loss(z1, z2, target, **kwargs)

    def truth(h1, h2, w, b):
        return eager(h1, h2, w, b, loss=oracle_loss)

    shape = (N,) if reduction == "none" else ()
    grad_output = (torch.rand(shape) + 0.5).to(DEVICE)
    results = [loss_and_grads(fused, tensors, trainable, grad_output),
               loss_and_grads(eager, tensors, trainable, grad_output),
               loss_and_grads(truth, tensors, trainable, grad_output, torch.float64)]
    for what, f, e, t in zip(("loss", "dhidden1", "dhidden2", "dweight", "dbias"), *results,
                             strict=True):
        assert (f is None) == (t is None), what
        if f is not None:
            assert f.dtype == (torch.float32 if what == "loss" else dtype), what
            assert_oracle_rule(f, e, t, dtype, what)
    return results[0]


COVERING = [  # reduction, has_target, label_smoothing, softcap, with_bias, frozen_weight
    ("mean", True, 0.1, 30.0, True, False),
    ("sum", False, 0.0, None, False, False),
    ("none", True, 0.0, 30.0, True, True),
    ("batchmean", True, 0.1, None, False, True),
    ("none", False, 0.1, None, True, False),
    ("mean", True, 0.0, None, False, False),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", COVERING, ids=lambda c: "-".join(map(str, c)))
def test_linear_matches_oracle(backend, dtype, case):
    reduction, has_target, label_smoothing, softcap, with_bias, frozen_weight = case
    check_linear(backend, dtype, reduction=reduction, has_target=has_target,
                 label_smoothing=label_smoothing, softcap=softcap, with_bias=with_bias,
                 frozen_weight=frozen_weight)


@pytest.mark.parametrize("backend", BACKENDS)
def test_default_chunk_size_and_leading_dims(backend):
    # chunk_size=None picks a size; [B, T, H] inputs give [B, T] per-token losses.
    tensors, _ = linear_inputs(torch.float32, True, False, n_rows=2 * 19)
    h1, h2, w, b = tensors
    target = labels((2, 19), V)
    loss = fastrdrop.linear_rdrop_loss(h1.view(2, 19, H), h2.view(2, 19, H), w, target, b,
                                       reduction="none", backend=backend)
    expected = reference.rdrop_loss(h1 @ w.t() + b, h2 @ w.t() + b, target.view(-1),
                                    reduction="none").view(2, 19)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)


def test_chunk_size_rule(monkeypatch):
    # about N H / V rows as a power of 2, at least 64, at most the rows there are, and at most
    # a quarter of the free memory for the chunk's logits and their fp32 copies
    monkeypatch.setattr(linear, "_free_memory", lambda device: 64 << 30)
    assert linear.default_chunk_size(4096, 1024, 32000, torch.float32, DEVICE) == 256
    assert linear.default_chunk_size(16384, 4096, 128256, torch.bfloat16, DEVICE) == 1024
    assert linear.default_chunk_size(100_000, 64, 32000, torch.float32, DEVICE) == 256
    assert linear.default_chunk_size(10, 1024, 32000, torch.float32, DEVICE) == 10
    monkeypatch.setattr(linear, "_free_memory", lambda device: 1 << 30)
    per_row = 2 * 128256 * (2 + 4)
    assert linear.default_chunk_size(16384, 4096, 128256, torch.bfloat16, DEVICE) == (
        (1 << 30) // 4 // per_row)


def forbid(monkeypatch, name, what):
    """A call of linear.<name> fails the test, saying ``what`` happened."""
    def fail(*args):
        raise AssertionError(what)

    monkeypatch.setattr(linear, name, fail)


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_weight_skips_its_gradient(backend, monkeypatch):
    # No weight gradient is computed at all when the head is frozen (LoRA fine-tuning).
    forbid(monkeypatch, "_add_matmul_", "weight gradient computed for a frozen weight")
    (h1, h2, w, _), _ = linear_inputs(torch.float32, False, True)
    h1.requires_grad_()
    loss = fastrdrop.linear_rdrop_loss(h1, h2, w, labels((N,), V), backend=backend,
                                       chunk_size=16)
    loss.backward()
    assert h1.grad is not None and w.grad is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_gradient_without_grad(backend, monkeypatch):
    # torch.no_grad (an eval loop): the loss alone, though the inputs require grad
    forbid(monkeypatch, "_gradients_into_logits", "gradients computed under torch.no_grad")
    (h1, h2, w, _), _ = linear_inputs(torch.float32, False, False)
    target = labels((N,), V)
    with torch.no_grad():
        loss = fastrdrop.linear_rdrop_loss(*(t.requires_grad_() for t in (h1, h2, w)), target,
                                           backend=backend, chunk_size=16)
    want = reference.rdrop_loss(h1 @ w.t(), h2 @ w.t(), target)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_parts_and_module(backend):
    tensors, _ = linear_inputs(torch.float32, True, False)
    h1, h2, w, b = tensors
    target = labels((N,), V)
    module = fastrdrop.LinearRDropLoss(alpha=0.5, return_parts=True, chunk_size=10,
                                       backend=backend)
    parts = module(h1, h2, w, target, b)
    expected = reference.rdrop_loss(h1 @ w.t() + b, h2 @ w.t() + b, target, alpha=0.5,
                                    return_parts=True)
    for got, want in zip(parts, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert "chunk_size=10" in repr(module)


@pytest.mark.parametrize("change, error, words", [
    (lambda a: a.update(weight=a["weight"][:, :-1]), ValueError, "weight must have shape"),
    (lambda a: a.update(weight=a["weight"].double()), TypeError, "weight must have hidden1's"),
    (lambda a: a.update(bias=torch.zeros(3)), ValueError, "bias must have shape"),
    (lambda a: a.update(hidden2=a["hidden2"][:-1]), ValueError, "hidden2 must have the same"),
    (lambda a: a.update(target=a["target"][:-1]), ValueError, "target must have shape"),
    (lambda a: a.update(chunk_size=0), ValueError, "chunk_size"),
    (lambda a: a.update(reduction="avg"), ValueError, "reduction"),
    (lambda a: a.update(return_parts=1), TypeError, "return_parts must be True or False"),
    (lambda a: a.update(weight=a["weight"].to_sparse()), TypeError, "weight must be a dense"),
    (lambda a: a.update(bias=torch.zeros(V).to_sparse()), TypeError, "bias must be a dense"),
    (lambda a: a.update(backend="triton", **{k: a[k].double()
                                             for k in ("hidden1", "hidden2", "weight")}),
     TypeError, "hidden1 must be float32"),
])
def test_bad_input(change, error, words):
    (h1, h2, w, _), _ = linear_inputs(torch.float32, False, False)
    args = dict(hidden1=h1, hidden2=h2, weight=w, target=labels((N,), V))
    change(args)
    with pytest.raises(error, match=words):
        fastrdrop.linear_rdrop_loss(**args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_second_backward(backend):
    # scalar reductions: gradients made in the forward serve once; "none" recomputes, so twice is
    # fine and gives the same gradients
    (h1, h2, w, _), _ = linear_inputs(torch.float32, False, False)
    h1.requires_grad_()
    target = labels((N,), V)
    loss = fastrdrop.linear_rdrop_loss(h1, h2, w, target, backend=backend, chunk_size=16)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="already used"):
        loss.backward()
    rows = fastrdrop.linear_rdrop_loss(h1, h2, w, target, backend=backend, reduction="none")
    first, = torch.autograd.grad(rows.sum(), h1, retain_graph=True)
    second, = torch.autograd.grad(rows.sum(), h1)
    torch.testing.assert_close(first, second)


@pytest.mark.parametrize("backend", BACKENDS)
def test_create_graph_is_refused_with_a_remedy_that_works(backend):
    # the chunks' gradients carry no graph on any backend; the message sent users of
    # backend='torch' to backend='torch'
    h1, h2 = torch.randn(2, 4, 8, device=DEVICE, requires_grad=True)
    weight = torch.randn(16, 8, device=DEVICE, requires_grad=True)
    target = torch.randint(0, 16, (4,), device=DEVICE)
    loss = fastrdrop.linear_rdrop_loss(h1, h2, weight, target, backend=backend)
    with pytest.raises(RuntimeError, match=r"create_graph.*rdrop_loss\(\.\.\., backend='torch'\)"):
        torch.autograd.grad(loss, (h1, h2, weight), create_graph=True)
    # that remedy: the matmul, then the reference
    loss = fastrdrop.rdrop_loss(h1 @ weight.t(), h2 @ weight.t(), target, backend="torch")
    (g,) = torch.autograd.grad(loss, (h1,), create_graph=True)
    g.square().sum().backward()
    assert weight.grad is not None and torch.isfinite(weight.grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("autocast", [False, True], ids=["fp16", "fp32-under-autocast"])
def test_fp16_gradients_see_the_loss_scale(backend, autocast):
    # fp16 training scales the loss (GradScaler) so that gradients such as p / N stay above fp16's
    # smallest numbers: the fused gradients must take that scale before they are rounded to fp16.
    # Against float64, as close as matmul + rdrop_loss, whose fp16 gradients wait for it too (with
    # the scale applied after rounding, over twice as far). Near-uniform probabilities of
    # 512 x 8192 logits: most p / N lie below fp16's normal numbers.
    if backend == "triton" and ops.triton_interpreted():
        pytest.skip("1024 rows of 8192 logits take minutes under the interpreter; the loss "
                    "scale is applied in linear.py, the same for every backend")
    n, h, v, scale = 512, 32, 8192, 2.0 ** 16
    h1 = torch.randn(n, h, dtype=torch.float64)
    h2 = h1 + 0.1 * torch.randn_like(h1)
    w = torch.randn(v, h, dtype=torch.float64) * 0.2
    target = labels((n,), v).to(DEVICE)
    exact = [t.to(DEVICE).requires_grad_() for t in (h1, h2, w)]
    truth = torch.autograd.grad(reference.rdrop_loss(exact[0] @ exact[2].T, exact[1] @ exact[2].T,
                                                     target), exact)

    def unscaled_grads(fn):
        leaves = [t.to(DEVICE, torch.float32 if autocast else torch.float16).requires_grad_()
                  for t in (h1, h2, w)]
        with torch.autocast(DEVICE.type, dtype=torch.float16, enabled=autocast):
            loss = fn(*leaves)
        return [g.double() / scale for g in torch.autograd.grad(loss * scale, leaves)]

    fused = unscaled_grads(lambda a, b, c: fastrdrop.linear_rdrop_loss(
        a, b, c, target, backend=backend, chunk_size=64))
    composed = unscaled_grads(lambda a, b, c: fastrdrop.rdrop_loss(
        a @ c.T, b @ c.T, target, backend=backend))
    for name, got, near, want in zip(("dh1", "dh2", "dW"), fused, composed, truth, strict=True):
        error = [((g - want).norm() / want.norm()).item() for g in (got, near)]
        assert error[0] <= 1.5 * error[1], (name, error)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dtype, cast", [(torch.bfloat16, torch.bfloat16),
                                         (torch.float16, torch.float16),
                                         (torch.bfloat16, torch.float16),
                                         (torch.float16, torch.bfloat16)], ids=str)
def test_a_float32_head_beside_16_bit_hidden_states_under_autocast(backend, reduction, dtype,
                                                                   cast):
    # mixed precision keeps the head's weight and bias in fp32 beside 16-bit hidden states:
    # autocast casts both for the matmul, as it does in the composition (which this was refused
    # against, naming weight), also to the other 16-bit dtype (a bf16 model under CUDA's default
    # fp16 autocast: torch.cat of the passes' rows had refused it). Each gradient in its input's
    # dtype, as close to float64 as the composition's
    n, h, v = 64, 32, 500
    gen = torch.Generator().manual_seed(0)
    h1 = torch.randn(n, h, generator=gen, dtype=torch.float64)
    h2 = h1 + 0.1 * torch.randn(n, h, generator=gen, dtype=torch.float64)
    w = 0.3 * torch.randn(v, h, generator=gen, dtype=torch.float64)
    b = 0.1 * torch.randn(v, generator=gen, dtype=torch.float64)
    target = labels((n,), v).to(DEVICE)
    exact = [t.to(DEVICE).requires_grad_() for t in (h1, h2, w, b)]
    truth = torch.autograd.grad(reference.rdrop_loss(
        torch.addmm(exact[3], exact[0], exact[2].T), torch.addmm(exact[3], exact[1], exact[2].T),
        target, alpha=0.7, reduction=reduction).sum(), exact)

    def grads(fn):
        leaves = [t.to(DEVICE, dtype if i < 2 else torch.float32).requires_grad_()
                  for i, t in enumerate((h1, h2, w, b))]
        with torch.autocast(DEVICE.type, dtype=cast):
            loss = fn(*leaves).sum()
        return torch.autograd.grad(loss, leaves)

    fused = grads(lambda a, c, weight, bias: fastrdrop.linear_rdrop_loss(
        a, c, weight, target, bias, alpha=0.7, reduction=reduction, chunk_size=16,
        backend=backend))
    composed = grads(lambda a, c, weight, bias: fastrdrop.rdrop_loss(
        torch.addmm(bias, a, weight.T), torch.addmm(bias, c, weight.T), target, alpha=0.7,
        reduction=reduction, backend=backend))
    for name, got, near, want in zip(("dh1", "dh2", "dW", "db"), fused, composed, truth,
                                     strict=True):
        assert got.dtype == near.dtype, name
        error = [((g.double() - want).norm() / want.norm()).item() for g in (got, near)]
        assert error[0] <= 1.5 * error[1], (name, error)
    with pytest.raises(TypeError, match="weight must have hidden1's dtype"):  # no autocast
        fastrdrop.linear_rdrop_loss(h1.to(DEVICE, dtype), h2.to(DEVICE, dtype),
                                    w.to(DEVICE, torch.float32), target, backend=backend)


def test_float64_stays_float64():
    # float64 hidden states (the torch backend) give a float64 loss, parts and gradients, as
    # rdrop_loss does for float64 logits: nothing is rounded to fp32 on the way
    (h1, h2, w, b), _ = linear_inputs(torch.float64, True, False)
    target = labels((N,), V)
    leaves = [t.requires_grad_() for t in (h1, h2, w, b)]
    got = fastrdrop.linear_rdrop_loss(*leaves[:3], target, leaves[3], reduction="batchmean",
                                      chunk_size=8, return_parts=True)
    want = reference.rdrop_loss(torch.addmm(b, h1, w.T), torch.addmm(b, h2, w.T), target,
                                reduction="batchmean", return_parts=True)
    for part, expected in zip(got, want, strict=True):
        assert part.dtype == torch.float64
        torch.testing.assert_close(part, expected, rtol=1e-12, atol=1e-12)
    for a, e in zip(torch.autograd.grad(got.loss, leaves), torch.autograd.grad(want.loss, leaves),
                    strict=True):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)
