"""Measuring one case: inputs, a correctness check, time (median, 20/80 quantiles), peak extra
memory, and the device copy that bandwidth is compared with."""

import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

import torch

import fastrdrop

from benchmarks.providers import PROVIDERS

MODES = ("fwd", "fwd+bwd")


@dataclass(frozen=True)
class Case:
    n_tokens: int
    vocab_size: int
    dtype: str  # "bfloat16" | "float32" | "float16"
    provider: str
    mode: str  # "fwd" | "fwd+bwd"

    def min_bytes(self) -> int:
        # I/O floor: read z1 and z2 once (fwd); also write dz1 and dz2 once (fwd+bwd)
        elem = torch.finfo(getattr(torch, self.dtype)).bits // 8
        tensors = 2 if self.mode == "fwd" else 4
        return tensors * self.n_tokens * self.vocab_size * elem


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_inputs(case, device, seed=0):
    """Two dropout-like passes of logits and labels (none ignored: every provider agrees)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    shape = (case.n_tokens, case.vocab_size)
    z1 = torch.randn(shape, generator=gen, dtype=torch.float32).mul_(3.0)
    z2 = torch.randn(shape, generator=gen, dtype=torch.float32).mul_(0.5).add_(z1)
    target = torch.randint(0, case.vocab_size, (case.n_tokens,), generator=gen)
    dtype = getattr(torch, case.dtype)
    return z1.to(device, dtype), z2.to(device, dtype), target.to(device)


def call_once(fn, case, z1, z2, target):
    if case.mode == "fwd":
        with torch.no_grad():
            return fn(z1, z2, target)
    a, b = z1.requires_grad_(), z2.requires_grad_()
    loss = fn(a, b, target)
    return torch.autograd.grad(loss, (a, b))


def fresh_inputs(case, provider, z1, z2):
    """Inputs for one call: in-place providers get copies, since they overwrite the logits."""
    if provider.inplace:
        return z1.clone(), z2.clone()
    return z1.detach(), z2.detach()


def _current_rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _release_freed_memory():
    """From now on glibc serves every allocation of 64 KiB or more with its own pages and returns
    them on free, and what it holds freed goes back now: a new tensor is then new resident
    memory, never memory an earlier call freed."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD
    libc.malloc_trim(0)


def peak_extra_bytes(fn, case, provider, z1, z2, target, device):
    """Peak memory one call adds on top of its inputs, the returned gradients included. CPU: the
    resident set of this process (its peak is reset first), so run one case per process."""
    a, b = fresh_inputs(case, provider, z1, z2)
    gc.collect()
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out = call_once(fn, case, a, b, target)
        synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        _release_freed_memory()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the peak resident set size (VmHWM) to the current one
        base = _current_rss()
        out = call_once(fn, case, a, b, target)
        peak = _peak_rss() - base
    del out
    return max(peak, 0)


def time_calls(fn, case, provider, z1, z2, target, device, repeats, warmup=2):
    """Seconds per call, one sample per call; inputs are prepared outside the timed region."""
    samples = []
    for i in range(warmup + repeats):
        a, b = fresh_inputs(case, provider, z1, z2)
        synchronize(device)
        start = time.perf_counter()
        out = call_once(fn, case, a, b, target)
        synchronize(device)
        if i >= warmup:
            samples.append(time.perf_counter() - start)
        del out, a, b
    return samples


def time_copy(n_bytes, device, repeats):
    """Median seconds of a device copy of n_bytes (reads n_bytes, writes n_bytes)."""
    src = torch.empty(n_bytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    samples = []
    for _ in range(repeats + 2):
        synchronize(device)
        start = time.perf_counter()
        dst.copy_(src)
        synchronize(device)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples[2:])


def quantiles(samples):
    q = statistics.quantiles(samples, n=10, method="inclusive")
    return statistics.median(samples), q[1], q[7]  # median, 20%, 80%


def check_against_eager(fn, case, z1, z2, target):
    """The provider must compute the same loss as the reference before it is timed."""
    with torch.no_grad():
        got = fn(z1.clone(), z2.clone(), target).float()
        want = fastrdrop.reference.rdrop_loss(z1, z2, target).float()
    if not torch.allclose(got, want, rtol=2e-3, atol=1e-3):
        raise AssertionError(f"{case.provider} loss {got.item()} != reference {want.item()}")


def measure(case, device, repeats):
    """One row of results for ``case``: times, memory, bandwidth; or a status saying why not."""
    provider = PROVIDERS[case.provider]
    row = asdict(case)
    try:
        fn = provider.make()
        z1, z2, target = make_inputs(case, device)
        check_against_eager(fn, case, z1, z2, target)
        samples = time_calls(fn, case, provider, z1, z2, target, device, repeats)
        peak = peak_extra_bytes(fn, case, provider, z1, z2, target, device)  # after the timing
    except torch.OutOfMemoryError:
        return dict(row, status="out of memory")
    median, q20, q80 = quantiles(samples)
    return dict(row, status="ok", median_ms=median * 1e3, q20_ms=q20 * 1e3, q80_ms=q80 * 1e3,
                peak_extra_mib=peak / 2**20, gbps=case.min_bytes() / median / 1e9,
                input_mib=2 * z1.numel() * z1.element_size() / 2**20)


def measure_in_subprocess(cases, device, repeats):
    """measure() of each case in one fresh process, so that the peak resident memory of a case
    is its own and not that of another provider (the cases share a provider and sizes)."""
    args = json.dumps(dict(cases=[asdict(c) for c in cases], device=str(device), repeats=repeats))
    done = subprocess.run([sys.executable, "-m", "benchmarks.measure", args], check=True,
                          capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def environment(device):
    """What every result file names: device, versions, commit, date."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{_cpu_name()}, {torch.get_num_threads()} threads"
    return dict(device=name, device_type=device.type, torch=torch.__version__,
                triton=triton_version, fastrdrop=fastrdrop.__version__,
                backend=fastrdrop.loss.default_backend(device), python=platform.python_version(),
                commit=commit, date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "CPU"


if __name__ == "__main__":
    request = json.loads(sys.argv[1])
    device = torch.device(request["device"])
    print(json.dumps([measure(Case(**c), device, request["repeats"]) for c in request["cases"]]))
