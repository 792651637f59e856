"""Measuring one case: inputs, a correctness check, time (median, 20/80 quantiles), peak extra
memory, and the device copy that bandwidth is compared with."""

import contextlib
import gc
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

import fastrdrop

from benchmarks.providers import PROVIDERS

MODES = ("fwd", "fwd+bwd")


FAILED = "failed"  # the status of a case whose process raised or was killed


class WrongResult(Exception):
    """A provider's loss or gradients differ from the reference's: it is not timed."""


@dataclass(frozen=True)
class Case:
    n_tokens: int
    vocab_size: int
    dtype: str  # "bfloat16" | "float32" | "float16"
    provider: str
    mode: str  # "fwd" | "fwd+bwd"
    hidden_size: int = 0  # 0: the provider takes logits; H: two hidden states and [V, H]

    def min_bytes(self) -> int:
        # I/O floor: read each input once (fwd); also write each input's gradient once (fwd+bwd).
        # Inputs: z1, z2 [N, V]; or h1, h2 [N, H] and the weight [V, H].
        elem = torch.finfo(getattr(torch, self.dtype)).bits // 8
        n, v, h = self.n_tokens, self.vocab_size, self.hidden_size
        elements = 2 * n * h + v * h if h else 2 * n * v
        return (1 if self.mode == "fwd" else 2) * elements * elem


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_inputs(case, device, seed=0):
    """(inputs, target) of the case's provider: two dropout-like passes of logits, stacked in
    one tensor or apart, or of hidden states with an output embedding; labels with none
    ignored, so that every provider agrees. Drawn on the device: on the host, the largest GPU
    cases take most of a minute and tens of GB."""
    gen = torch.Generator(device=device).manual_seed(seed)
    n, v, h = case.n_tokens, case.vocab_size, case.hidden_size
    if h:
        h1 = torch.empty((n, h), device=device).normal_(generator=gen)
        h2 = torch.empty((n, h), device=device).normal_(generator=gen).mul_(0.1).add_(h1)
        weight = torch.empty((v, h), device=device).normal_(generator=gen).mul_(3.0 / h ** 0.5)
        inputs = (h1, h2, weight)
    else:
        z = torch.empty((2 * n, v), device=device)
        z1, z2 = z[:n], z[n:]
        z1.normal_(generator=gen).mul_(3.0)
        z2.normal_(generator=gen).mul_(0.5).add_(z1)
        pair = PROVIDERS[case.provider].inputs == "pair"
        inputs = (z1.clone(), z2.clone()) if pair else (z,)  # a pair: two tensors of their own
    target = torch.randint(0, v, (n,), generator=gen, device=device)
    dtype = getattr(torch, case.dtype)
    return tuple(t.to(dtype) for t in inputs), target


def call_once(fn, case, inputs, target):
    """One call: the loss (fwd), or the gradients of every input (fwd+bwd)."""
    if case.mode == "fwd":
        with torch.no_grad():
            return fn(*inputs, target)
    leaves = [t.requires_grad_() for t in inputs]
    return torch.autograd.grad(fn(*leaves, target), leaves)


def fresh_inputs(case, provider, inputs):
    """Inputs for one call: in-place providers get copies, since they overwrite the logits."""
    return tuple(t.clone() if provider.inplace else t.detach() for t in inputs)


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
    them on free, and what it and fastrdrop's buffers hold freed goes back now: a new tensor is
    then new resident memory, never memory an earlier call freed."""
    import ctypes

    fastrdrop.buffers.release()
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD
    libc.malloc_trim(0)


def peak_extra_bytes(fn, case, provider, inputs, target, device):
    """Peak memory one call adds on top of its inputs, the returned gradients included. CPU: the
    resident set of this process (its peak is reset first), so run one provider per process."""
    fresh = fresh_inputs(case, provider, inputs)
    gc.collect()
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out = call_once(fn, case, fresh, target)
        synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        _release_freed_memory()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the peak resident set size (VmHWM) to the current one
        base = _current_rss()
        out = call_once(fn, case, fresh, target)
        peak = _peak_rss() - base
    del out
    return max(peak, 0)


@contextlib.contextmanager
def frozen_gc():
    """Within the block, Python's garbage collector skips every object made before it. A timed
    call's own allocations would otherwise set off collections that go through all of them
    (torch's, a compiled function's): one such took 1.3-1.6 ms inside one of the first timed
    calls of each benchmark process, where the in-place bf16 call at 256 x 32000 then measured
    4.2-4.5 ms instead of 2.7 (Zen 4 host). Collect before the warm-up calls that precede the
    block, not at its start: the call after a whole collection took 0.5 ms more. After the
    block, what the frozen calls left in reference cycles is collected at once."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.collect()


