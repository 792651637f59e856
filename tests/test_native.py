"""The native CPU kernel: determinism across thread counts, vectorised code, and what happens
where it was not built. (Its correctness runs in the shared matrix of test_fused.py.)"""

import ctypes
import platform
import shutil
import subprocess
import types
import warnings

import pytest
import torch

import fastrdrop
from fastrdrop import _native

import inputs
from inputs import labels, logits_pair
from oracle import loss_and_grads, oracle_loss
from test_fused import DTYPES, check_case

needs_native = pytest.mark.skipif(_native.unavailable_reason() is not None,
                                  reason=str(_native.unavailable_reason()))


@pytest.fixture(autouse=True)
def _cpu_inputs(monkeypatch):
    # The native kernel runs on CPU tensors, on a machine with a GPU too.
    monkeypatch.setattr(inputs, "DEVICE", torch.device("cpu"))


def forward_backward(z1, z2, target, threads, inplace=False, **kwargs):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
        loss = fastrdrop.rdrop_loss(a, b, target, backend="native", inplace_backward=inplace,
                                    **kwargs)
        return (loss, *torch.autograd.grad(loss, (a, b)))
    finally:
        torch.set_num_threads(previous)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("inplace", [False, True])
def test_bit_identical_with_one_and_two_threads(dtype, inplace):
    # Rows are independent and each is summed in a fixed order: the thread count changes nothing.
    z1, z2 = logits_pair((7, 5000), dtype, masked=0.05)
    target = labels((7,), 5000, logits=z1)
    kwargs = dict(label_smoothing=0.1, softcap=30.0, reduction="sum")
    one = forward_backward(z1, z2, target, 1, inplace, **kwargs)
    two = forward_backward(z1, z2, target, 2, inplace, **kwargs)
    for x, y in zip(one, two, strict=True):
        assert torch.equal(x, y)


# The kernel's vector loops step 16 words at a time, with the rest under a mask and a 16-bit
# row's odd last element apart: vocabularies around those sizes and past a block (2048), in both
# modes (16-bit logits in the default mode take the backward pass's loop), with smoothing, and
# with -inf entries (absent positions, which the loops must leave at 0).
# From 8 MiB of gradients the AVX-512 loops write them around the caches into their buffer
# (rdrop.cpp, Options::stream): whole 64-byte lines of rows that start on one, the rest as
# before. Rows are independent, so the rows of a call too small to stream are the same bits.
# V=32768: every row streamed; V=32024 (bf16 rows of 64048 bytes): the first row streamed up to
# its masked tail, the others not aligned. fp16 takes the backward pass's loop, and bf16 with an
# upstream gradient other than 1 rewrites its rows there.
@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("vocab_size", [32768, 32024])
@pytest.mark.parametrize("upstream", [1.0, 0.5])
def test_gradients_written_around_the_caches(dtype, vocab_size, upstream):
    n_rows = 72  # 2 x 72 x 32768 bf16 elements: 9 MiB
    z1, z2 = logits_pair((n_rows, vocab_size), dtype)
    target = labels((n_rows,), vocab_size, logits=z1)

    def grad(rows):
        z = torch.cat([z1[rows], z2[rows]]).requires_grad_()
        loss = fastrdrop.stacked_rdrop_loss(z, target[rows], reduction="sum", backend="native")
        return torch.autograd.grad(loss * upstream, z)[0].chunk(2)

    streamed = grad(slice(None))
    for start in range(0, n_rows, 2):  # 2 x 2 rows: 256 KiB in bf16, written as before
        rows = slice(start, start + 2)
        for whole, few in zip(streamed, grad(rows), strict=True):
            assert torch.equal(whole[rows], few), f"rows {start}, {start + 1}"


@needs_native
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("vocab_size", [1, 2, 3, 31, 32, 33, 47, 2047, 2049, 4131])
def test_every_tail_of_the_vector_loops(dtype, vocab_size):
    cases = [(False, 0.0, 0.0), (False, 0.1, 0.2), (True, 0.1, 0.0), (True, 0.0, 0.2)]
    for inplace, label_smoothing, masked in cases:
        check_case("native", (3, vocab_size), dtype, ignored=0.0, masked=masked,
                   label_smoothing=label_smoothing, inplace=inplace)


