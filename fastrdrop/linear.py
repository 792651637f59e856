"""Fused linear R-Drop: the hidden states of both passes and the output embedding -> the loss and
all gradients, chunk by chunk over tokens, so that at most one chunk of logits exists at a time.

Per chunk of rows: z_k = h_k W^T (+ b) for both passes, the fused kernel writes dL/dz_k into z_k
in place, then dh_k = dz_k W, dW += dz_k^T h_k and db += sum dz_k, the last two in fp32
(float64 for float64 inputs).
With a scalar reduction every gradient is known after the forward pass (the backward pass only
scales them); with reduction="none", and for fp16 logits (trained with a loss scale), the backward
pass redoes the chunks with the upstream gradient in the row weights.
"""

import math
from typing import Optional, Union

import torch
from torch import Tensor, nn

from . import distributed, ops, reference
from ._common import (
    RDropParts,
    check_backend,
    check_options,
    check_pair,
    check_strided,
    check_target,
    int64_labels,
    reduce_rows,
    refuse_functorch,
    row_weights,
    token_loss,
)
from .loss import resolve_backend


def linear_rdrop_loss(
    hidden1: Tensor,
    hidden2: Tensor,
    weight: Tensor,
    target: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    *,
    alpha: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    softcap: Optional[float] = None,
    return_parts: bool = False,
    chunk_size: Optional[int] = None,
    backend: str = "auto",
    vocab_parallel_group=None,
) -> Union[Tensor, RDropParts]:
    """``rdrop_loss(hidden1 @ weight.T + bias, hidden2 @ weight.T + bias, target, ...)`` without
    materialising the logits: at most ``chunk_size`` rows of them exist at a time.

    Args:
        hidden1: [..., H] last hidden states of the first pass.
        hidden2: [..., H] of the second pass; same shape, dtype and device.
        weight: [V, H] output embedding (lm_head); no gradient is computed for it when
            ``weight.requires_grad`` is False (a frozen head, as in LoRA fine-tuning).
        target: [...] integer labels in [0, V) or ``ignore_index``; None for the KL term alone.
        bias: [V] or None.
        chunk_size: rows per chunk; None picks it with :func:`default_chunk_size` (with
            ``vocab_parallel_group``, the smallest over the ranks, agreed once per shape of the
            hidden states and ``weight`` object: that first call reads one number back to the
            host).
        alpha, ignore_index, reduction, label_smoothing, softcap, return_parts, backend: as in
            :func:`fastrdrop.rdrop_loss`. The parts of ``RDropParts`` carry no gradient.
        vocab_parallel_group: a process group whose rank r holds the rows of ``weight`` (and
            ``bias``) of a contiguous slice of the vocabulary, in rank order; ``hidden1``,
            ``hidden2`` and ``target`` are the same on every rank. Every rank returns the loss
            of the whole vocabulary and the gradient of its weight slice; the gradients of the
            hidden states are summed over the ranks inside (one all-reduce), so every rank
            returns the full ones. This takes the place of a column-parallel output layer: give
            it the hidden states as they enter that layer, not through Megatron's
            ``copy_to_tensor_model_parallel_region`` (whose backward all-reduces the same
            gradient again).

    Returns:
        float32 loss (float64 for float64 inputs; a scalar, or [...] with
        ``reduction="none"``), or ``RDropParts``.
    """
    check_pair("hidden1", hidden1, "hidden2", hidden2, last_dim="H", what="the hidden size")
    _check_weight(weight, bias, hidden1, vocab_parallel_group is not None)
    check_target(target, hidden1.shape[:-1], hidden1.device, "hidden1", "the hidden size")
    check_options(alpha=alpha, ignore_index=ignore_index, reduction=reduction,
                  label_smoothing=label_smoothing, softcap=softcap, return_parts=return_parts)
    _check_chunk_size(chunk_size)
    distributed.check_group(vocab_parallel_group)
    backend = resolve_backend(backend, hidden1, "hidden1")
    refuse_functorch("linear_rdrop_loss", "compute the logits and call rdrop_loss(..., "
                     "backend='torch')", hidden1=hidden1, hidden2=hidden2, weight=weight,
                     bias=bias, target=target)
    target = int64_labels(target)

    batch_shape = hidden1.shape[:-1]
    h1 = hidden1.reshape(-1, hidden1.shape[-1])
    h2 = hidden2.reshape(-1, hidden2.shape[-1])
    labels = None if target is None else target.reshape(-1).contiguous()
    weights = row_weights(target, batch_shape, ignore_index, reduction, hidden1.device,
                          _accumulation_dtype(hidden1))
    if chunk_size is None:
        chunk_size = default_chunk_size(h1.shape[0], h1.shape[1], weight.shape[0], h1.dtype,
                                        h1.device)
        if vocab_parallel_group is not None:  # every rank makes the same collectives
            chunk_size = distributed.agree_min(chunk_size, (*h1.shape, h1.dtype, h1.device),
                                               weight, vocab_parallel_group, h1.device)
    options = (float(alpha), ignore_index, float(label_smoothing),
               None if softcap is None else float(softcap), backend, chunk_size,
               vocab_parallel_group)
    rows, parts = LinearRDropFunction.apply(h1, h2, weight, bias, labels, weights,
                                            reduction == "none", torch.is_grad_enabled(), options)
    loss = rows.reshape(batch_shape) if reduction == "none" else rows
    if return_parts:
        ce1, ce2, kl = (reduce_rows(p, weights, reduction, batch_shape) for p in parts)
        return RDropParts(loss, ce1, ce2, kl)
    return loss


