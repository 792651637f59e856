"""pytest-benchmark suite: ``pytest benchmarks --benchmark-only``. Each provider, forward and
forward+backward, one size per device (the runner ``python -m benchmarks`` sweeps the grid);
the linear providers take hidden states of size H and a [V, H] weight."""

import pytest
import torch

from benchmarks.measure import (
    MODES,
    Case,
    call_once,
    check_against_eager,
    fresh_inputs,
    make_inputs,
    synchronize,
    warmed_up,
)
from benchmarks.providers import PROVIDERS

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SIZES = [(8192, 128256, "bfloat16")] if DEVICE.type == "cuda" else [(128, 32000, "float32")]
HIDDEN = 4096 if DEVICE.type == "cuda" else 256


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"N{s[0]}-V{s[1]}-{s[2]}")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(PROVIDERS))
def test_rdrop(benchmark, name, mode, size):
    provider = PROVIDERS[name]
    reason = provider.unavailable(DEVICE)
    if reason is not None:
        pytest.skip(reason)
    if mode == "fwd" and provider.grad_only:
        pytest.skip("without grad it is another provider's call")
    case = Case(*size, name, mode, HIDDEN if provider.inputs == "linear" else 0)
    fn = provider.make()
    inputs, target = make_inputs(case, DEVICE)
    check_against_eager(fn, case, provider, inputs, target)  # a wrong result is not timed

    def setup():  # outside the timed call: in-place providers get fresh copies of the logits
        fresh = fresh_inputs(case, provider, inputs)
        synchronize(DEVICE)  # the copies made before the timer starts
        return (fresh,), {}

    def timed(fresh):
        out = call_once(fn, case, fresh, target)
        synchronize(DEVICE)  # the GPU's work counts, not just its launch
        return out

    # I/O floor: read z1 and z2 once (fwd); also write dz1 and dz2 once (fwd+bwd)
    benchmark.extra_info.update(device=str(DEVICE), min_bytes=case.min_bytes(),
                                torch=torch.__version__)
    with warmed_up(lambda: timed(*setup()[0]), 1):  # as the runner times its calls
        benchmark.pedantic(timed, setup=setup, rounds=5)
