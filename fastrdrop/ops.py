"""Launchers of the fused kernels, the custom ops around them, and the autograd Functions.

Read top to bottom: launchers (allocate, launch), then the ``fastrdrop::`` custom ops (what
``torch.compile`` sees: opaque, with fake implementations for tracing), then the two autograd
Functions (default and in-place) that ``fastrdrop.rdrop_loss`` calls.
"""

import contextlib
import functools
from typing import Optional

import torch
from torch import Tensor

from . import _native, buffers, distributed
from ._common import check_target_values, labels_checked, token_loss

try:
    import triton

    from . import triton_kernels
except ImportError:  # no Triton on this platform: the triton backend is unavailable
    triton = None
    triton_kernels = None


def triton_interpreted() -> bool:
    """True when TRITON_INTERPRET=1 was set before Triton was imported (kernels run on CPU)."""
    return triton is not None and triton_kernels.INTERPRETED.value


def triton_unavailable_reason(device: torch.device) -> Optional[str]:
    """Why the Triton kernels cannot run on ``device``, or None when they can."""
    if triton is None:
        return "Triton is not installed"
    if device.type == "cpu" and not triton_interpreted():
        return (
            "the Triton kernels need a GPU tensor; to run them on CPU, set TRITON_INTERPRET=1 "
            "before importing triton"
        )
    if device.type not in ("cpu", "cuda", "xpu"):
        return f"Triton does not run on {device.type} tensors"
    return None


# ---------------------------------------------------------------------------------------------
# Launch configuration: (V range, dtype) -> BLOCK, threads per program and, on NVIDIA, registers per
# thread. The row loops are memory bound. Every thread loads one 16-byte vector per row per
# iteration (BLOCK = threads x 16 B / element); the statistics loop keeps each thread's sums in its
# own registers and reduces across the program once per row, and the gradient loop reduces
# nothing. A program has one iteration's loads in flight, so the programs on an SM must together
# cover the memory latency: about 3 TB/s x 0.7 us / 132 SMs = 16 KiB per SM on an H100, 24 on an
# H200, ~36 on a B200. The register bound (ptxas's maxnreg; softcap's tanh gets 16 more) is what
# fits that many programs; with these bounds no binary spills (Triton 3.6 and 3.9). Rows that are
# not aligned (scalar loads, a mask per element: V = 50257, or a row offset that is not a
# multiple of 16 bytes) have bounds of their own: at 56 the fp32 forward spilled 8 bytes on
# sm_100, and at 88 so did the 16-bit forward (at 80, none). Registers from `python -m
# benchmarks.codegen` (Triton 3.9, sm_90, without softcap): benchmarks/results/codegen/codegen.md.
#
#   V > 1024, 16-bit: 1024 x 128, 80 / 64 registers (forward, which includes the in-place pass,
#     / backward; it takes 76 / 48): 6 and 10 programs per SM, 24 and 40 KiB in flight.
#   V > 1024, fp32: 1024 x 256, 48 registers: 5 programs per SM, 40 KiB in flight.
#   V <= 1024: 64 threads (two warps; one AMD wave), 128 registers. A row is one or a few
#     iterations, bound by the latency of its reductions, so many small programs beat few large
#     ones: 10-21 per SM.
#
# Timed on an H200 (Triton 3.6; stacked_rdrop_loss, bf16 N=8192, median ms of fwd / fwd+bwd, the
# forward writing the gradients), 16-bit rows:
#
#   BLOCK x threads, registers   programs/SM   V=32000        V=128256
#   1024 x 128, 80               6             0.565 / 1.141  2.053 / 4.273
#   2048 x 256, 80               3             0.600 / 1.192  2.089 / 4.337
#   2048 x 256, 88               2             0.711 / 1.385  2.441 / 5.100
#   4096 x 256, 128              2             0.767 / 1.389  2.713 / 5.136
#
# fp32 (N=4096, V=128256): 1024 x 256 at 48 registers 1.05 / 3.16 ms, at 64 1.14 / 3.21.
# Threads, not warps: an AMD wave has 64 lanes, so it gets the same work per thread. Liger-Kernel's
# cross entropy streams blocks of 32768 with 32 warps (32 elements per thread, 16 warps on AMD);
# quack keeps 128-bit vectors and 128 (V <= 16k) or 256 threads, but holds the whole row on chip,
# across a cluster of up to 16 SMs for long rows.
LAUNCH_TABLE = {
    # max V, bytes per element: BLOCK, threads, NVIDIA registers (forward, backward) for aligned
    # rows, and for rows that are not
    (1024, 4): (256, 64, (128, 128), (128, 128)),
    (1024, 2): (512, 64, (128, 128), (128, 128)),
    (None, 4): (1024, 256, (48, 48), (64, 48)),
    (None, 2): (1024, 128, (80, 64), (80, 64)),
}


