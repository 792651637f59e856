"""What every backend shares: the result type, argument checks and the reduction."""

import math
import os
import sys
import warnings
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import _native

REDUCTIONS = ("mean", "sum", "none", "batchmean")
BACKENDS = ("auto", "triton", "native", "torch")
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class RDropParts(NamedTuple):
    """The loss and its parts, each reduced like the loss. ``kl`` is not multiplied by ``alpha``."""

    loss: Tensor
    ce1: Tensor
    ce2: Tensor
    kl: Tensor


# the folders of the frames a warning skips: fastrdrop's, and torch's (nn.Module's call of a
# loss module's forward, a compiled function's frames)
_LIBRARY_FOLDERS = (os.path.dirname(__file__) + os.sep, os.path.dirname(torch.__file__) + os.sep)


def warn(message: str, category: type[Warning]) -> None:
    """warnings.warn, shown at the user's line: the first caller outside fastrdrop and torch."""
    frame, stacklevel = sys._getframe(1), 2
    while frame is not None and frame.f_code.co_filename.startswith(_LIBRARY_FOLDERS):
        frame, stacklevel = frame.f_back, stacklevel + 1
    warnings.warn(message, category, stacklevel=stacklevel)


def _shape(t: Tensor) -> list[int]:
    return list(t.shape)


def check_args(logits1: Tensor, logits2: Tensor, target: Optional[Tensor], *,
               vocab_parallel: bool = False, **options) -> None:
    """Raise TypeError/ValueError naming the argument; looks at metadata only (no device sync).
    ``options`` are check_options' keywords. vocab_parallel: the logits are a rank's slice of
    the vocabulary, which may be empty."""
    check_pair("logits1", logits1, "logits2", logits2, last_dim="V", what="the vocabulary",
               empty=vocab_parallel)
    check_target(target, logits1.shape[:-1], logits1.device, "logits1", "the vocabulary")
    check_options(**options)


def check_stacked_args(logits: Tensor, target: Optional[Tensor], *, vocab_parallel: bool = False,
                       **options) -> None:
    """check_args for logits [2B, ..., V] holding both passes stacked on dim 0, target [B, ...];
    ``options`` are check_options' keywords."""
    _check_floating("logits", logits)
    if logits.dim() < 2 or logits.shape[0] % 2 or (logits.shape[-1] == 0 and not vocab_parallel):
        raise ValueError(
            "logits must have shape [2B, ..., V], both passes stacked on dim 0 (an even size) "
            f"and V >= 1 (the vocabulary), got {_shape(logits)}")
    check_target(target, stacked_batch_shape(logits), logits.device, "logits[:B]",
                 "the vocabulary")
    check_options(**options)