# Warm-up calls go on past the --warmup count for this long (MAX_WARMUP_CALLS in all at most):
# the first calls of a process on a new copy of the logits each (the in-place provider's inputs)
# ran slower, bf16 in place at 256 x 32000 from 3.1 ms to 2.4 ms over its first ten or so calls
# (Intel Xeon host, docs/performance.md "The machine"; measured at that size only), and two or
# three timed calls a round after two warm-up calls fell in that part. A training loop runs
# thousands.
WARMUP_SECONDS = 0.25
MAX_WARMUP_CALLS = 50


def warm_up(call, calls, seconds=WARMUP_SECONDS, clock=time.perf_counter):
    """call() `calls` times, then again until those further calls have run for `seconds`
    (MAX_WARMUP_CALLS calls in all at most). The clock starts after the first `calls`, whose
    first may compile or page memory in."""
    for _ in range(calls):
        call()
    start, done = clock(), calls
    while done < MAX_WARMUP_CALLS and clock() - start < seconds:
        call()
        done += 1


@contextlib.contextmanager
def warmed_up(call, calls, seconds=WARMUP_SECONDS):
    """The block of timed calls: the garbage collector collects, warm_up(call, calls, seconds)
    runs, then the block runs frozen (frozen_gc)."""
    gc.collect()
    warm_up(call, calls, seconds)
    with frozen_gc():
        yield


def time_calls(fn, case, provider, inputs, target, device, repeats, warmup,
               warmup_seconds=WARMUP_SECONDS):
    """Seconds per call, one sample per call; inputs are prepared outside the timed region. The
    warm-up calls come first: `warmup` of them, then more for warmup_seconds. The garbage
    collector collects before them, and skips what they made (compiled graphs, say) and all that
    came before during the timed calls (warmed_up)."""
    def seconds():
        fresh = fresh_inputs(case, provider, inputs)
        synchronize(device)
        start = time.perf_counter()
        out = call_once(fn, case, fresh, target)
        synchronize(device)
        elapsed = time.perf_counter() - start
        del out, fresh  # freed once the clock has stopped
        return elapsed

    with warmed_up(seconds, warmup, warmup_seconds):
        return [seconds() for _ in range(repeats)]


