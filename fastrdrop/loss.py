"""Public API: ``rdrop_loss``, ``stacked_rdrop_loss``, their module forms and the choice of
backend."""

import functools
from typing import Optional, Union

import torch
from torch import Tensor, nn

from . import _native, distributed, ops, reference
from ._common import (
    KERNEL_DTYPES,
    RDropParts,
    check_args,
    check_backend,
    check_options,
    check_stacked_args,
    int64_labels,
    reduce_rows,
    refuse_functorch,
    row_weights,
    stacked_batch_shape,
    token_loss,
    warn,
)


def rdrop_loss(
    logits1: Tensor,
    logits2: Tensor,
    target: Optional[Tensor] = None,
    *,
    alpha: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    softcap: Optional[float] = None,
    inplace_backward: bool = False,
    return_parts: bool = False,
    backend: str = "auto",
    vocab_parallel_group=None,
) -> Union[Tensor, RDropParts]:
    """R-Drop loss ``CE(z1, y) + CE(z2, y) + alpha * 1/2 * (KL(p1 || p2) + KL(p2 || p1))``.

    Computed per token in one streaming pass over each row of logits, reduced, with gradients to
    both logits.

    Args:
        logits1: [..., V] logits of the first pass (fp32, bf16 or fp16; any row stride;
            float64 with the ``"auto"`` or ``"torch"`` backend runs the reference).
        logits2: [..., V] logits of the second pass; same shape, dtype and device as ``logits1``.
        target: [...] integer labels in [0, V) or ``ignore_index``; None for the KL term alone.
            Another label is a ValueError with the CPU backends; the Triton backend does not
            read labels back (see :func:`fastrdrop.set_label_check`): its token's loss and
            gradient rows are NaN.
        alpha: weight of the symmetric KL term, >= 0.
        ignore_index: label of tokens that contribute to neither CE nor KL.
        reduction: "mean" (over counted tokens; 0 when none counts), "sum", "none" (per-token
            loss of shape [...], 0 where ignored) or "batchmean" (the sum over
            ``logits1.shape[0]``).
        label_smoothing: eps in [0, 1), as in ``torch.nn.functional.cross_entropy``.
        softcap: c > 0 applies ``c * tanh(z / c)`` to the logits first; None for none.
        inplace_backward: overwrite the logits' storage with their gradients during the forward
            pass, so that no [N, V] gradient buffer is allocated. The logits hold gradients
            afterwards; only ``loss`` carries gradient (the parts are detached). Applies when
            both logits require grad and grad mode is on; otherwise the default mode runs and
            nothing is written. The ``torch`` backend ignores it.
        return_parts: return ``RDropParts(loss, ce1, ce2, kl)``, each reduced like the loss,
            ``kl`` not multiplied by ``alpha``.
        backend: "auto" (Triton on GPU tensors, the native kernel on CPU tensors when built, the
            PyTorch reference otherwise), "triton", "native" or "torch".
        vocab_parallel_group: a ``torch.distributed`` process group whose rank r holds the
            logits of a contiguous slice of the vocabulary, [..., V_r], the slices in rank order
            (their sizes may differ, down to 0). Labels are global ids, the same on every rank,
            as are the tokens and keywords. Every rank returns the loss of the whole vocabulary
            and gets the gradient of its own slice; the forward pass makes two all-reduces of O(N)
            bytes (see fastrdrop.distributed), the backward pass none. DTensor logits sharded
            on their last dimension over a 1-D mesh take this path without the keyword.

    Returns:
        float32 loss: a scalar, or [...] with ``reduction="none"``; or ``RDropParts`` of them.
        The ``torch`` backend returns float64 for float64 logits.
    """
    logits1, logits2, target, vocab_parallel_group = distributed.from_dtensor(
        logits1, logits2, target, group=vocab_parallel_group)
    check_args(logits1, logits2, target, alpha=alpha, ignore_index=ignore_index,
               reduction=reduction, label_smoothing=label_smoothing, softcap=softcap,
               inplace_backward=inplace_backward, return_parts=return_parts,
               vocab_parallel=vocab_parallel_group is not None)
    distributed.check_group(vocab_parallel_group)
    return _fused(logits1, logits2, target, alpha=alpha, ignore_index=ignore_index,
                  reduction=reduction, label_smoothing=label_smoothing, softcap=softcap,
                  inplace_backward=inplace_backward, return_parts=return_parts, backend=backend,
                  group=vocab_parallel_group)


