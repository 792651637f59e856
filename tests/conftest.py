"""Test set-up. Without a GPU, the Triton kernels run under Triton's interpreter: TRITON_INTERPRET
must be set before anything imports triton, so it is set here, before fastrdrop is imported."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from fastrdrop import _native, ops  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def fused_backends() -> list:
    """The fused backends, each a pytest param, skipped with the reason where it cannot run:
    Triton (on CPU under the interpreter) and the native kernel (on CPU)."""
    reasons = {
        "triton": ops.triton_unavailable_reason(DEVICE),
        "native": "the native kernel runs on CPU tensors" if DEVICE.type != "cpu"
        else _native.unavailable_reason(),
    }
    return [pytest.param(name, marks=pytest.mark.skipif(reason is not None, reason=str(reason)))
            for name, reason in reasons.items()]


@pytest.fixture(autouse=True)
def _seed(request):
    # Fresh inputs every run (never zeros); the seed is printed on failure to replay a case.
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    request.node.user_properties.append(("seed", seed))
    yield