def time_copy(n_bytes, device, repeats):
    """Seconds of ``repeats`` device copies of n_bytes (each reads n_bytes, writes n_bytes),
    after two untimed ones."""
    src = torch.empty(n_bytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    samples = []
    for _ in range(repeats + 2):
        synchronize(device)
        start = time.perf_counter()
        dst.copy_(src)
        synchronize(device)
        samples.append(time.perf_counter() - start)
    return samples[2:]


def quantiles(samples):
    q = statistics.quantiles(samples, n=10, method="inclusive")
    return statistics.median(samples), q[1], q[7]  # median, 20%, 80%


def _reference(kind):
    """The eager reference for a provider's inputs (see benchmarks.providers)."""
    if kind == "stacked":
        return lambda logits, target: fastrdrop.reference.rdrop_loss(*logits.chunk(2), target)
    if kind == "pair":
        return fastrdrop.reference.rdrop_loss
    return lambda h1, h2, weight, target: fastrdrop.reference.rdrop_loss(
        h1 @ weight.t(), h2 @ weight.t(), target)


def _first_rows(kind, inputs, target, k):
    """The inputs and target of the first k tokens (rows are independent)."""
    k = min(k, len(target))
    if kind == "stacked":
        (logits,) = inputs
        n = logits.shape[0] // 2
        return (torch.cat([logits[:k], logits[n:n + k]]),), target[:k]
    if kind == "pair":
        return tuple(t[:k] for t in inputs), target[:k]
    h1, h2, weight = inputs
    return (h1[:k], h2[:k], weight), target[:k]


def check_against_eager(fn, case, provider, inputs, target):
    """Before it is timed, the provider must give the reference's loss and, for fwd+bwd, its
    gradients (except a provider known to drop part of the gradient, which says so)."""
    reference = _reference(provider.inputs)
    with torch.no_grad():
        got = fn(*(t.clone() for t in inputs), target).float()
        want = reference(*inputs, target).float()
    if not torch.allclose(got, want, rtol=2e-3, atol=1e-3):
        raise WrongResult(f"loss {got.item():.6g}, reference {want.item():.6g}")
    if case.mode == "fwd+bwd" and provider.full_gradient:
        # the reference's gradients on the first tokens only (the weight of the linear providers
        # whole): the check stays cheap next to the timing. The provider's of those tokens, and
        # for logits, those tokens' rows of its call at full size, the one that is timed (whose
        # kernels may take other paths: on CPU gradients of 8 MiB or more are streamed)
        few, few_target = _first_rows(provider.inputs, inputs, target, 16)
        want = call_once(reference, case, tuple(t.detach().clone() for t in few), few_target)
        checks = [call_once(fn, case, fresh_inputs(case, provider, few), few_target)]
        if provider.inputs != "linear":
            whole = call_once(fn, case, fresh_inputs(case, provider, inputs), target)
            # a mean over N tokens: the rows' gradients are k / N of those of the k tokens
            per_token = len(target) / len(few_target)
            checks.append(tuple(g * per_token for g in _first_rows(provider.inputs, whole, target,
                                                                     len(few_target))[0]))
        for got in checks:
            for g, w in zip(got, want, strict=True):
                scale = w.abs().max().item()
                if not torch.allclose(g.float(), w.float(), rtol=2e-2, atol=1e-2 * scale):
                    raise WrongResult("gradients differ from the reference's")


def timings(case, samples_ms):
    """A row's time fields from its samples (ms): median, 20% and 80% quantiles, GB/s."""
    median, q20, q80 = quantiles(samples_ms)
    return dict(samples_ms=list(samples_ms), median_ms=median, q20_ms=q20, q80_ms=q80,
                gbps=case.min_bytes() / median * 1e3 / 1e9)


def measure(cases, device, repeats, warmup=2, first=True):
    """One row of results per case: times, memory, bandwidth; or a status saying why not. On CPU
    every case is timed before any memory is measured: that measurement changes how glibc serves
    later allocations (_release_freed_memory), which would slow the timing of later cases.
    first=False: a later round of cases measured before, which times them alone (no check
    against the reference, no memory)."""
    rows, memory_later = [], []
    for case in cases:
        provider = PROVIDERS[case.provider]
        try:
            fn = provider.make()
            inputs, target = make_inputs(case, device)
            if first:
                check_against_eager(fn, case, provider, inputs, target)
            samples = time_calls(fn, case, provider, inputs, target, device, repeats, warmup)
            row = dict(asdict(case), status="ok", **timings(case, [t * 1e3 for t in samples]),
                       input_mib=sum(t.numel() * t.element_size() for t in inputs) / 2**20)
            if first and device.type == "cpu":
                memory_later.append((row, fn, case, provider))
            elif first:
                row["peak_extra_mib"] = peak_extra_bytes(fn, case, provider, inputs, target,
                                                         device) / 2**20
        except torch.OutOfMemoryError:
            row = dict(asdict(case), status="out of memory")
        except WrongResult as error:
            row = dict(asdict(case), status=f"wrong result: {error}")
        finally:
            inputs = target = None  # free before the next case allocates its own
        rows.append(row)
    for row, fn, case, provider in memory_later:
        inputs, target = make_inputs(case, device)
        row["peak_extra_mib"] = peak_extra_bytes(fn, case, provider, inputs, target,
                                                 device) / 2**20
    return rows


def measure_in_subprocess(cases, device, repeats, warmup=2, first=True):
    """measure() of the cases in one fresh process, so that the peak resident memory of a case
    is its own and not that of another provider (the cases share a provider and sizes)."""
    args = json.dumps(dict(cases=[asdict(c) for c in cases], device=str(device), repeats=repeats,
                           warmup=warmup, first=first))
    done = subprocess.run([sys.executable, "-m", "benchmarks.measure", args],
                          capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    if done.returncode == 0:
        return json.loads(done.stdout.strip().splitlines()[-1])
    # A row that says so, and the error on the console: the run goes on, and fails at its end
    print(done.stderr, file=sys.stderr)
    why = _exception_line(done.stderr) or f"exit status {done.returncode}"
    if done.returncode < 0:  # a signal: SIGKILL where the OS ran out of memory
        why = f"killed by signal {-done.returncode}"
    return [dict(asdict(case), status=f"{FAILED}: {why}") for case in cases]


def _exception_line(stderr: str) -> str:
    """The "Type: message" line of the last traceback in stderr ("" where there is none): the
    first line after its frames, which are indented (warnings printed later come after it)."""
    lines = stderr.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent")]
    after = lines[starts[-1] + 1:] if starts else []
    return next((line for line in after if line and not line[0].isspace()), "")


def environment(device):
    """What every result file names: device, versions, commit, date."""
    versions = {}
    for package in ("triton", "liger_kernel"):
        try:
            versions[package] = importlib.metadata.version(package.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    # FASTRDROP_COMMIT names the commit of a copied tree whose .git is not its own
    commit = os.environ.get("FASTRDROP_COMMIT") or _commit_of(
        Path(fastrdrop.__file__).resolve().parent.parent)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{cpu_name()}, {torch.get_num_threads()} threads"
    return dict(device=name, device_type=device.type, torch=torch.__version__,
                triton=versions["triton"], liger_kernel=versions["liger_kernel"],
                fastrdrop=fastrdrop.__version__,
                backend=fastrdrop.loss.default_backend(device), python=platform.python_version(),
                commit=commit, date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))


def _commit_of(root: Path) -> str:
    """The commit of the fastrdrop measured, where ``root`` is the top of its git checkout (an
    installed or editable fastrdrop may be another tree than the benchmarks'); "-dirty": the tree
    holds changes that no commit has, but for results (a run rewrites its own files)."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)

    try:
        top = git("rev-parse", "--show-toplevel")
        if top.returncode or Path(top.stdout.strip()).resolve() != root:
            return "unknown"
        commit = git("rev-parse", "--short=7", "HEAD").stdout.strip()
        if not commit:  # no commit yet
            return "unknown"
        changed = git("diff", "--quiet", "HEAD", "--", ".", ":(exclude)benchmarks/results")
    except OSError:  # no git
        return "unknown"
    return commit + ("-dirty" if changed.returncode else "")


def cpu_name(cpuinfo="/proc/cpuinfo"):
    """The CPU's model name. Where it has no model number (a virtual machine may show just
    "AMD EPYC"), with the family and model numbers, which tell its generations apart."""
    fields = {}
    try:
        with open(cpuinfo) as f:
            for line in f:
                if not line.strip():
                    break  # the first processor's fields only
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or "CPU"
    if not any(c.isdigit() for c in name) and "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    return name


if __name__ == "__main__":
    torch._dynamo.config.fail_on_recompile_limit_hit = True  # not a compile row timing eager
    request = json.loads(sys.argv[1])
    device = torch.device(request["device"])
    print(json.dumps(measure([Case(**c) for c in request["cases"]], device, request["repeats"],
                             request["warmup"], request["first"])))