def stacked_rdrop_loss(
    logits: Tensor,
    target: Optional[Tensor] = None,
    *,
    alpha: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    softcap: Optional[float] = None,
    inplace_backward: bool = False,
    return_parts: bool = False,
    backend: str = "auto",
    vocab_parallel_group=None,
) -> Union[Tensor, RDropParts]:
    """:func:`rdrop_loss` of ``logits[:B]`` and ``logits[B:]``: both passes stacked on dim 0, as
    one forward of the model on ``torch.cat([x, x])`` returns them.

    The gradient of ``logits`` is one [2B, ..., V] buffer that the kernels write, half by half:
    autograd assembles nothing. With ``inplace_backward=True`` it is ``logits``' own storage,
    so the loss adds no [2B, ..., V] bytes at all.

    Args:
        logits: [2B, ..., V]: the first pass's logits first, then the second's. Views whose rows
            share one stride take the fused path as they are; other layouts are copied first
            (and refused with ``inplace_backward=True``).
        target: [B, ...] labels of one pass, or None.
        The keywords are :func:`rdrop_loss`'s; ``"batchmean"`` divides by B.

    Returns:
        What :func:`rdrop_loss` returns for the two halves.
    """
    logits, target, vocab_parallel_group = distributed.from_dtensor(
        logits, target, group=vocab_parallel_group)
    check_stacked_args(logits, target, vocab_parallel=vocab_parallel_group is not None,
                       alpha=alpha, ignore_index=ignore_index,
                       reduction=reduction, label_smoothing=label_smoothing, softcap=softcap,
                       inplace_backward=inplace_backward, return_parts=return_parts)
    distributed.check_group(vocab_parallel_group)
    return _fused(logits, None, target, alpha=alpha, ignore_index=ignore_index,
                  reduction=reduction, label_smoothing=label_smoothing, softcap=softcap,
                  inplace_backward=inplace_backward, return_parts=return_parts, backend=backend,
                  group=vocab_parallel_group)


def _fused(logits1, logits2, target, *, alpha, ignore_index, reduction, label_smoothing, softcap,
           inplace_backward, return_parts, backend, group):
    """rdrop_loss after the argument checks; logits2 None: logits1 holds both passes stacked;
    group: the vocabulary is split across its ranks."""
    name1 = "logits1" if logits2 is not None else "logits"
    backend = resolve_backend(backend, logits1, name1)
    if backend != "torch":
        refuse_functorch("the fused kernels", "backend='torch' (the PyTorch reference) runs "
                         "under them", **{name1: logits1, "logits2": logits2, "target": target})
    target = int64_labels(target)
    if backend == "torch":
        return reference.rdrop_loss(
            *ops.halves(logits1, logits2), target, alpha=alpha, ignore_index=ignore_index,
            reduction=reduction, label_smoothing=label_smoothing, softcap=softcap,
            return_parts=return_parts, vocab_parallel_group=group)

    batch_shape = logits1.shape[:-1] if logits2 is not None else stacked_batch_shape(logits1)
    # Gradients are made when the logits take them, in place only then: without, nothing is
    # written, and the in-place layout rules do not apply.
    wants_grad = (torch.is_grad_enabled() and logits1.requires_grad
                  and (logits2 is None or logits2.requires_grad))
    inplace_backward = inplace_backward and wants_grad
    split = group is not None
    z1 = _rows(logits1, name1, inplace_backward, split)
    z2 = None if logits2 is None else _rows(logits2, "logits2", inplace_backward, split)
    if inplace_backward and logits1 is logits2:
        raise ValueError("logits2 must not be the same tensor as logits1 when "
                         "inplace_backward=True: each gets its own gradient")
    if inplace_backward and torch.compiler.is_compiling() and (
            logits2 is not None or logits1._base is not None):
        # A compiled graph that recompiles with dynamic shapes can hand a tensor that the op
        # mutates to the kernel at another one's storage offset: a view (the gradients of logits1
        # then went into logits2's rows), or one of two tensors that share memory without being
        # views (detached slices of one tensor), which a graph cannot tell from two of their
        # own. In place, compiled, the op takes one whole tensor, both passes stacked.
        raise ValueError(
            "inplace_backward=True under torch.compile takes both passes as one tensor that is "
            "not a view of another: stacked_rdrop_loss(logits, ...) on the logits as the model "
            "returns them (a compiled graph can give views, and tensors that share memory, "
            "each other's rows); or inplace_backward=False")
    if inplace_backward and logits1.dtype == torch.float16 and torch.compiler.is_compiling():
        # fp16 in place writes the gradients in the backward pass (ops.RDropLossFunction), into
        # the saved logits, which a compiled backward graph cannot: compiled, the default mode
        inplace_backward = False
    labels = None if target is None else target.reshape(-1).contiguous()
    weights = row_weights(target, batch_shape, ignore_index, reduction, logits1.device)
    softcap = None if softcap is None else float(softcap)
    kernel_args = (ignore_index, float(label_smoothing), softcap, backend)
    # The forward pass also makes the gradients when they go into the logits (in place), or
    # else for the loss alone of fp32 or bf16 logits: its gradient is then that of
    # sum_r w_r loss_r for an upstream gradient of 1, which the backward pass applies where it
    # is not (ops.RDropLossFunction). fp16 logits are trained with a loss scale, an upstream
    # gradient that is not 1, so theirs wait for the backward pass, where it is known.
    # Compiled graphs, too, take that path, whose buffers autograd's tracing sees.
    grads_first = inplace_backward or (wants_grad and (
        logits1.dtype != torch.float16 and not return_parts and group is None
        and not torch.compiler.is_compiling()))

    if grads_first:
        # the in-place pair, refused above in compiled frames, runs eagerly in the frames that
        # Dynamo then runs eagerly too: none of its own may be compiled
        apply = _apply_eagerly if inplace_backward and z2 is not None else \
            ops.RDropLossFunction.apply
        weighted_rows, parts = apply(
            z1, z2, labels, weights, float(alpha), *kernel_args, inplace_backward, group)
        loss = weighted_rows.reshape(batch_shape) if reduction == "none" else weighted_rows.sum()
    else:
        parts = ops.RDropFunction.apply(z1, z2, labels, *kernel_args, group)
        loss = reduce_rows(token_loss(parts, alpha), weights, reduction,
                           batch_shape)
    if return_parts:
        ce1, ce2, kl = (reduce_rows(p, weights, reduction, batch_shape) for p in parts)
        return RDropParts(loss, ce1, ce2, kl)
    return loss