class LinearRDropLoss(nn.Module):
    """Module form of :func:`linear_rdrop_loss`; the keywords are fixed at construction.

    ``forward(hidden1 [..., H], hidden2 [..., H], weight [V, H], target [...] | None,
    bias [V] | None)``.
    """

    def __init__(self, *, alpha: float = 1.0, ignore_index: int = -100, reduction: str = "mean",
                 label_smoothing: float = 0.0, softcap: Optional[float] = None,
                 return_parts: bool = False, chunk_size: Optional[int] = None,
                 backend: str = "auto", vocab_parallel_group=None) -> None:
        super().__init__()
        check_options(alpha=alpha, ignore_index=ignore_index, reduction=reduction,
                      label_smoothing=label_smoothing, softcap=softcap, return_parts=return_parts)
        _check_chunk_size(chunk_size)
        check_backend(backend)
        distributed.check_group(vocab_parallel_group)
        self.kwargs = dict(alpha=alpha, ignore_index=ignore_index, reduction=reduction,
                           label_smoothing=label_smoothing, softcap=softcap,
                           return_parts=return_parts, chunk_size=chunk_size, backend=backend,
                           vocab_parallel_group=vocab_parallel_group)

    def forward(self, hidden1: Tensor, hidden2: Tensor, weight: Tensor,
                target: Optional[Tensor] = None,
                bias: Optional[Tensor] = None) -> Union[Tensor, RDropParts]:
        return linear_rdrop_loss(hidden1, hidden2, weight, target, bias, **self.kwargs)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())

    def __deepcopy__(self, memo):
        return distributed.deepcopy_sharing(self, self.kwargs["vocab_parallel_group"], memo)


