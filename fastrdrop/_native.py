"""ctypes loader of the native CPU kernel (kernels/cpu, built by CMake into this package) and its
launchers, with the same signatures as the Triton launchers in ops.py."""

import ctypes
import functools
import importlib.metadata
import sys
from pathlib import Path
from typing import Optional

import torch

LIBRARY = {"linux": "libfastrdrop_cpu.so", "darwin": "libfastrdrop_cpu.dylib"}.get(
    sys.platform, "fastrdrop_cpu.dll")
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

_i64, _int, _float, _ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_float, ctypes.c_void_p
ABI_VERSION = 8  # fastrdrop_cpu_abi_version() of a library with these signatures
_SIGNATURES = {
    # z1, z2, stride1, stride2, dtype, n_rows, vocab, target, ignore_index, eps, softcap,
    # then forward: row_weight, alpha, dz1, dz2, dstride1, dstride2, parts, stats;
    # backward: stats, grad_parts, upstream, upstream_stride, dz1, dz2, dstride1, dstride2;
    # then the number of threads
    "fastrdrop_cpu_forward": [_ptr, _ptr, _i64, _i64, _int, _i64, _i64, _ptr, _i64, _float,
                              _float, _ptr, _float, _ptr, _ptr, _i64, _i64, _ptr, _ptr, _int],
    "fastrdrop_cpu_backward": [_ptr, _ptr, _i64, _i64, _int, _i64, _i64, _ptr, _i64, _float,
                               _float, _ptr, _ptr, _ptr, _i64, _ptr, _ptr, _i64, _i64, _int],
    # z1, z2, stride1, stride2, dtype, n_rows, vocab, smoothing, softcap, partials, threads
    "fastrdrop_cpu_partials": [_ptr, _ptr, _i64, _i64, _int, _i64, _i64, _int, _float, _ptr,
                               _int],
}


def _candidates():
    """Where the build may have put the library: beside this file, in every folder of the
    package (an editable install keeps the sources and the built files apart), and wherever
    the installed distribution's file list says."""
    package = sys.modules[__package__]
    folders = [Path(__file__).parent, *map(Path, getattr(package, "__path__", []))]
    yield from (folder / LIBRARY for folder in folders)
    try:
        files = importlib.metadata.files("fastrdrop") or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    yield from (Path(f.locate()) for f in files if f.name == LIBRARY)


def _build_note() -> Optional[str]:
    for library in _candidates():
        note = library.with_name("_native_build.txt")
        if note.is_file() and note.read_text().strip() != "built":
            return note.read_text().strip()
    return None


def _cpu_features(lib) -> Optional[frozenset]:
    """This CPU's features as Linux names them in /proc/cpuinfo: on x86-64 those the library
    finds with cpuid (what -march=native saw, where a kernel may not name every flag); else
    the "Features" (AArch64) or "flags" of /proc/cpuinfo; None where neither tells."""
    lib.fastrdrop_cpu_detected.restype = ctypes.c_char_p
    detected = lib.fastrdrop_cpu_detected()
    if detected is not None:
        return frozenset(detected.decode().split())
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        pass
    return None


def _missing_features(lib) -> list:
    """The CPU features the library was built for (-march) that this CPU lacks: calling it
    there would kill the process with an illegal instruction."""
    have = _cpu_features(lib)
    lib.fastrdrop_cpu_features.restype = ctypes.c_char_p
    built_for = lib.fastrdrop_cpu_features().decode().split()
    return [] if have is None else [name for name in built_for if name not in have]


@functools.lru_cache(maxsize=None)
def _load():
    """(library, None) or (None, why it is unavailable). A candidate that cannot be loaded, or a
    stale build, gives way to the next one: a stale file beside the sources would otherwise hide
    the build that a reinstall made elsewhere."""
    refused = []
    for path in dict.fromkeys(_candidates()):  # in order, each once
        if not path.is_file():
            continue
        try:
            lib = ctypes.CDLL(str(path))
        except OSError as error:
            refused.append(f"{path} could not be loaded: {error}")
            continue
        version = getattr(lib, "fastrdrop_cpu_abi_version", lambda: 1)()
        if version != ABI_VERSION:
            refused.append(f"{path} is a stale build (ABI {version}, this fastrdrop needs "
                           f"{ABI_VERSION}): reinstall fastrdrop to rebuild it, and remove it "
                           "if it is not where the install puts the library")
            continue
        missing = _missing_features(lib)
        if missing:
            refused.append(f"{path} was built for CPU features that this CPU lacks "
                           f"({' '.join(missing)}): reinstall fastrdrop on this machine, or "
                           "with -C cmake.define.FASTRDROP_NATIVE_ARCH=OFF for a portable build")
            continue
        for name, argtypes in _SIGNATURES.items():
            getattr(lib, name).argtypes = argtypes
            getattr(lib, name).restype = _int
        lib.fastrdrop_cpu_first_bad_label.argtypes = [_ptr, _i64, _i64, _i64]
        lib.fastrdrop_cpu_first_bad_label.restype = _i64
        return lib, None
    if refused:
        return None, "; ".join(refused)
    note = _build_note()
    return None, f"not built: {note}" if note else f"{LIBRARY} was not found"


