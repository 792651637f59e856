"""R-Drop loss in plain PyTorch, written to be read.

The textbook composition (log_softmax, kl_div, cross entropy) with the full semantics of
``fastrdrop.rdrop_loss``. It serves as the ``backend="torch"`` path, as the baseline of the tests
and as the eager provider of the benchmarks. It materialises several [N, V] tensors: it is the
thing the fused kernels replace, not a fast path.
"""

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from . import distributed
from ._common import (
    RDropParts,
    check_args,
    check_target_values,
    int64_labels,
    reduce_rows,
    row_weights,
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
    return_parts: bool = False,
    vocab_parallel_group=None,
) -> Union[Tensor, RDropParts]:
    """``CE(z1, y) + CE(z2, y) + alpha * 1/2 * (KL(p1 || p2) + KL(p2 || p1))``, per token, reduced.

    The arguments (except ``inplace_backward`` and ``backend``) and results of
    :func:`fastrdrop.rdrop_loss`. Computes in float32 (float64 for
    float64 logits) whatever the input dtype. With ``vocab_parallel_group`` every rank gathers
    the logits of the whole vocabulary and computes the loss of the whole rows; the gradient of
    its slice is its share (nothing is communicated in the backward pass).
    """
    check_args(logits1, logits2, target, alpha=alpha, ignore_index=ignore_index,
               reduction=reduction, label_smoothing=label_smoothing, softcap=softcap,
               return_parts=return_parts, vocab_parallel=vocab_parallel_group is not None)
    distributed.check_group(vocab_parallel_group)
    target = int64_labels(target)
    if vocab_parallel_group is not None:
        logits1 = distributed.gather_vocab(logits1, vocab_parallel_group)
        logits2 = distributed.gather_vocab(logits2, vocab_parallel_group)
        distributed.check_whole_vocabulary(logits1.shape[-1])
    vocab_size = logits1.shape[-1]
    check_target_values(target, vocab_size, ignore_index, "torch")
    compute_dtype = torch.promote_types(logits1.dtype, torch.float32)
    z1 = logits1.reshape(-1, vocab_size).to(compute_dtype)
    z2 = logits2.reshape(-1, vocab_size).to(compute_dtype)
    # A position where both logits are -inf (a masked vocabulary entry) is not part of the row.
    masked = torch.isneginf(z1) & torch.isneginf(z2)
    # Rows never read: an ignored token's (its loss and gradient are 0 whatever it holds, NaN
    # included), and a row with nothing present (its KL is the empty sum, 0; a label there has
    # probability 0, see below). They are replaced by zeros, so that no NaN from them reaches a
    # gradient through 0 * NaN.
    unread = masked.all(-1)
    if target is not None:
        unread = unread | (target.reshape(-1) == ignore_index)
    z1 = torch.where(unread[:, None], 0.0, z1)
    z2 = torch.where(unread[:, None], 0.0, z2)
    absent = masked & ~unread[:, None]
    if softcap is not None:
        z1 = (softcap * torch.tanh(z1 / softcap)).masked_fill(absent, float("-inf"))
        z2 = (softcap * torch.tanh(z2 / softcap)).masked_fill(absent, float("-inf"))

    # In the sums, log p at absent positions is set to 0 (any finite value would do): p = 0
    # there, so every term that holds it is multiplied by 0, and 0 * -inf would be NaN. The label's
    # own log p keeps its -inf: a label on an absent entry has an infinite cross entropy.
    logp1_full, logp2_full = F.log_softmax(z1, dim=-1), F.log_softmax(z2, dim=-1)
    logp1 = logp1_full.masked_fill(absent, 0.0)
    logp2 = logp2_full.masked_fill(absent, 0.0)

    # symKL = 1/2 (KL(p1 || p2) + KL(p2 || p1)); kl_div(input=log q, target=log p) is sum p log(p/q)
    kl_12 = F.kl_div(logp2, logp1, reduction="none", log_target=True).sum(-1)
    kl_21 = F.kl_div(logp1, logp2, reduction="none", log_target=True).sum(-1)
    kl = 0.5 * (kl_12 + kl_21)
    # A -inf in one pass only is probability 0 on that side alone: the KL is +inf, where
    # kl_div makes 0 * -inf = NaN of it. A row with NaN or +inf, or a pass with no finite entry,
    # has no distribution: NaN.
    one_sided = (torch.isneginf(z1) ^ torch.isneginf(z2)).any(-1)
    undefined = ((z1.isnan() | z2.isnan() | z1.isposinf() | z2.isposinf()).any(-1)
                 | z1.isneginf().all(-1) | z2.isneginf().all(-1))
    kl = torch.where(one_sided & ~undefined, float("inf"), kl)

    if target is None:
        ce1 = ce2 = torch.zeros_like(kl)
    else:
        labels = target.reshape(-1)
        counted = labels != ignore_index
        # An unchecked label outside [0, V) (on GPU, see fastrdrop.set_label_check) is not read:
        # its token's parts, and through them its gradients, are NaN.
        bad = counted & ((labels < 0) | (labels >= vocab_size))
        labels = labels.masked_fill(bad, 0)
        poison = torch.where(bad, float("nan"), 1.0).to(compute_dtype)
        n_present = (~absent).sum(-1)
        ce1 = poison * _cross_entropy(logp1_full, logp1, labels, counted, n_present, ignore_index,
                                      label_smoothing)
        ce2 = poison * _cross_entropy(logp2_full, logp2, labels, counted, n_present, ignore_index,
                                      label_smoothing)
        kl = poison * torch.where(counted, kl, 0.0)  # an ignored token adds to neither term
        # A label on an absent entry has probability 0: its cross entropy is +inf.
        label_absent = counted & masked.gather(1, labels.masked_fill(~counted, 0)[:, None])[:, 0]
        ce1 = torch.where(label_absent, float("inf"), ce1)
        ce2 = torch.where(label_absent, float("inf"), ce2)
    # A token whose loss is not finite has no gradient: both of its rows get NaN.
    kl = _NaNGradientRows.apply(kl, ce1 + ce2 + kl, logits1, logits2)

    batch_shape = logits1.shape[:-1]
    weights = row_weights(target, batch_shape, ignore_index, reduction, kl.device, compute_dtype)

    def reduce(rows: Tensor) -> Tensor:
        return reduce_rows(rows, weights, reduction, batch_shape)

    loss = reduce(ce1 + ce2 + alpha * kl)
    if return_parts:
        return RDropParts(loss, reduce(ce1), reduce(ce2), reduce(kl))
    return loss