@needs_native
def test_probabilities_to_the_rounding_of_fp32():
    # Away from the label, the cross entropy's gradient is p: its ratio to float64's p varies
    # over a row only by the kernel's exp (2.2e-7), by the rounding of z less the row's
    # reference (up to 4.8e-7: within 6 of the maximum, z less the log-sum-exp stays above -16)
    # and of a few products, together below 1.4e-6. The tolerance of the other tests would pass
    # an exp five times coarser. The first backward returns what the forward pass wrote from the
    # statistics pass's exponentials; a second one computes p again.
    z1, z2 = logits_pair((4, 5000), torch.float32)
    target = labels((4,), 5000, ignored=0.0)
    a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    loss = fastrdrop.rdrop_loss(a, b, target, alpha=0.0, reduction="sum", backend="native")
    (kept,) = torch.autograd.grad(loss, a, retain_graph=True)
    (again,) = torch.autograd.grad(loss, a)
    z = z1.double()
    p = torch.softmax(z, -1)
    checked = z - z.max(-1, keepdim=True).values > -6.0
    checked[torch.arange(4), target] = False
    for name, grad in (("kept", kept), ("again", again)):
        for row in range(4):
            ratio = grad[row, checked[row]].double() / p[row, checked[row]]
            assert ratio.max() / ratio.min() - 1 < 3e-6, (name, row)


@needs_native
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("scale", [1.0, 1024.0])
def test_gradient_of_a_likely_label_in_16_bit_rows(dtype, inplace, scale):
    # A likely label has the gradient p_y - 1, as small as 1 - p_y (here 1.5e-3 to 7.6e-2),
    # which is right only where p_y and the stats' log s agree. In place, the statistics pass of
    # 16-bit rows takes exp of degree 1 (6.0e-5) and the gradients come from its own
    # exponentials; elsewhere the backward pass computes p again (fp16; bf16 for an upstream
    # gradient other than 1) from the stats, which must then be as accurate as its exp (the
    # degree-1 exp in every statistics pass failed five of these eight cases). exp's error
    # (5.4e-6 at most, the portable loops') and the rounding to 16 bits (0.2%) stay below 1%.
    # The label sits past the first vocabulary block, whose maxima are the references.
    vocab_size, label = 8000, 7000
    z1 = 3.0 * torch.randn(32, vocab_size, dtype=torch.float64)
    others = torch.cat([z1[:, :label], z1[:, label + 1:]], 1).logsumexp(1)
    z1[:, label] = others + torch.linspace(2.5, 6.5, 32, dtype=torch.float64)  # log odds of p_y
    z2 = z1 + 0.1 * torch.randn(32, vocab_size, dtype=torch.float64)
    z1, z2 = z1.to(dtype), z2.to(dtype)
    target = torch.full((32,), label)
    _, *grads_want = loss_and_grads(oracle_loss, z1, z2, torch.tensor(scale), target=target,
                                    reduction="sum")
    a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    parts = fastrdrop.rdrop_loss(a, b, target, reduction="sum", backend="native",
                                 inplace_backward=inplace, return_parts=inplace)
    loss = parts.loss if inplace else parts
    grads = torch.autograd.grad(scale * loss, (a, b))
    for got, want in zip(grads, grads_want, strict=True):
        error = (got[:, label].double() - want[:, label]).abs() / want[:, label].abs()
        assert error.max() < 1e-2, error
    if inplace:
        ce_got = parts.ce1 + parts.ce2
        ce_want = oracle_loss(z1, z2, target, alpha=0.0, reduction="sum")
        assert (ce_got.double() - ce_want).abs() < 32 * 1.25e-4


@needs_native
def test_inner_loops_are_vectorised():
    # The library's code holds packed float arithmetic (SSE/AVX "...ps" on x86-64).
    if platform.machine() not in ("x86_64", "AMD64") or shutil.which("objdump") is None:
        pytest.skip("checks x86-64 code with objdump")
    library = next(p for p in _native._candidates() if p.is_file())
    code = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(library)],
                          capture_output=True, text=True, check=True).stdout
    packed = sum(1 for line in code.splitlines()
                 if any(op in line for op in ("mulps", "addps", "subps", "fmadd", "maxps")))
    assert packed > 200, f"only {packed} packed float instructions"


@needs_native
def test_a_library_that_cannot_load_gives_way_to_the_next(monkeypatch, tmp_path):
    # a stale or broken file first in the search (beside the sources) hid the good build after
    # it, and the advice to reinstall could not help: the reinstall never removes that file
    good = next(p for p in _native._candidates() if p.is_file())
    broken = tmp_path / _native.LIBRARY
    broken.write_bytes(b"not a shared library")
    monkeypatch.setattr(_native, "_candidates", lambda: iter([broken, broken, good]))
    _native._load.cache_clear()
    try:
        lib, reason = _native._load()
        assert lib is not None and reason is None
        monkeypatch.setattr(_native, "_candidates", lambda: iter([broken]))
        _native._load.cache_clear()
        lib, reason = _native._load()
        assert lib is None and reason.startswith(f"{broken} could not be loaded")
    finally:
        monkeypatch.undo()
        _native._load.cache_clear()
    assert _native._load()[0] is not None