@torch.compiler.assume_constant_result  # fixed for the process: no file look-up while tracing
def unavailable_reason() -> Optional[str]:
    """Why the native CPU kernel cannot run here, or None when it can."""
    return _load()[1]


def first_bad_label(target, vocab_size, ignore_index) -> Optional[int]:
    """The flat index of the first label outside [0, V) that is not ignore_index, -1 where none
    is; None where the library cannot tell: not built, or labels that are not plain contiguous
    int64 CPU memory (subclasses, fake tensors and those of torch.func transforms have no data
    pointer to read). One call and no tensor, where the same check in torch ops takes six."""
    lib = _load()[0]
    if (lib is None or type(target) is not torch.Tensor or target.device.type != "cpu"
            or target.dtype != torch.int64 or not target.is_contiguous()
            or torch._C._functorch.is_functorch_wrapped_tensor(target)):
        return None
    data = target.data_ptr()
    if data == 0:  # a backstop: any other tensor with no memory of its own
        return None
    return lib.fastrdrop_cpu_first_bad_label(data, target.numel(), vocab_size, ignore_index)


def _common_args(z1, z2, target, ignore_index, label_smoothing, softcap):
    n_rows, vocab_size = z1.shape
    return [z1.data_ptr(), z2.data_ptr(), z1.stride(0), z2.stride(0), DTYPE_CODES[z1.dtype],
            n_rows, vocab_size, None if target is None else target.data_ptr(), ignore_index,
            label_smoothing, softcap or 0.0]


def _as(t, dtype):
    """t as a contiguous tensor of dtype: itself when it is one (no torch op: a call's few
    microseconds count against the kernel's at small batches)."""
    return t if t.dtype == dtype and t.is_contiguous() else t.to(dtype).contiguous()


def _labels(target):
    return None if target is None else _as(target, torch.int64)


def forward(z1, z2, target, row_weight, parts, stats, ignore_index, label_smoothing, softcap,
            alpha, grads):
    lib = _load()[0]
    target = _labels(target)
    if grads is None:  # the statistics alone: no weights, no gradient rows
        weights, out = None, [None, None, 0, 0]
    else:
        row_weight, (dz1, dz2) = _as(row_weight, torch.float32), grads
        weights, out = row_weight.data_ptr(), [dz1.data_ptr(), dz2.data_ptr(), dz1.stride(0),
                                               dz2.stride(0)]
    status = lib.fastrdrop_cpu_forward(
        *_common_args(z1, z2, target, ignore_index, label_smoothing, softcap), weights, alpha,
        *out, parts.data_ptr(), stats.data_ptr(), torch.get_num_threads())
    assert status == 0, f"fastrdrop_cpu_forward failed with status {status}"


def backward(z1, z2, target, stats, grad_parts, dz1, dz2, ignore_index, label_smoothing,
             softcap, upstream=None):
    lib = _load()[0]
    target = _labels(target)
    status = lib.fastrdrop_cpu_backward(
        *_common_args(z1, z2, target, ignore_index, label_smoothing, softcap),
        stats.data_ptr(), grad_parts.data_ptr(),
        None if upstream is None else upstream.data_ptr(),
        0 if upstream is None or len(upstream) == 1 else upstream.stride(0),
        dz1.data_ptr(), dz2.data_ptr(), dz1.stride(0), dz2.stride(0), torch.get_num_threads())
    assert status == 0, f"fastrdrop_cpu_backward failed with status {status}"


def partials(z1, z2, out, label_smoothing, softcap):
    n_rows, vocab_size = z1.shape
    status = _load()[0].fastrdrop_cpu_partials(
        z1.data_ptr(), z2.data_ptr(), z1.stride(0), z2.stride(0), DTYPE_CODES[z1.dtype], n_rows,
        vocab_size, int(label_smoothing > 0), softcap or 0.0, out.data_ptr(),
        torch.get_num_threads())
    assert status == 0, f"fastrdrop_cpu_partials failed with status {status}"
