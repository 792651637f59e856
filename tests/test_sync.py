"""The GPU path never waits for the GPU (DESIGN.md section 8): no value is read back to the host in
forward or backward, a bad label becomes NaN instead of an error, and on CUDA the loss runs under
``torch.cuda.set_sync_debug_mode("error")`` and inside a captured CUDA graph.

On CPU the Triton kernels run under the interpreter, which reads its arguments on the host; the
guard below lets the kernel launches do so and forbids everything around them.
"""

import contextlib
import os
import subprocess
import sys

import pytest
import torch

import fastrdrop
from fastrdrop import _common, reference, triton_kernels

from conftest import DEVICE
from inputs import labels, logits_pair
from oracle import assert_oracle_rule, loss_and_grads, oracle_loss

N, V = 4, 300
# the Tensor methods through which a value reaches the host (bool() and int() included)
HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _labels_unchecked(monkeypatch):
    # the default, whatever FASTRDROP_CHECK_LABELS says in this environment
    monkeypatch.setitem(_common._LABEL_CHECK, "always", False)


class _Launching:
    """Stands in for a kernel of fastrdrop.triton_kernels and marks its launches."""

    def __init__(self, kernel, inside):
        self.kernel, self.inside = kernel, inside

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.inside.append(True)
            try:
                return self.kernel[grid](*args, **kwargs)
            finally:
                self.inside.pop()

        return launch


@contextlib.contextmanager
def no_host_reads():
    """Within: reading a tensor's value on the host raises, except inside a kernel launch."""
    inside = []
    with pytest.MonkeyPatch.context() as patch:
        for name in HOST_READS:
            patch.setattr(torch.Tensor, name, _guarded(getattr(torch.Tensor, name), name, inside))
        for name, kernel in vars(triton_kernels).items():
            if name.endswith("_kernel"):  # the @triton.jit kernels that the launchers run
                patch.setattr(triton_kernels, name, _Launching(kernel, inside))
        yield


def _guarded(method, name, inside):
    def guarded(self, *args, **kwargs):
        if not inside:
            raise AssertionError(f"Tensor.{name}() on the GPU path: a device-to-host sync")
        return method(self, *args, **kwargs)

    return guarded


def _loss_calls():
    """(id, fn(z1, z2, y) -> loss) over the options of both APIs."""
    calls = []
    for reduction in ("mean", "sum", "none", "batchmean"):
        for inplace in (False, True):
            calls.append((f"rdrop_loss-{reduction}-inplace={inplace}", dict(
                reduction=reduction, inplace_backward=inplace, label_smoothing=0.1,
                softcap=30.0)))
    calls.append(("rdrop_loss-no-target", dict(target=None)))
    calls.append(("rdrop_loss-parts", dict(return_parts=True)))
    for reduction in ("mean", "none"):
        calls.append((f"linear_rdrop_loss-{reduction}", dict(linear=True, reduction=reduction)))
    return calls


def _forward_backward(call, grad_scale, dtype, guard):
    """Runs one of _loss_calls() forward and backward inside ``guard``; returns the leaves."""
    kwargs = dict(call[1])
    linear = kwargs.pop("linear", False)
    z1, z2 = logits_pair((N, V), dtype)
    y = kwargs.pop("target", labels((N,), V))
    if linear:
        hidden = 16
        h1, h2 = (torch.randn(N, hidden, device=DEVICE, dtype=dtype, requires_grad=True)
                  for _ in range(2))
        weight = torch.randn(V, hidden, device=DEVICE, dtype=dtype, requires_grad=True)
        leaves = (h1, h2, weight)
    else:
        leaf = torch.cat([z1, z2]).requires_grad_()
        leaves = (leaf,)
    scale = torch.full((N,) if kwargs.get("reduction") == "none" else (), grad_scale,
                       device=DEVICE)
    with guard():
        if linear:
            loss = fastrdrop.linear_rdrop_loss(h1, h2, weight, y, backend="triton", **kwargs)
        else:
            logits = leaf * 1
            loss = fastrdrop.rdrop_loss(logits[:N], logits[N:], y, backend="triton", **kwargs)
        loss = loss.loss if isinstance(loss, fastrdrop.RDropParts) else loss
        loss.backward(scale)
    return leaves