def _cross_entropy(
    logp_full: Tensor, logp: Tensor, labels: Tensor, counted: Tensor, n_present: Tensor,
    ignore_index: int, label_smoothing: float,
) -> Tensor:
    """Per-token cross entropy against (1 - eps) one_hot(y) + eps * uniform over the present
    entries of the row (logp: 0 where absent); 0 where ignored. Without masked entries this is
    F.cross_entropy's."""
    nll = F.nll_loss(logp_full, labels, ignore_index=ignore_index, reduction="none")
    if label_smoothing == 0.0:
        return nll
    smooth = -logp.sum(-1) / n_present
    return torch.where(counted, (1.0 - label_smoothing) * nll + label_smoothing * smooth, 0.0)


class _NaNGradientRows(torch.autograd.Function):
    """``x`` [N] as it is, whose backward pass also gives both logits [..., V] NaN gradient rows
    where ``row_loss`` [N] is not finite (a loss of NaN or inf has no gradient), 0 elsewhere.
    Written for torch.func's transforms too (setup_context, out-of-place ops, a generated vmap
    rule, a jvp), so that the reference runs under torch.func.grad, vmap, jacrev and jvp."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, row_loss, logits1, logits2):
        return x.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, row_loss, logits1, logits2 = inputs
        ctx.save_for_backward(row_loss)
        ctx.like = (logits1.shape, logits1.dtype), (logits2.shape, logits2.dtype)

    @staticmethod
    def backward(ctx, grad):
        (row_loss,) = ctx.saved_tensors
        not_finite = ~torch.isfinite(row_loss)
        rows = []
        for (shape, dtype), needed in zip(ctx.like, ctx.needs_input_grad[2:], strict=True):
            if needed:
                zeros = torch.zeros(shape, dtype=dtype, device=grad.device).view(-1, shape[-1])
                rows.append(zeros.masked_fill(not_finite[:, None], float("nan")).view(shape))
            else:
                rows.append(None)
        return grad, None, *rows

    @staticmethod
    def jvp(ctx, x_tangent, *_):  # forward mode: the tangent of x, as it is
        return x_tangent