_apply_eagerly = torch.compiler.disable(ops.RDropLossFunction.apply)


class _Keywords(nn.Module):
    """The keywords of rdrop_loss, fixed at construction (and checked there), for the module
    forms."""

    def __init__(
        self,
        *,
        alpha: float = 1.0,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        softcap: Optional[float] = None,
        inplace_backward: bool = False,
        return_parts: bool = False,
        backend: str = "auto",
        vocab_parallel_group=None,
    ) -> None:
        super().__init__()
        check_options(alpha=alpha, ignore_index=ignore_index, reduction=reduction,
                      label_smoothing=label_smoothing, softcap=softcap,
                      inplace_backward=inplace_backward, return_parts=return_parts)
        check_backend(backend)
        distributed.check_group(vocab_parallel_group)
        self.alpha = alpha
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.softcap = softcap
        self.inplace_backward = inplace_backward
        self.return_parts = return_parts
        self.backend = backend
        self.vocab_parallel_group = vocab_parallel_group

    def keywords(self) -> dict:
        return dict(alpha=self.alpha, ignore_index=self.ignore_index, reduction=self.reduction,
                    label_smoothing=self.label_smoothing, softcap=self.softcap,
                    inplace_backward=self.inplace_backward, return_parts=self.return_parts,
                    backend=self.backend, vocab_parallel_group=self.vocab_parallel_group)

    def extra_repr(self) -> str:
        return ", ".join(f"{key}={value!r}" for key, value in self.keywords().items())

    def __deepcopy__(self, memo):
        return distributed.deepcopy_sharing(self, self.vocab_parallel_group, memo)


class RDropLoss(_Keywords):
    """Module form of :func:`rdrop_loss`; the keywords are fixed at construction.

    ``forward(logits1 [..., V], logits2 [..., V], target [...] | None)`` returns what
    :func:`rdrop_loss` returns with these keywords.
    """

    def forward(
        self, logits1: Tensor, logits2: Tensor, target: Optional[Tensor] = None
    ) -> Union[Tensor, RDropParts]:
        return rdrop_loss(logits1, logits2, target, **self.keywords())