@pytest.mark.skipif(DEVICE.type == "cpu" and not fastrdrop.ops.triton_interpreted(),
                    reason="Triton cannot run here")
@pytest.mark.parametrize("grad_scale", [1.0, 2.5])
@pytest.mark.parametrize("call", _loss_calls(), ids=[c[0] for c in _loss_calls()])
def test_triton_path_reads_nothing_back(call, grad_scale):
    leaves = _forward_backward(call, grad_scale, torch.float32, no_host_reads)
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in leaves)


def _bad_label_case():
    z1, z2 = logits_pair((6, 200), torch.float32)
    y = labels((6,), 200, ignored=0.0)
    y[1], y[3], y[5] = 200, -1, -100  # past V, negative but not ignore_index, ignored
    return z1, z2, y


def _check_bad_label_rows(fn):
    """fn(z1, z2, y, reduction) -> loss: tokens 1 and 3 (labels outside [0, V)) get a NaN loss and
    NaN gradient rows, token 5 (ignored) 0, and the others their values without the bad ones."""
    z1, z2, y = _bad_label_case()
    loss, g1, g2 = loss_and_grads(fn, z1, z2, torch.ones(6, device=DEVICE), target=y,
                                  reduction="none")
    good = torch.tensor([0, 2, 4])
    assert loss[[1, 3]].isnan().all() and (loss[5] == 0)
    assert g1[[1, 3]].isnan().all() and g2[[1, 3]].isnan().all()
    assert (g1[5] == 0).all() and (g2[5] == 0).all()
    ref, r1, r2 = loss_and_grads(reference.rdrop_loss, z1[good], z2[good],
                                 torch.ones(3, device=DEVICE), target=y[good], reduction="none")
    for fused, eager in ((loss[good], ref), (g1[good], r1), (g2[good], r2)):
        torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-6)
    mean, _, _ = loss_and_grads(fn, z1, z2, torch.tensor(1.0, device=DEVICE), target=y)
    assert mean.isnan()


@pytest.mark.skipif(DEVICE.type == "cpu" and not fastrdrop.ops.triton_interpreted(),
                    reason="Triton cannot run here")
@pytest.mark.parametrize("inplace", [False, True])
def test_triton_out_of_range_label_is_nan_not_an_error(inplace):
    def fn(a, b, target, reduction="mean"):
        logits = torch.cat([a, b]) * 1  # an activation, as in-place mode expects
        return fastrdrop.rdrop_loss(logits[:len(a)], logits[len(a):], target, backend="triton",
                                    reduction=reduction, inplace_backward=inplace)

    _check_bad_label_rows(fn)


def test_reference_unchecked_out_of_range_label_is_nan(monkeypatch):
    # what the torch backend does on GPU, where labels are not read back
    monkeypatch.setattr(_common, "labels_checked", lambda target, backend: False)

    def fn(a, b, target, reduction="mean"):
        return reference.rdrop_loss(a, b, target, reduction=reduction)

    _check_bad_label_rows(fn)