def test_a_built_kernel_loads():
    # Where the install built the library, it loads: else every native test would skip, and a
    # run without the kernel would pass. (On Linux the loader also reads the CPU's features.)
    notes = [path.with_name("_native_build.txt") for path in _native._candidates()]
    if not any(note.is_file() and note.read_text().strip() == "built" for note in notes):
        pytest.skip("the install did not build the native kernel")
    assert _native.unavailable_reason() is None


@needs_native
@pytest.mark.skipif(platform.system() != "Linux" or platform.machine() != "x86_64",
                    reason="compares cpuid with Linux's /proc/cpuinfo on x86-64")
def test_the_features_cpuid_finds_are_those_linux_names():
    # the loader takes the CPU's features from cpuid (bit positions in the library's table):
    # each one it finds is one that Linux names too, so no bit is misplaced
    lib = _native._load()[0]
    with open("/proc/cpuinfo") as cpuinfo:
        flags = next(line for line in cpuinfo if line.startswith("flags")).split(":")[1].split()
    detected = _native._cpu_features(lib)
    assert detected and detected <= set(flags), sorted(detected - set(flags))


class _Symbol:
    """A stand-in for a function of the library, as ctypes gives it."""

    def __init__(self, value):
        self.value, self.restype = value, None

    def __call__(self):
        return self.value


def test_features_from_the_cpuinfo_of_aarch64(monkeypatch, tmp_path):
    # Off x86-64 the library detects nothing (NULL) and the loader reads the "Features" line
    # that Linux writes on AArch64: a build for sve is refused on a CPU without it
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nBogoMIPS\t: 243.75\nFeatures\t: fp asimd evtstrm aes "
                       "atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp ssbs\n"
                       "CPU implementer\t: 0x41\n")
    monkeypatch.setattr(_native, "open", lambda path: open(cpuinfo), raising=False)
    lib = types.SimpleNamespace(fastrdrop_cpu_detected=_Symbol(None),
                                fastrdrop_cpu_features=_Symbol(b"atomics asimddp sve "))
    assert {"atomics", "asimdhp", "asimddp"} <= _native._cpu_features(lib)
    assert _native._missing_features(lib) == ["sve"]
    cpuinfo.write_text("processor\t: 0\n")  # nothing to tell: nothing is refused
    assert _native._cpu_features(lib) is None and _native._missing_features(lib) == []


@needs_native
def test_a_build_for_features_this_cpu_lacks_is_refused(monkeypatch):
    # A library built with -march=native for another CPU would die there of an illegal
    # instruction; the loader refuses it, naming what is missing and how to build one that runs
    lib = _native._load()[0]
    lib.fastrdrop_cpu_features.restype = ctypes.c_char_p
    built_for = lib.fastrdrop_cpu_features().decode().split()
    if not built_for:
        pytest.skip("a portable build needs nothing beyond the architecture's baseline")
    monkeypatch.setattr(_native, "_cpu_features", lambda lib: frozenset(built_for[1:]))
    _native._load.cache_clear()
    try:
        lib, reason = _native._load()
        assert lib is None
        assert f"built for CPU features that this CPU lacks ({built_for[0]})" in reason
        assert "FASTRDROP_NATIVE_ARCH=OFF" in reason
    finally:
        monkeypatch.undo()
        _native._load.cache_clear()
    assert _native._load()[0] is not None


def test_fallback_when_not_built(monkeypatch):
    # Without the library: auto warns once, naming why, and runs the reference; native refuses.
    reason = "not built: no C++ compiler was found when fastrdrop was installed"
    monkeypatch.setattr(_native, "unavailable_reason", lambda: reason)
    fastrdrop.loss._warn_once.cache_clear()
    z1, z2 = logits_pair((3, 40), torch.float32)
    target = labels((3,), 40)
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler") as record:
        loss = fastrdrop.rdrop_loss(z1, z2, target)
    assert record[0].filename == __file__  # shown at the caller's line
    torch.testing.assert_close(loss, fastrdrop.reference.rdrop_loss(z1, z2, target))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastrdrop.rdrop_loss(z1, z2, target)  # once only
    with pytest.raises(ValueError, match="backend='native' cannot run here.*no C\\+\\+ compiler"):
        fastrdrop.rdrop_loss(z1, z2, target, backend="native")
    fastrdrop.loss._warn_once.cache_clear()
    compiled = torch.compile(fastrdrop.stacked_rdrop_loss, fullgraph=True)
    try:
        for loss_fn in (fastrdrop.StackedRDropLoss(), compiled):
            with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler") as record:
                loss_fn(torch.cat([z1, z2]), target)  # through nn.Module's call, and compiled
            assert record[0].filename == __file__
            fastrdrop.loss._warn_once.cache_clear()
    finally:
        torch._dynamo.reset()  # the graph holds the backend as a constant: no later test's