class StackedRDropLoss(_Keywords):
    """Module form of :func:`stacked_rdrop_loss`; the keywords are fixed at construction.

    ``forward(logits [2B, ..., V], target [B, ...] | None)`` returns what
    :func:`stacked_rdrop_loss` returns with these keywords.
    """

    def forward(
        self, logits: Tensor, target: Optional[Tensor] = None
    ) -> Union[Tensor, RDropParts]:
        return stacked_rdrop_loss(logits, target, **self.keywords())


def default_backend(device: torch.device) -> str:
    """The backend that ``backend="auto"`` runs for fp32, bf16 and fp16 logits on ``device``."""
    if device.type == "cpu":
        return _cpu_backend()
    if ops.triton_unavailable_reason(device) is None:
        return "triton"
    return "torch"


@torch.compiler.assume_constant_result  # run as it is when traced: a compiled graph warns too
def _cpu_backend() -> str:
    reason = _native.unavailable_reason()
    if reason is None:
        return "native"
    _warn_once(f"fastrdrop: the native CPU kernel is unavailable ({reason}); "
               "backend='auto' runs the PyTorch reference on CPU tensors")
    return "torch"


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    warn(message, RuntimeWarning)


def resolve_backend(backend: str, logits: Tensor, name: str = "logits1") -> str:
    check_backend(backend)
    device = logits.device
    if backend == "auto":
        return default_backend(device) if logits.dtype in KERNEL_DTYPES else "torch"
    if backend == "torch":
        return backend
    if logits.dtype not in KERNEL_DTYPES:
        raise TypeError(
            f"{name} must be float32, bfloat16 or float16 for backend={backend!r}, got "
            f"{logits.dtype} (backend='torch' computes in float64)")
    if backend == "triton":
        reason = ops.triton_unavailable_reason(device)
        if reason is not None:
            raise ValueError(f"backend='triton' cannot run here: {reason}")
        return backend
    if device.type != "cpu":
        raise ValueError(f"backend='native' runs on CPU tensors, got logits on {device}")
    reason = _native.unavailable_reason()
    if reason is not None:
        raise ValueError(f"backend='native' cannot run here: the native CPU kernel is "
                         f"unavailable ({reason})")
    return backend


def _rows(logits: Tensor, name: str, inplace: bool, split: bool = False) -> Tensor:
    """[..., V] -> [N, V] with a contiguous last dim: a view whenever the strides allow one (see
    _flattens_to_rows for split)."""
    # The kernels read the storage, not the negated values of such a view. Dynamo cannot trace
    # the test; compiled graphs read such an input's storage whatever op takes it (a torch
    # limitation: torch.compile(lambda a: a.sum()) does too).
    if not torch.compiler.is_compiling() and logits.is_neg():
        if inplace:
            raise ValueError(f"{name} must not be a negated view (is_neg()) when "
                             "inplace_backward=True: its storage holds the other sign")
        logits = logits.resolve_neg()
    if logits.dim() == 2 and logits.stride(1) == 1:
        return logits  # rows already: no view, and no node of one in the backward pass
    vocab_size = logits.shape[-1]
    viewable = _flattens_to_rows(logits, split)
    if inplace and not viewable:
        raise ValueError(
            f"{name} must be viewable as [N, V] rows with a contiguous last dimension when "
            f"inplace_backward=True (its gradient is written into its storage), got shape "
            f"{list(logits.shape)} with strides {list(logits.stride())}")
    rows = logits.shape[:-1].numel()  # not -1: a rank's slice of the vocabulary may be empty
    return logits.view(rows, vocab_size) if viewable else \
        logits.reshape(rows, vocab_size).contiguous()


def _flattens_to_rows(t: Tensor, split: bool = False) -> bool:
    """Whether t [..., V] is a view of rows with a common stride and a contiguous last dim.
    split: t is a rank's slice of a vocabulary split across ranks, which may be 0 or 1 wide, so
    the strides decide alone, whatever V: every rank decides alike (where one raised, the others
    would wait in a collective)."""
    if (t.shape[:-1] if split else t.shape).numel() == 0:
        return True  # no rows: any strides will do
    if (split or t.shape[-1] > 1) and t.stride(-1) != 1:
        return False
    outer_stride = None  # the stride the next dimension out must have to merge with this one
    for size, stride in reversed(list(zip(t.shape[:-1], t.stride()[:-1], strict=True))):
        if size == 1:
            continue
        if outer_stride is not None and stride != outer_stride:
            return False
        outer_stride = stride * size
    return True