def test_label_check_switch_from_the_environment():
    # FASTRDROP_CHECK_LABELS=1 makes the Triton path read the labels: a ValueError, not NaN
    code = ("import torch, fastrdrop\n"
            "z = torch.randn(2, 10)\n"
            "try:\n"
            "    fastrdrop.rdrop_loss(z, z + 1, torch.tensor([3, 10]), backend='triton')\n"
            "except ValueError as error:\n"
            "    print('raised:', error)\n")
    env = dict(os.environ, FASTRDROP_CHECK_LABELS="1", TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert "raised: target has labels outside [0, V=10)" in out.stdout, out.stdout + out.stderr


def test_set_label_check_takes_a_bool():
    with pytest.raises(TypeError, match="enabled must be a bool"):
        fastrdrop.set_label_check(1)


# ---------------------------------------------------------------------------------------------
# On a CUDA GPU


@contextlib.contextmanager
def _sync_debug_error():
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("call", _loss_calls(), ids=[c[0] for c in _loss_calls()])
def test_cuda_forward_and_backward_do_not_synchronize(call, dtype):
    _forward_backward(call, 2.5, dtype, contextlib.nullcontext)  # compiles the kernels
    _forward_backward(call, 2.5, dtype, _sync_debug_error)


@cuda_only
@pytest.mark.parametrize("inplace", [False, True])
def test_cuda_graph_replay_matches_eager(inplace):
    n, vocab = 32, 3000
    z1, z2 = logits_pair((n, vocab), torch.float32)
    y = labels((n,), vocab)
    static = torch.cat([z1, z2]).requires_grad_()

    def step():
        logits = static * 1
        loss = fastrdrop.rdrop_loss(logits[:n], logits[n:], y, label_smoothing=0.1,
                                    inplace_backward=inplace)
        return (loss, *torch.autograd.grad(loss, static))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()

    for _ in range(2):  # new inputs in the captured buffers, then a replay
        n1, n2 = logits_pair((n, vocab), torch.float32)
        with torch.no_grad():
            static.copy_(torch.cat([n1, n2]))
        graph.replay()
        eager = step()
        for replayed, expected in zip(captured, eager, strict=True):
            torch.testing.assert_close(replayed, expected, rtol=1e-6, atol=1e-6)


@cuda_only
@pytest.mark.parametrize("inplace", [False, True])
def test_more_than_2_31_elements(inplace):
    # N * V > 2^31 in each of z1, z2: row offsets past int32 in the forward, the backward (or the
    # in-place pass and its scaling), checked against the oracle on sampled rows
    n, vocab = 16500, 131072
    if torch.cuda.mem_get_info()[0] < 24 * 2**30:
        pytest.skip("needs 24 GiB of free GPU memory")
    z1, z2 = (torch.randn(n, vocab, device=DEVICE, dtype=torch.bfloat16).mul_(2.0)
              for _ in range(2))
    y = torch.randint(0, vocab, (n,), device=DEVICE)
    rows = torch.tensor([0, 1, n // 2, n - 2, n - 1], device=DEVICE)
    s1, s2 = z1[rows].clone(), z2[rows].clone()
    z1.requires_grad_()
    z2.requires_grad_()
    loss = fastrdrop.rdrop_loss(z1, z2, y, reduction="none", inplace_backward=inplace)
    grad_output = torch.full_like(loss, 2.0)  # not 1: the in-place scaling runs on every row
    loss.backward(grad_output)
    fused = (loss.detach()[rows], z1.grad[rows], z2.grad[rows])
    del z1, z2, loss
    upstream = grad_output[: len(rows)]
    eager = loss_and_grads(reference.rdrop_loss, s1, s2, upstream, target=y[rows],
                           reduction="none")
    truth = loss_and_grads(oracle_loss, s1.double(), s2.double(), upstream.double(),
                           target=y[rows], reduction="none")
    for what, f, e, t in zip(("loss", "dz1", "dz2"), fused, eager, truth, strict=True):
        assert_oracle_rule(f, e, t, torch.bfloat16, what)


@pytest.mark.parametrize("kind", ["cuda", "xpu"])
def test_launches_go_to_the_tensors_device(kind):
    # Triton launches on the current device: the launchers make the tensors' device current,
    # on XPU as on CUDA (a tensor on another XPU than the current one went to the current one)
    from fastrdrop import ops

    guard = ops._device_guard(torch.device(kind, 1))
    assert isinstance(guard, getattr(torch, kind).device) and guard.idx == 1