def stacked_batch_shape(logits: Tensor) -> torch.Size:
    """[B, ...] of logits [2B, ..., V]: the shape of one pass's labels."""
    return torch.Size((logits.shape[0] // 2, *logits.shape[1:-1]))


FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _check_floating(name: str, t: Tensor) -> None:
    check_strided(name, t)
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor (float32, bfloat16, float16 or "
                        f"float64), got dtype {t.dtype}")


def check_strided(name: str, t: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {t.layout}")


def check_pair(name1: str, t1: Tensor, name2: str, t2: Tensor, *, last_dim: str,
               what: str, empty: bool = False) -> None:
    """Two floating-point tensors [..., last_dim >= 1] (>= 0 where ``empty``) of one shape, dtype
    and device."""
    _check_floating(name1, t1)
    _check_floating(name2, t2)
    if t1.dim() == 0 or (t1.shape[-1] == 0 and not empty):
        raise ValueError(f"{name1} must have shape [..., {last_dim}] with {last_dim} >= 1 "
                         f"({what}), got {_shape(t1)}")
    if t2.shape != t1.shape:
        raise ValueError(
            f"{name2} must have the same shape as {name1} ({_shape(t1)}), got {_shape(t2)}")
    if t2.dtype != t1.dtype:
        raise TypeError(
            f"{name2} must have the same dtype as {name1} ({t1.dtype}), got {t2.dtype}")
    if t2.device != t1.device:
        raise ValueError(
            f"{name2} must be on the same device as {name1} ({t1.device}), got {t2.device}")


def check_target(target: Optional[Tensor], shape: torch.Size, device: torch.device, name: str,
                 what: str) -> None:
    """None, or integer labels of ``shape``, the shape of ``name`` without its last dim (``what``),
    on ``device``."""
    if target is None:
        return
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a torch.Tensor or None, got {type(target).__name__}")
    check_strided("target", target)
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(f"target must be an integer tensor of labels, got dtype {target.dtype}")
    if target.shape != shape:
        raise ValueError(f"target must have shape {list(shape)} ({name}'s shape without "
                         f"{what}), got {_shape(target)}")
    if target.device != device:
        raise ValueError(
            f"target must be on the same device as {name} ({device}), got {target.device}")


def refuse_functorch(what: str, remedy: str, **tensors: Optional[Tensor]) -> None:
    """torch.func's transforms (grad, vmap, jacrev, jvp, functionalize) wrap the tensors they
    trace, which the fused autograd Functions have no rules for: refused, naming the tensor and
    the way out, instead of torch's own message about setup_context."""
    if torch.compiler.is_compiling():
        return
    for name, t in tensors.items():
        if t is not None and torch._C._functorch.is_functorch_wrapped_tensor(t):
            raise ValueError(f"{name} is traced by a torch.func transform (grad, vmap, jacrev, "
                             f"jvp, functionalize), under which {what} cannot run; {remedy}")


def int64_labels(target: Optional[Tensor]) -> Optional[Tensor]:
    """The labels as int64 (the tensor itself when it is), for every comparison with
    ignore_index and V: in a narrower dtype those numbers wrap (-100 is 156 in uint8). uint64
    labels of 2^63 or more, which int64 would wrap to negatives (2^64 - 100 to -100, an ignored
    token), become int64's largest: past any vocabulary."""
    if target is None:
        return None
    labels = target.long()
    if target.dtype == torch.uint64:
        labels = labels.masked_fill(labels < 0, torch.iinfo(torch.int64).max)
    return labels


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


FLOAT32 = torch.finfo(torch.float32)


def check_options(*, alpha: float, ignore_index: int, reduction: str, label_smoothing: float,
                  softcap: Optional[float], **flags: bool) -> None:
    """The keywords; ``flags`` (inplace_backward, return_parts) must be True or False."""
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if not -2**63 <= ignore_index < 2**63:
        raise ValueError(f"ignore_index must fit in int64, got {ignore_index}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    _check_real("alpha", alpha)
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    _check_real("label_smoothing", label_smoothing)
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    if softcap is not None:
        _check_real("softcap", softcap)
        # the kernels take it, and the native one its reciprocal, as normal float32 numbers
        if not FLOAT32.tiny <= softcap <= 2.0 ** 126:
            raise ValueError(f"softcap must be None or > 0, a normal float32 whose reciprocal "
                             f"is one too ({FLOAT32.tiny:.4g} to {2.0 ** 126:.4g}), got {softcap}")
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be True or False, got {value!r}")


def _check_real(name: str, value: object) -> None:
    # symbolic numbers of torch.compile(dynamic=True) too; comparisons, not math.isfinite, which
    # a compiled graph cannot trace
    if isinstance(value, bool) or not isinstance(value, (int, float, torch.SymInt,
                                                          torch.SymFloat)):
        raise TypeError(f"{name} must be a real number given as a Python int or float, got "
                        f"{value!r} of type {type(value).__name__}")
    if not (value == value and abs(value) != math.inf):
        raise ValueError(f"{name} must be finite, got {value}")


_LABEL_CHECK = {"always": os.environ.get("FASTRDROP_CHECK_LABELS", "0") == "1"}


def set_label_check(enabled: bool) -> None:
    """Check label values on every call, on GPU too, where the check reads the labels back to the
    host: a device-to-host synchronisation per call, and no CUDA-graph capture. For debugging.
    The ``torch`` backend inside ``torch.compile`` still does not check (no data-dependent
    branch in a graph).

    By default labels are checked where reading them costs nothing: on CPU tensors, except under
    the Triton backend, which follows the GPU rule. Unchecked, a label outside [0, V) that is not
    ``ignore_index`` makes its token's loss and gradient rows NaN; no memory outside the logits is
    read. The environment variable ``FASTRDROP_CHECK_LABELS=1`` turns the check on at import.
    """
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {enabled!r}")
    _LABEL_CHECK["always"] = enabled


def labels_checked(target: Tensor, backend: str) -> bool:
    """Whether :func:`check_target_values` reads the labels of this call (see set_label_check).
    Meta tensors have no values to read: shapes only, as in F.cross_entropy."""
    if target.device.type == "meta":
        return False
    return _LABEL_CHECK["always"] or (target.device.type == "cpu" and backend != "triton")


def check_target_values(target: Optional[Tensor], vocab_size: int, ignore_index: int,
                        backend: str) -> None:
    """Labels must lie in [0, V) or equal ignore_index: a ValueError where labels_checked says so.
    Skipped while torch.compile traces (a data-dependent branch); the fused ops run it inside
    their custom op, which executes eagerly even in a compiled graph. Skipped for labels that
    torch.func's grad, vmap or jvp trace (the reference runs under them; under vmap a value
    cannot decide a branch): there the reference's rows of labels outside [0, V) are NaN, as
    where labels are unchecked. (functionalize's labels are checked by torch ops.)"""
    functorch = torch._C._functorch
    if (target is None or target.numel() == 0 or torch.compiler.is_compiling()
            or (functorch.is_functorch_wrapped_tensor(target)
                and not functorch.is_functionaltensor(target))
            or not labels_checked(target, backend)):
        return
    at = _native.first_bad_label(target, vocab_size, ignore_index)
    if at is None:  # the same check in torch ops
        bad = ((target < 0) | (target >= vocab_size)) & (target != ignore_index)
        at = int(bad.flatten().nonzero()[0]) if bool(bad.any()) else -1
    if at >= 0:
        raise ValueError(
            f"target has labels outside [0, V={vocab_size}) that are not "
            f"ignore_index={ignore_index}, e.g. {int(target.flatten()[at])}"
        )


def row_weights(
    target: Optional[Tensor], batch_shape: torch.Size, ignore_index: int, reduction: str,
    device: torch.device, dtype: torch.dtype = torch.float32,
) -> Tensor:
    """w [n_rows] such that the loss is sum_r w_r * loss_r for "mean", "sum" and
    "batchmean", and w_r * loss_r per token for "none"; w_r = 0 on ignored tokens. "batchmean"
    divides by the first dimension of the logits (1 for logits of shape [V])."""
    if target is None:
        counted = torch.ones(batch_shape.numel(), dtype=dtype, device=device)
    else:
        counted = (target.reshape(-1) != ignore_index).to(dtype)
    if reduction == "mean":
        return counted / counted.sum().clamp(min=1.0)  # 0, not NaN, when no token counts
    if reduction == "batchmean":
        return counted / max(batch_shape[0] if batch_shape else 1, 1)
    return counted


def token_loss(parts: Tensor, alpha: float) -> Tensor:
    """Per-token loss CE_1 + CE_2 + alpha * symKL from the per-row parts [3, N]."""
    ce1, ce2, kl = parts.unbind()
    return ce1 + ce2 + alpha * kl


def reduce_rows(rows: Tensor, weights: Tensor, reduction: str, batch_shape: torch.Size) -> Tensor:
    """Reduce per-token values ``rows [n_rows]`` with ``weights`` from row_weights."""
    if reduction == "none":
        return (rows * weights).reshape(batch_shape)
    return (rows * weights).sum()