def launch_config(vocab_size: int, dtype: torch.dtype) -> tuple:
    """(BLOCK, threads per program, NVIDIA registers per thread for the forward and backward
    kernels on aligned rows, the same on other rows) of the Triton kernels for rows of
    ``vocab_size`` entries."""
    elem = torch.finfo(dtype).bits // 8
    for (max_vocab, elem_bytes), config in LAUNCH_TABLE.items():
        if elem_bytes == elem and (max_vocab is None or vocab_size <= max_vocab):
            return config
    raise ValueError(f"no launch configuration for {dtype}")


@functools.lru_cache(maxsize=None)
def gpu_target(device: torch.device):
    """Triton's GPUTarget (backend, arch, warp size) of ``device``; None on CPU (interpreter)."""
    if device.type == "cpu":
        return None
    with _device_guard(device):
        return triton.runtime.driver.active.get_current_target()


def _launch_options(kernel: str, z: Tensor, softcap: Optional[float], aligned: bool) -> dict:
    """BLOCK, ALIGNED and the compile options of a launch of ``kernel`` ("forward", "backward",
    "partials" (bounded like the forward) or "scale") on the rows of z."""
    block, threads, aligned_registers, other_registers = launch_config(z.shape[1], z.dtype)
    registers = aligned_registers if aligned else other_registers
    target = gpu_target(z.device)
    warp_size = 32 if target is None else target.warp_size  # 64 on AMD CDNA
    # fused multiply-add on, whatever Triton's default (3.10 turns it off unless asked)
    options = dict(BLOCK=block, ALIGNED=aligned, num_warps=max(threads // warp_size, 1),
                   enable_fp_fusion=True)
    if target is not None and target.backend == "cuda":
        options["maxnreg"] = registers[kernel == "backward"] + (16 if softcap is not None else 0)
    return options


def rows_aligned(*rows: Tensor) -> bool:
    """Whether every row of these [n_rows, V] tensors starts on a 16-byte boundary and V fills
    whole 16-byte vectors: the kernels' ALIGNED flag, which gives 128-bit loads and stores."""
    elem = rows[0].element_size()
    return (rows[0].shape[1] * elem) % 16 == 0 and all(
        t.data_ptr() % 16 == 0 and (t.stride(0) * elem) % 16 == 0 for t in rows)


# ---------------------------------------------------------------------------------------------
# Launchers: inputs are [n_rows, V] with a contiguous last dim and n_rows >= 1.


def _device_guard(device: torch.device):
    """``device`` as the current device: Triton launches on the current one (and its stream)."""
    if device.type in ("cuda", "xpu"):
        return getattr(torch, device.type).device(device)
    return contextlib.nullcontext()


def _labels(target: Optional[Tensor], like: Tensor) -> tuple[Tensor, int]:
    """(int64 labels, has_target): one kernel signature whatever the labels' dtype, and one
    binary with or without labels (a placeholder that is never read then)."""
    if target is None:
        return torch.empty(1, dtype=torch.int64, device=like.device), 0
    return target.to(torch.int64), 1


def _triton_forward(z1, z2, target, row_weight, parts, stats, ignore_index, label_smoothing,
                    softcap, alpha, grads):
    n_rows, vocab_size = z1.shape
    labels, has_target = _labels(target, z1)
    dz1, dz2 = (z1, z2) if grads is None else grads  # never written without grads
    with _device_guard(z1.device):
        triton_kernels._rdrop_fwd_kernel[(n_rows,)](
            z1, z2, labels, parts if row_weight is None else row_weight,
            parts, stats, dz1, dz2,
            n_rows, vocab_size,
            z1.stride(0), z2.stride(0), dz1.stride(0), dz2.stride(0),
            has_target, ignore_index, label_smoothing * has_target, softcap or 1.0, alpha,
            int(grads is not None),
            SOFTCAP=softcap is not None,
            **_launch_options("forward", z1, softcap, rows_aligned(z1, z2, dz1, dz2)),
        )


def _triton_backward(z1, z2, target, stats, grad_parts, dz1, dz2, ignore_index, label_smoothing,
                     softcap, upstream=None):
    n_rows, vocab_size = z1.shape
    labels, has_target = _labels(target, z1)
    with _device_guard(z1.device):
        triton_kernels._rdrop_bwd_kernel[(n_rows,)](
            z1, z2, labels, stats, grad_parts, stats if upstream is None else upstream,
            dz1, dz2,
            n_rows, vocab_size,
            z1.stride(0), z2.stride(0), dz1.stride(0), dz2.stride(0),
            0 if upstream is None or len(upstream) == 1 else upstream.stride(0),
            has_target, int(upstream is not None), ignore_index, label_smoothing * has_target,
            softcap or 1.0,
            SOFTCAP=softcap is not None,
            **_launch_options("backward", z1, softcap, rows_aligned(z1, z2, dz1, dz2)),
        )


def _triton_partials(z1, z2, out, label_smoothing, softcap):
    n_rows, vocab_size = z1.shape
    with _device_guard(z1.device):
        triton_kernels._rdrop_partials_kernel[(n_rows,)](
            z1, z2, out,
            n_rows, vocab_size,
            z1.stride(0), z2.stride(0),
            label_smoothing, softcap or 1.0,
            SOFTCAP=softcap is not None,
            **_launch_options("partials", z1, softcap, rows_aligned(z1, z2)),
        )


def _triton_scale_rows(z1, z2, scale):
    n_rows, vocab_size = z1.shape
    with _device_guard(z1.device):
        triton_kernels._scale_rows_kernel[(n_rows,)](
            z1, z2, scale,
            vocab_size, z1.stride(0), z2.stride(0),
            scale.stride(0) if scale.numel() > 1 else 0,
            **_launch_options("scale", z1, None, rows_aligned(z1, z2)),
        )


def _torch_scale_rows(z1, z2, scale):
    z1.mul_(scale.reshape(-1, 1))
    z2.mul_(scale.reshape(-1, 1))


FORWARD = {"triton": _triton_forward, "native": _native.forward}
BACKWARD = {"triton": _triton_backward, "native": _native.backward}
PARTIALS = {"triton": _triton_partials, "native": _native.partials}
# gradients written in the forward pass times the upstream gradient; in place
SCALE_ROWS = {"triton": _triton_scale_rows, "native": _torch_scale_rows}


# ---------------------------------------------------------------------------------------------
# Custom ops. Labels are checked here (where check_target_values says that they are), before any
# kernel runs, so that the check also runs inside compiled graphs and nothing is written when it
# fails.


def halves(logits1: Tensor, logits2: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """The rows of both passes: (logits1, logits2), or, when logits2 is None, the two halves of
    logits1 [2N, V], both passes stacked."""
    if logits2 is not None:
        return logits1, logits2
    n_rows = logits1.shape[0] // 2
    return logits1[:n_rows], logits1[n_rows:]


def check_writable_rows(logits1: Tensor, logits2: Optional[Tensor]) -> None:
    """The in-place mode writes each row's gradient over it: no two rows of logits1 [N, V] and
    logits2 [N, V] (or of logits1 [2N, V], both passes stacked) may share memory. Checked in the
    custom op, which runs eagerly even in compiled graphs, so it sees the real pointers."""
    each = {"logits": logits1} if logits2 is None else {"logits1": logits1, "logits2": logits2}
    for name, rows in each.items():
        if _rows_overlap(rows, rows):
            raise ValueError(
                f"{name}'s rows overlap in memory (row stride {rows.stride(0)}, V="
                f"{rows.shape[1]}), so inplace_backward=True cannot write each row's gradient "
                "into them")
    if logits2 is not None and _rows_overlap(logits1, logits2):
        raise ValueError("logits1 and logits2 overlap in memory, so inplace_backward=True "
                         "cannot write each one's gradient into it")


def _same_storage(a: Tensor, b: Tensor) -> bool:
    return a.untyped_storage()._cdata == b.untyped_storage()._cdata


def _rows_overlap(a: Tensor, b: Tensor) -> bool:
    """Whether two rows of a [n, V] and b [m, V] (contiguous last dims, on one device) share
    memory; two rows of a itself when b is a. Exact for rows of one stride, by their span
    otherwise. By address, not storage: two storages may hold one memory (numpy, dlpack).
    An empty row (a rank's empty slice of a split vocabulary) counts as one element wide, so
    that the ranks decide alike: expanded rows, or logits1 and logits2 one row apart, overlap
    there too."""
    elem, (n, m) = a.element_size(), (a.shape[0], b.shape[0])
    row_bytes = max(a.shape[1], 1) * elem
    if a is b:
        return n > 1 and a.stride(0) * elem < row_bytes
    if n == 0 or m == 0:
        return False
    stride_a, stride_b = (t.stride(0) * elem if len(t) > 1 else row_bytes for t in (a, b))
    if a.shape[1] > 0:
        d = b.data_ptr() - a.data_ptr()
    elif _same_storage(a, b):  # empty rows hold no memory: where they are in one storage
        d = (b.storage_offset() - a.storage_offset()) * elem
    else:
        return False
    if stride_a == stride_b and stride_a >= row_bytes:
        # rows i of a and j of b overlap iff |(i - j) stride - d| < row_bytes: try the k = i - j
        # in [-(m - 1), n - 1] closest to d / stride
        nearest = d // stride_a
        return any(abs(k * stride_a - d) < row_bytes
                   for k in (nearest, nearest + 1) if -(m - 1) <= k <= n - 1)
    end_a = (n - 1) * stride_a + row_bytes
    end_b = d + (m - 1) * stride_b + row_bytes
    return d < end_a and 0 < end_b


def forward_rows(logits1, logits2, target, row_weight, alpha, ignore_index, label_smoothing,
                 softcap, backend, grads=None):
    """Per-row parts [3, N] and stats [N_STATS, N] of logits [N, V] (logits2 None: logits1
    [2N, V] holds both passes); with ``grads`` (two tensors, or one for stacked logits), also the
    gradients of sum_r row_weight_r * (CE_1 + CE_2 + alpha * symKL)_r written into them."""
    z1, z2 = halves(logits1, logits2)
    check_target_values(target, z1.shape[1], ignore_index, backend)
    parts, stats = _empty_rows(z1)
    if z1.shape[0] > 0:
        if grads is not None:  # in place: the rows of the logits themselves
            grads = (z1, z2) if grads[0] is logits1 else halves(*grads)
        FORWARD[backend](z1, z2, target, row_weight, parts, stats, ignore_index, label_smoothing,
                         softcap, alpha, grads)
    return parts, stats


def op_or_body(op, body):
    """A call of the custom op ``op`` where a graph is traced, and of its Python ``body`` in
    eager calls, which then skip the op's dispatch (tens of microseconds a call, on CPU a tenth
    of a kernel for 256 tokens of 32000 bf16 logits)."""
    def call(*args):
        return (op if torch.compiler.is_compiling() else body)(*args)
    return call


def _partials_rows(z1: Tensor, z2: Tensor, label_smoothing: float, softcap: Optional[float],
                   backend: str) -> Tensor:
    out = torch.empty((10, z1.shape[0]), dtype=torch.float32, device=z1.device)
    if z1.shape[1] == 0:  # an empty slice: nothing present, maxima -inf, sums and V' 0
        out.zero_()[:2] = distributed.NEG_INF
    elif z1.shape[0] > 0:
        PARTIALS[backend](z1, z2, out, label_smoothing, softcap)
    return out


rdrop_partials = torch.library.custom_op("fastrdrop::rdrop_partials", _partials_rows,
                                         mutates_args=())


@rdrop_partials.register_fake
def _(z1, z2, label_smoothing, softcap, backend):
    return z1.new_empty((10, z1.shape[0]), dtype=torch.float32)


# Per-row partial statistics [10, N] of rows z1, z2 [N, V] of a slice of the vocabulary: m1, m2,
# s1, s2, t1, t2, sigma1, sigma2, V', lone (see fastrdrop.distributed).
partials_rows = op_or_body(rdrop_partials, _partials_rows)


def vocab_parallel_rows(logits1, logits2, target, group, ignore_index, label_smoothing, softcap,
                        backend):
    """(parts [3, N], stats [N_STATS, N], this rank's labels for the backward kernels, whose
    ignore_index is distributed.LOCAL_IGNORE) of rows [N, V_r] whose vocabulary is split across
    the ranks of ``group`` (logits2 None: logits1 [2N, V_r] holds both passes)."""
    def check_labels(labels, total):  # reads total back: on CPU, or where labels are read
        read = labels is not None and labels_checked(labels, backend)
        if torch.compiler.is_compiling() or not (read or total.device.type == "cpu"):
            return
        total = int(total)
        distributed.check_whole_vocabulary(total)
        check_target_values(labels, total, ignore_index, backend)

    return distributed.vocab_parallel_rows(
        *halves(logits1, logits2), target, group, ignore_index=ignore_index,
        label_smoothing=label_smoothing, softcap=softcap, backend=backend,
        partials_rows=partials_rows, check_labels=check_labels)


def write_gradients_rows(
    logits1: Tensor, logits2: Optional[Tensor], labels: Optional[Tensor], stats: Tensor,
    row_weight: Tensor, alpha: float, ignore_index: int, label_smoothing: float,
    softcap: Optional[float], backend: str,
) -> None:
    """Overwrites the logits [N, V] (logits2 None: logits1 [2N, V], both passes) with the
    gradients of sum_r row_weight_r * (CE_1 + CE_2 + alpha * symKL)_r, from finished stats."""
    z1, z2 = halves(logits1, logits2)
    grad_parts = torch.stack([row_weight, row_weight, alpha * row_weight]).float()
    if z1.numel() > 0:  # rows of a slice of the vocabulary, which may be empty
        BACKWARD[backend](z1, z2, labels, stats, grad_parts, z1, z2, ignore_index,
                          label_smoothing, softcap)


rdrop_write_gradients = torch.library.custom_op(
    "fastrdrop::rdrop_write_gradients", write_gradients_rows, mutates_args=("logits1", "logits2"))


@rdrop_write_gradients.register_fake
def _(logits1, logits2, labels, stats, row_weight, alpha, ignore_index, label_smoothing, softcap,
      backend):
    return None


write_gradients = op_or_body(rdrop_write_gradients, write_gradients_rows)


@torch.library.custom_op("fastrdrop::rdrop_forward", mutates_args=())
def rdrop_forward(
    logits1: Tensor, logits2: Optional[Tensor], target: Optional[Tensor], ignore_index: int,
    label_smoothing: float, softcap: Optional[float], backend: str,
) -> tuple[Tensor, Tensor]:
    """Per-row parts [3, N] (CE_1, CE_2, symKL) and stats [N_STATS, N] of logits [N, V]
    (logits2 None: logits1 [2N, V] holds both)."""
    return forward_rows(logits1, logits2, target, None, 0.0, ignore_index, label_smoothing,
                        softcap, backend)


@rdrop_forward.register_fake
def _(logits1, logits2, target, ignore_index, label_smoothing, softcap, backend):
    return _empty_rows(halves(logits1, logits2)[0])


def forward_inplace_rows(
    logits1: Tensor, logits2: Optional[Tensor], target: Optional[Tensor], row_weight: Tensor,
    alpha: float, ignore_index: int, label_smoothing: float, softcap: Optional[float],
    backend: str,
) -> Tensor:
    """Per-row parts [3, N]; overwrites the logits with the gradients of
    sum_r row_weight_r * (CE_1 + CE_2 + alpha * symKL)_r. The stacked form (logits2 None) is one
    mutated tensor, not two mutated views of it, which compiled graphs would have to track."""
    check_writable_rows(logits1, logits2)
    return forward_rows(logits1, logits2, target, row_weight, alpha, ignore_index,
                        label_smoothing, softcap, backend, grads=(logits1, logits2))[0]


rdrop_forward_inplace = torch.library.custom_op(
    "fastrdrop::rdrop_forward_inplace", forward_inplace_rows, mutates_args=("logits1", "logits2"))


# The autograd Functions that call it mark the logits as changed themselves.
forward_inplace = op_or_body(rdrop_forward_inplace, forward_inplace_rows)


@rdrop_forward_inplace.register_fake
def _(logits1, logits2, target, row_weight, alpha, ignore_index, label_smoothing, softcap,
      backend):
    return _empty_rows(halves(logits1, logits2)[0])[0]


@torch.library.custom_op("fastrdrop::rdrop_backward", mutates_args=())
def rdrop_backward(
    logits1: Tensor, logits2: Tensor, target: Optional[Tensor], stats: Tensor, grad_parts: Tensor,
    ignore_index: int, label_smoothing: float, softcap: Optional[float], backend: str,
) -> tuple[Tensor, Tensor]:
    """dz1, dz2 [N, V] (contiguous, the logits' dtype) given the upstream gradients of the parts."""
    dz1, dz2 = _empty_like_rows(logits1), _empty_like_rows(logits2)
    if logits1.numel() > 0:
        BACKWARD[backend](logits1, logits2, target, stats, grad_parts, dz1, dz2, ignore_index,
                          label_smoothing, softcap)
    return dz1, dz2


@rdrop_backward.register_fake
def _(logits1, logits2, target, stats, grad_parts, ignore_index, label_smoothing, softcap,
      backend):
    return _empty_like_rows(logits1), _empty_like_rows(logits2)


@torch.library.custom_op("fastrdrop::stacked_rdrop_backward", mutates_args=())
def stacked_rdrop_backward(
    logits: Tensor, target: Optional[Tensor], stats: Tensor, grad_parts: Tensor,
    ignore_index: int, label_smoothing: float, softcap: Optional[float], backend: str,
) -> Tensor:
    """The gradient [2N, V] of stacked logits [2N, V]: one buffer, each half written by the
    kernel, so that nothing assembles it from two."""
    grad = _empty_like_rows(logits)
    if logits.numel() > 0:
        BACKWARD[backend](*halves(logits, None), target, stats, grad_parts,
                          *halves(grad, None), ignore_index, label_smoothing, softcap)
    return grad


@stacked_rdrop_backward.register_fake
def _(logits, target, stats, grad_parts, ignore_index, label_smoothing, softcap, backend):
    return _empty_like_rows(logits)


# Per-row stats of the forward pass, what the backward pass needs (triton_kernels.py, rdrop.cpp):
# m1, m2, log s1, log s2, E_p[D], E_q[D], V', row_ok
N_STATS = 8


def _empty_like_rows(logits: Tensor) -> Tensor:
    return buffers.empty_like(logits)  # on CPU, large ones reuse memory (buffers.py)


def _empty_rows(logits: Tensor) -> tuple[Tensor, Tensor]:
    n_rows = logits.shape[0]
    parts = torch.empty((3, n_rows), dtype=torch.float32, device=logits.device)
    stats = torch.empty((N_STATS, n_rows), dtype=torch.float32, device=logits.device)
    return parts, stats


# ---------------------------------------------------------------------------------------------
# Autograd. The default Function keeps the inputs and O(N) stats for a backward pass that
# recomputes p and q; the in-place one has written the gradients into the logits already.


class RDropFunction(torch.autograd.Function):
    """(z1 [N, V], z2 [N, V], target [N] | None, ..., group) -> parts [3, N] = (CE_1, CE_2,
    symKL). z2 None: z1 [2N, V] holds both passes, and its gradient is one [2N, V] buffer.
    group: the vocabulary is split across its ranks (the backward pass needs no communication)."""

    @staticmethod
    def forward(ctx, logits1, logits2, target, ignore_index, label_smoothing, softcap, backend,
                group):
        if group is None:
            parts, stats = rdrop_forward(logits1, logits2, target, ignore_index,
                                         label_smoothing, softcap, backend)
        else:
            parts, stats, target = vocab_parallel_rows(logits1, logits2, target, group,
                                                       ignore_index, label_smoothing, softcap,
                                                       backend)
            ignore_index = distributed.LOCAL_IGNORE  # of the local labels
        ctx.save_for_backward(logits1, logits2, target, stats)
        ctx.kernel_args = (ignore_index, label_smoothing, softcap, backend)
        return parts

    @staticmethod
    def backward(ctx, grad_parts):
        return *_parts_backward(ctx, grad_parts), *[None] * 6


def _parts_backward(ctx, grad_parts):
    """(dlogits1, dlogits2 or None) from the parts' upstream gradients [3, N], given what the
    forward pass saved: the logits, the labels, the stats."""
    refuse_create_graph()
    logits1, logits2, target, stats = ctx.saved_tensors
    grad_parts = grad_parts.float().contiguous()
    if logits2 is None:
        return stacked_rdrop_backward(logits1, target, stats, grad_parts, *ctx.kernel_args), None
    dz1, dz2 = rdrop_backward(logits1, logits2, target, stats, grad_parts, *ctx.kernel_args)
    needs = ctx.needs_input_grad
    return (dz1 if needs[0] else None), (dz2 if needs[1] else None)


def _rdrop_forward_setup_context(ctx, inputs, output):
    logits1, logits2, target, ignore_index, label_smoothing, softcap, backend = inputs
    ctx.save_for_backward(logits1, logits2, target, output[1])
    ctx.kernel_args = (ignore_index, label_smoothing, softcap, backend)


# The custom op is differentiable by itself too, with RDropFunction's backward: graphs that hold
# it without the Function around it (torch.export traces the op) keep their gradients.
torch.library.register_autograd(
    "fastrdrop::rdrop_forward",
    lambda ctx, grad_parts, _grad_stats: (*_parts_backward(ctx, grad_parts), *[None] * 5),
    setup_context=_rdrop_forward_setup_context)


def refuse_create_graph(remedy: str = "backend='torch' (the PyTorch reference) supports it"):
    """Backward passes with create_graph=True run with grad mode on: the fused backward passes
    are kernels, whose results carry no graph, so a gradient of the gradient would silently miss
    their part. Refused at once instead."""
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        raise RuntimeError(
            "fastrdrop: create_graph=True (a gradient of the gradient) is not supported by the "
            f"fused kernels, whose backward pass is not differentiable; {remedy}")


def take_gradients_once(ctx):
    """The gradients written in place or computed in the forward pass, handed out once."""
    grads = ctx.grads
    if torch.compiler.is_compiling():  # tracing may run a backward more than once
        return grads
    if grads is None:
        raise RuntimeError(
            "fastrdrop: this loss's gradients serve one backward pass (written in place, or "
            "during the forward pass) and were already used; a second backward "
            "(retain_graph=True) needs inplace_backward=False (or, for linear_rdrop_loss, "
            "reduction='none')")
    ctx.grads = None
    return grads


class RDropLossFunction(torch.autograd.Function):
    """(z1, z2 | None, target, row_weight [N], alpha, ..., inplace) -> (row_weight * (CE_1 + CE_2
    + alpha symKL) [N], parts [3, N] without gradient); z2 None: z1 [2N, V] holds both passes.

    For the loss alone, the forward pass also computes the gradients, in a second pass over each
    row while it is in cache: into the logits' own storage (inplace), or into new buffers. Those
    are the gradients for an upstream gradient of 1, the usual one, and the backward pass leaves
    such rows as they are. Other rows are scaled: in place, and in fp32 buffers. 16-bit buffers
    would then be rounded twice, so their rows are computed again from the saved logits, with
    the upstream gradient. New buffers serve a second backward (retain_graph=True) too: it
    computes them again from the saved logits, as the default mode does. fp16 in place computes
    the stats alone, and the backward pass writes the gradients into the logits for its upstream
    gradient (a loss scale). With a vocabulary split across the ranks of ``group`` it runs in
    place only."""

    @staticmethod
    def forward(ctx, logits1, logits2, target, row_weight, alpha, ignore_index, label_smoothing,
                softcap, backend, inplace, group):
        kernel_args = (ignore_index, label_smoothing, softcap, backend)
        # fp16 is trained with a loss scale: its gradients, p / N for a mean, would be rounded to
        # 0 before it reaches them. In place they wait for the backward pass and its upstream
        # gradient (the logits are overwritten then), which takes the saved labels, stats and
        # row weights, and ctx.pending's (alpha, ignore_index of the labels, ...).
        ctx.pending = None
        defer = inplace and logits1.dtype == torch.float16
        if inplace and group is not None:  # the stats of the whole rows first, then the writes
            check_writable_rows(logits1, logits2)
            parts, stats, labels = vocab_parallel_rows(logits1, logits2, target, group,
                                                       *kernel_args)
            rest = (alpha, distributed.LOCAL_IGNORE, *kernel_args[1:])
            if not defer:
                write_gradients(logits1, logits2, labels, stats, row_weight, *rest)
        elif defer:
            check_writable_rows(logits1, logits2)  # before anything is computed
            parts, stats = forward_rows(logits1, logits2, target, row_weight, alpha, *kernel_args)
            labels, rest = target, (alpha, *kernel_args)
        elif inplace:
            parts = forward_inplace(logits1, logits2, target, row_weight, alpha, *kernel_args)
        if defer:
            ctx.save_for_backward(labels, stats, row_weight)
            ctx.pending = rest
        if inplace:
            _mark_written(logits1, logits2)  # fp16's too: its backward pass will write them
            # Detached aliases, not saved tensors: the logits now hold the gradients, and
            # unpacking a saved view whose storage changed would fail for views made by chunk.
            ctx.grads = logits1.detach(), None if logits2 is None else logits2.detach()
            if not torch.compiler.is_compiling():
                ctx.versions = _versions(*ctx.grads)
        else:
            ctx.grads = (_empty_like_rows(logits1),
                         None if logits2 is None else _empty_like_rows(logits2))
            parts, stats = forward_rows(logits1, logits2, target, row_weight, alpha,
                                        *kernel_args, grads=ctx.grads)
            ctx.save_for_backward(logits1, logits2, target, stats, row_weight)
            ctx.recompute = (alpha, kernel_args)
        ctx.backend = backend
        ctx.mark_non_differentiable(parts)
        ctx.set_materialize_grads(False)  # the backward pass takes no gradient of the parts
        return row_weight * token_loss(parts, alpha), parts

    @staticmethod
    def backward(ctx, grad_rows, _grad_parts):
        refuse_create_graph()
        # New buffers serve the first eager backward. A second one, or a traced one (compiled
        # autograd, which may replay it without running this code again), computes them again.
        if hasattr(ctx, "recompute") and (ctx.grads is None or torch.compiler.is_compiling()):
            return (*_recomputed_gradients(ctx, grad_rows), *[None] * 9)
        grads = take_gradients_once(ctx)
        if hasattr(ctx, "versions") and not torch.compiler.is_compiling():
            _check_unchanged(ctx.versions)
        if ctx.pending is not None:  # fp16 in place: written now, for this upstream gradient
            labels, stats, row_weight = ctx.saved_tensors
            write_gradients(*grads, labels, stats, row_weight * grad_rows.float(), *ctx.pending)
            _mark_written(*grads)  # for an op that saved the logits after this loss's forward
            return *grads, *[None] * 9
        if torch.compiler.is_compiling():
            # A compiled graph may run this backward more than once (retain_graph=True), so the
            # gradients stay as they are and each run returns them times its upstream gradient,
            # as new tensors (scaling them in place would scale them again on every run).
            scale = grad_rows.reshape(-1, 1).float()
            if grads[1] is None:  # stacked: both halves take their row's upstream gradient
                scale = torch.cat([scale, scale])
            return (*(None if g is None else (g.float() * scale).to(g.dtype) for g in grads),
                    *[None] * 9)
        if grad_rows.numel() > 0 and grad_rows.stride(0) == 0:
            grad_rows = grad_rows[:1]  # one value broadcast to all rows: the gradient of a sum
        upstream = grad_rows.float()
        rewrite = hasattr(ctx, "recompute") and grads[0].dtype != torch.float32
        # An upstream gradient of 1 leaves the gradients as they are, which is known before any
        # work where reading it costs nothing (CPU): for the default mode's 16-bit buffers, whose
        # rows would otherwise be computed again from the saved logits, and elsewhere but on the
        # Triton path, whose scaling kernel reads nothing back wherever it runs (test_sync.py).
        if grads[0].numel() == 0 or (
                (rewrite or ctx.backend != "triton") and _is_one_on_cpu(upstream)):
            return *grads, *[None] * 9
        dz1, dz2 = halves(*grads)
        if rewrite:
            _rewrite_rows(ctx, upstream, dz1, dz2)
        else:  # rows whose upstream gradient is 1 are left as they are
            SCALE_ROWS[ctx.backend](dz1, dz2, upstream)
        return *grads, *[None] * 9


def _mark_written(*logits: Optional[Tensor]) -> None:
    """The kernels write the logits through raw pointers: autograd is told, so that an op that
    saved them for its own backward fails loudly instead of reading gradients."""
    for t in logits:
        if t is not None:
            torch.autograd.graph.increment_version(t)


def _versions(*logits: Optional[Tensor]) -> list[tuple[Tensor, int]]:
    """(alias, version) of each of the written logits' aliases that, with the others in its
    storage, fills that storage: a tensor's views and detached aliases share its version
    counter, which moves with writes anywhere in it, so with writes into the logits only where
    they fill it (not where they are chunks of a tensor's rows, each chunk's loss writing its
    own). Not an empty slice of a split vocabulary: it holds no gradient, and its chunks would
    each seem to fill its 0 bytes."""
    written = [t for t in logits if t is not None]

    def fills(t):
        together = [u for u in written if _same_storage(t, u)]  # rows apart: checked before
        nbytes = t.untyped_storage().nbytes()
        return nbytes > 0 and sum(u.numel() * u.element_size() for u in together) == nbytes

    return [(t, t._version) for t in written if fills(t)]


def _check_unchanged(versions) -> None:
    """The in-place mode's gradients are the logits' contents (fp16's: written from them in
    the backward pass): a write into the logits between the forward and the backward pass
    would change them without a word."""
    if any(alias._version != version for alias, version in versions):
        raise RuntimeError(
            "fastrdrop: the logits were modified after the loss wrote their gradients into them "
            "(inplace_backward=True): by another in-place loss on the same logits, or by an "
            "in-place op. Their gradients are lost; use inplace_backward=False, or one in-place "
            "loss per logits tensor")


def _is_one_on_cpu(upstream: Tensor) -> bool:
    """Whether the upstream gradient (one value, or one per row) is on CPU and 1 everywhere."""
    if upstream.device.type != "cpu":
        return False
    return upstream.item() == 1.0 if upstream.numel() == 1 else bool((upstream == 1).all())


def _rewrite_rows(ctx, upstream, dz1, dz2):
    """The rows of RDropLossFunction's 16-bit buffers dz1, dz2 whose upstream gradient (one value,
    or one per row) is not 1, computed again from the saved logits and stats."""
    logits1, logits2, target, stats, grad_parts = _saved_with_grad_parts(ctx, upstream)
    ignore_index, label_smoothing, softcap, backend = ctx.recompute[1]
    BACKWARD[backend](*halves(logits1, logits2), target, stats, grad_parts, dz1, dz2,
                      ignore_index, label_smoothing, softcap, upstream=upstream.contiguous())


def _recomputed_gradients(ctx, grad_rows):
    """A second backward of RDropLossFunction's new buffers: the gradients of the logits again,
    from the saved logits and stats."""
    logits1, logits2, target, stats, grad_parts = _saved_with_grad_parts(ctx, grad_rows)
    kernel_args = ctx.recompute[1]
    if logits2 is None:
        return stacked_rdrop_backward(logits1, target, stats, grad_parts, *kernel_args), None
    return rdrop_backward(logits1, logits2, target, stats, grad_parts, *kernel_args)


def _saved_with_grad_parts(ctx, grad_rows):
    """RDropLossFunction's saved logits1, logits2, labels and stats, and the upstream gradients
    [3, N] of the parts for the upstream gradient of its rows."""
    logits1, logits2, target, stats, row_weight = ctx.saved_tensors
    grad_token = (grad_rows * row_weight).float()
    grad_parts = torch.stack([grad_token, grad_token, ctx.recompute[0] * grad_token])  # alpha
    return logits1, logits2, target, stats, grad_parts
