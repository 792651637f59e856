"""Property test: hypothesis draws shapes, dtypes, ignore patterns and keywords; the fused path
must agree with the reference by the oracle rule of tests/oracle.py."""

import functools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastrdrop

from conftest import DEVICE, fused_backends
from oracle import FLOOR, assert_oracle_rule, loss_and_grads, native_floor, oracle_loss


@st.composite
def cases(draw):
    batch_shape = tuple(draw(st.lists(st.integers(0, 4), min_size=1, max_size=2)))
    vocab_size = draw(st.integers(1, 700))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    spread = draw(st.floats(0.1, 8.0))
    z1 = spread * torch.randn(batch_shape + (vocab_size,), dtype=torch.float64)
    z2 = z1 + draw(st.floats(0.0, 2.0)) * torch.randn_like(z1)
    target = None
    if draw(st.booleans()):
        target = torch.randint(0, vocab_size, batch_shape)
        ignore_index = draw(st.sampled_from([-100, 0, 7]))
        ignored = torch.rand(batch_shape) < draw(st.sampled_from([0.0, 0.3, 1.0]))
        target[ignored] = ignore_index
        target = target.to(DEVICE)
    else:
        ignore_index = -100
    kwargs = dict(
        alpha=draw(st.floats(0.0, 5.0)),
        ignore_index=ignore_index,
        reduction=draw(st.sampled_from(["mean", "sum", "none", "batchmean"])),
        label_smoothing=draw(st.sampled_from([0.0, 0.05, 0.3])),
        softcap=draw(st.sampled_from([None, 2.0, 30.0])),
    )
    return z1.to(DEVICE, dtype), z2.to(DEVICE, dtype), target, kwargs


@pytest.mark.parametrize("backend", fused_backends())
@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(case=cases())
def test_fused_agrees_with_reference(backend, case):
    z1, z2, target, kwargs = case
    grad_output = torch.rand(z1.shape[:-1] if kwargs["reduction"] == "none" else ()) + 0.5
    grad_output = grad_output.to(DEVICE)
    fused = loss_and_grads(functools.partial(fastrdrop.rdrop_loss, target=target,
                                             backend=backend, **kwargs), z1, z2, grad_output)
    eager = loss_and_grads(functools.partial(fastrdrop.reference.rdrop_loss, target=target,
                                             **kwargs), z1, z2, grad_output)
    truth = loss_and_grads(functools.partial(oracle_loss, target=target, **kwargs),
                           z1.double(), z2.double(), grad_output)
    floor = FLOOR if backend != "native" else native_floor(  # grad_output < 1.5
        z1, z2, kwargs["alpha"], 1.5, kwargs["reduction"], target, kwargs["ignore_index"])
    for what, f, e, t in zip(("loss", "dlogits1", "dlogits2"), fused, eager, truth, strict=True):
        assert_oracle_rule(f, e, t, z1.dtype, what, floor=floor)