def default_chunk_size(n_rows: int, hidden_size: int, vocab_size: int, dtype: torch.dtype,
                       device: torch.device) -> int:
    """Rows per chunk: a chunk of logits about as large as one pass's hidden states
    (N H / V rows, rounded up to a power of 2), at least 64 rows so that the matmuls stay
    efficient, and at most what lets the chunk's logits of both passes, with their fp32 copies
    for the weight gradient, take a quarter of the free memory."""
    vocab_size = max(vocab_size, 1)  # a rank's slice of the vocabulary may be empty
    rows = 2 ** math.ceil(math.log2(max(64, math.ceil(n_rows * hidden_size / vocab_size))))
    elem = torch.finfo(dtype).bits // 8
    bytes_per_row = 2 * vocab_size * (elem + (4 if elem < 4 else 0))
    rows = min(rows, max(1, _free_memory(device) // 4 // bytes_per_row))
    return max(1, min(rows, n_rows))


@torch.compiler.assume_constant_result  # read once while tracing: the chunk size is static
def _free_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30  # unknown: assume a modest machine


def _check_chunk_size(chunk_size) -> None:
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")


def _check_weight(weight: Tensor, bias: Optional[Tensor], hidden: Tensor,
                  vocab_parallel: bool) -> None:
    """vocab_parallel: the weight holds a rank's slice of the vocabulary, which may be empty."""
    hidden_size = hidden.shape[-1]
    check_strided("weight", weight)
    if weight.dim() != 2 or weight.shape[1] != hidden_size or (
            weight.shape[0] == 0 and not vocab_parallel):
        raise ValueError(f"weight must have shape [V, H={hidden_size}] with V >= 1, got "
                         f"{list(weight.shape)}")
    if not matmul_dtypes_meet(weight, hidden) or weight.device != hidden.device:
        raise TypeError(f"weight must have hidden1's dtype and device ({hidden.dtype}, "
                        f"{hidden.device}), or under torch.autocast any of {AUTOCAST_DTYPES}, "
                        f"got {weight.dtype}, {weight.device}")
    if bias is not None:
        if not isinstance(bias, Tensor):
            raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
        check_strided("bias", bias)
        if bias.shape != weight.shape[:1]:
            raise ValueError(f"bias must have shape [V={weight.shape[0]}], got "
                             f"{list(bias.shape)}")
        if not matmul_dtypes_meet(bias, hidden) or bias.device != hidden.device:
            raise TypeError(f"bias must have hidden1's dtype and device ({hidden.dtype}, "
                            f"{hidden.device}), or under torch.autocast any of "
                            f"{AUTOCAST_DTYPES}, got {bias.dtype}, {bias.device}")


AUTOCAST_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def matmul_dtypes_meet(t: Tensor, hidden: Tensor) -> bool:
    """t (the weight or bias) may meet hidden in the logits' matmul: their dtypes are the same,
    or autocast casts both (an fp32 head beside bf16 hidden states, as mixed precision keeps it).
    """
    return t.dtype == hidden.dtype or (
        _autocast_state(hidden.device)["enabled"]
        and t.dtype in AUTOCAST_DTYPES and hidden.dtype in AUTOCAST_DTYPES)


class LinearRDropFunction(torch.autograd.Function):
    """(h1 [N, H], h2 [N, H], W [V, H], b [V] | None, target [N] | None, row_weight [N],
    per_token, grad_enabled, options) -> (loss: a scalar, or [N] when per_token; parts [3, N]
    detached). Without grad_enabled (torch.no_grad) no gradient is made, though the inputs
    require one: needs_input_grad does not see the grad mode.

    The gradients wait for the backward pass, which redoes the chunks with the upstream
    gradient in the row weights, where it is per token, and for fp16 logits: those train with a
    loss scale (GradScaler), an upstream gradient that keeps their small gradients above fp16's
    smallest numbers only if it is applied before they are rounded. The backward pass runs
    under the forward pass's autocast, so that it computes the same logits."""

    @staticmethod
    def forward(ctx, hidden1, hidden2, weight, bias, target, row_weight, per_token, grad_enabled,
                options):
        alpha = options[0]
        ctx.options = options
        ctx.deferred = per_token or _logits_dtype(hidden1) == torch.float16
        if ctx.deferred:
            parts, _ = _chunks(hidden1, hidden2, weight, bias, target, None, options, (False,) * 4)
            ctx.save_for_backward(hidden1, hidden2, weight, bias, target, row_weight)
            ctx.autocast = _autocast_state(hidden1.device)
            rows = row_weight * token_loss(parts, alpha)
            loss = rows if per_token else rows.sum()
        else:
            needs = ctx.needs_input_grad[:4] if grad_enabled else (False,) * 4
            parts, ctx.grads = _chunks(hidden1, hidden2, weight, bias, target,
                                       row_weight if any(needs) else None, options, needs)
            loss = (row_weight * token_loss(parts, alpha)).sum()
        ctx.mark_non_differentiable(parts)
        return loss, parts

    @staticmethod
    def backward(ctx, grad_loss, _grad_parts):
        # the chunks' gradients carry no graph on any backend, the reference's included
        ops.refuse_create_graph("neither is linear_rdrop_loss's on any backend: for one, "
                                "compute the logits and call rdrop_loss(..., backend='torch')")
        if ctx.deferred:
            hidden1, hidden2, weight, bias, target, row_weight = ctx.saved_tensors
            if torch.compiler.is_compiling():
                # not the forward's own tensors: a compiled graph would otherwise find the
                # forward's matmuls in these (common subexpressions of its joint graph, which
                # view and clone do not hide), and keep every chunk's logits for them
                hidden1, hidden2 = hidden1 * 1, hidden2 * 1
            with torch.autocast(**ctx.autocast):
                _, grads = _chunks(hidden1, hidden2, weight, bias, target,
                                   grad_loss * row_weight, ctx.options, ctx.needs_input_grad[:4])
        else:
            # scaled whatever the upstream gradient: reading it would synchronise with a GPU, and
            # the [N, H] and [V, H] gradients cost little next to the chunks' matmuls. Compiled,
            # out of place: a compiled graph may run this backward more than once.
            scale = (lambda g: g * grad_loss) if torch.compiler.is_compiling() else (
                lambda g: g.mul_(grad_loss))
            grads = tuple(None if g is None else scale(g) for g in ops.take_gradients_once(ctx))
        return (*grads, None, None, None, None, None)


def _accumulation_dtype(hidden: Tensor) -> torch.dtype:
    """fp32, or float64 for float64 hidden states (which only the torch backend takes)."""
    return torch.promote_types(hidden.dtype, torch.float32)


def _logits_dtype(hidden: Tensor) -> torch.dtype:
    """The dtype of hidden @ W^T: autocast's where it casts a matmul's inputs (not float64)."""
    autocast = _autocast_state(hidden.device)
    if hidden.dtype != torch.float64 and autocast["enabled"]:
        return autocast["dtype"]
    return hidden.dtype


def _autocast_state(device: torch.device) -> dict:
    """torch.autocast's arguments for the current state on ``device`` (off where it has none:
    meta tensors)."""
    if not torch.amp.is_autocast_available(device.type):
        return dict(device_type="cpu", enabled=False)
    return dict(device_type=device.type, enabled=torch.is_autocast_enabled(device.type),
                dtype=torch.get_autocast_dtype(device.type))


def _chunks(hidden1, hidden2, weight, bias, target, row_weight, options, needs):
    """Per-row parts [3, N] and, with ``row_weight``, the gradients (dh1, dh2, dW, db) that
    ``needs`` asks for, of sum_r row_weight_r * (CE_1 + CE_2 + alpha * symKL)_r.

    A chunk stacks c rows of both passes, [h1; h2] [2c, H], so that each matmul runs once for
    both passes and its logits z [2c, V] hold z1 = z[:c] and z2 = z[c:]."""
    alpha, ignore_index, label_smoothing, softcap, backend, chunk_size, group = options
    kernel_args = (ignore_index, label_smoothing, softcap, backend, group)
    n_rows = hidden1.shape[0]
    acc = _accumulation_dtype(hidden1)
    parts = torch.empty((3, n_rows), dtype=acc, device=hidden1.device)
    with_grads = row_weight is not None
    dh1 = torch.empty_like(hidden1) if with_grads and needs[0] else None
    dh2 = torch.empty_like(hidden2) if with_grads and needs[1] else None
    dw = torch.zeros(weight.shape, dtype=acc, device=weight.device) \
        if with_grads and needs[2] else None
    db = torch.zeros(weight.shape[:1], dtype=acc, device=weight.device) \
        if with_grads and needs[3] else None
    for start in range(0, n_rows, chunk_size):
        rows = slice(start, start + chunk_size)
        # both passes' rows in one buffer, copied, not concatenated: torch.cat under autocast
        # refuses 16-bit inputs of the other 16-bit dtype (bf16 hidden states, fp16 autocast)
        c = len(hidden1[rows])
        h = hidden1.new_empty((2 * c, hidden1.shape[1]))
        h[:c], h[c:] = hidden1[rows], hidden2[rows]
        z = torch.mm(h, weight.t()) if bias is None else torch.addmm(bias, h, weight.t())
        labels = None if target is None else target[rows]
        if not with_grads:
            parts[:, rows] = _forward(z, labels, kernel_args)
            continue
        # z becomes dL/dz in place
        parts[:, rows] = _gradients_into_logits(z, labels, row_weight[rows], alpha, kernel_args)
        if dh1 is not None or dh2 is not None:
            dh = torch.mm(z, weight)  # dh = dz W
            for out, half in ((dh1, dh[:c]), (dh2, dh[c:])):
                if out is not None:
                    out[rows] = half
        if dw is not None:
            _add_matmul_(dw, z.t(), h)  # dW += dz^T h
        if db is not None:
            db += z.sum(0, dtype=acc)  # db += sum_rows dz
    if not with_grads:
        return parts, None
    if group is not None:  # each rank's dh is its slice's share: the sum is the gradient
        distributed.all_reduce_sum([dh1, dh2], group)
    return parts, (dh1, dh2, None if dw is None else dw.to(weight.dtype),
                   None if db is None else db.to(bias.dtype))


def _add_matmul_(acc, a, b):
    """acc += a @ b, accumulated in acc's dtype (fp32 or float64) whatever that of a and b: b
    may be wider than a, fp32 hidden states beside the 16-bit gradients of autocast's logits."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b.to(a.dtype))
    elif a.is_cuda:  # in a's dtype, as autocast multiplies (mm with out_dtype takes one dtype)
        acc += torch.mm(a, b.to(a.dtype), out_dtype=acc.dtype)
    else:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


def _forward(z, labels, kernel_args):
    """Per-row parts [3, c] of a chunk's stacked logits z [2c, V]."""
    *kernel_args, group = kernel_args
    backend = kernel_args[-1]
    if backend == "torch":
        parts = reference.rdrop_loss(*ops.halves(z, None), labels, reduction="none",
                                     return_parts=True, vocab_parallel_group=group,
                                     **_reference_kwargs(kernel_args))
        return torch.stack(parts[1:])
    if group is not None:
        return ops.vocab_parallel_rows(z, None, labels, group, *kernel_args)[0]
    return ops.rdrop_forward(z, None, labels, *kernel_args)[0]


def _gradients_into_logits(z, labels, row_weight, alpha, kernel_args):
    """Overwrite a chunk's stacked logits z [2c, V] with the gradients of
    sum_r w_r (CE_1 + CE_2 + alpha symKL)_r; return the per-row parts [3, c]."""
    *kernel_args, group = kernel_args
    backend = kernel_args[-1]
    if backend != "torch" and group is not None:
        parts, stats, local_labels = ops.vocab_parallel_rows(z, None, labels, group, *kernel_args)
        ops.write_gradients(z, None, local_labels, stats, row_weight, alpha,
                            distributed.LOCAL_IGNORE, *kernel_args[1:])
        return parts
    if backend != "torch":
        return ops.forward_inplace(z, None, labels, row_weight, alpha, *kernel_args)
    leaf = z.detach().requires_grad_()
    with torch.enable_grad():
        parts = reference.rdrop_loss(*ops.halves(leaf, None), labels, reduction="none",
                                     return_parts=True, vocab_parallel_group=group,
                                     **_reference_kwargs(kernel_args))
        rows = parts.ce1 + parts.ce2 + alpha * parts.kl
        (grad,) = torch.autograd.grad((rows * row_weight).sum(), leaf)
    z.copy_(grad)
    return torch.stack(parts[1:]).detach()


def _reference_kwargs(kernel_args):
    ignore_index, label_smoothing, softcap, _ = kernel_args
    return dict(ignore_index=ignore_index, label_smoothing=label_smoothing, softcap=softcap)
