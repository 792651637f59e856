"""Collectives of the vocabulary-parallel loss: what is reduced across ranks, and why.

Rank r of a process group holds the logits of a contiguous slice of the vocabulary, [N, V_r],
the slices in rank order (their sizes may differ). Each pass's log-sum-exp, the expectations
E_p[D] and E_q[D] of the symmetric KL and the smoothing term are sums over the whole vocabulary
(README, "The math"), so per row they come from each rank's partial statistics of its slice
(``_rdrop_partials_kernel``; ``partials_rows`` in ops.py): a reference m_k per pass at the top of
the slice (its maximum from the Triton kernel, its log-sum-exp rounded to float from the native
one) and, relative to it, s_k = sum exp(z_k - m_k), t_k = sum exp(z_k - m_k) D, sigma_k = sum
(z_k - m_k) and V'; and whether a position of the slice is -inf in one pass only (the row's KL is
then +inf, whatever t_k holds: the Triton kernel leaves it inf or NaN there).

1. MAX all-reduce of the two references per row, M_k = max_r m_k, of that one-pass flag, and of
   each rank's V_r (one entry per rank, the others 0), which gives every rank the offsets of the
   slices;
2. each rank brings its sums to M_k: s_k exp(m_k - M_k), t_k exp(m_k - M_k),
   sigma_k + V'_r (m_k - M_k), and adds the label's logits z_k[y] where y is in its slice (0
   elsewhere: the sum over ranks is the owner's);
3. SUM all-reduce of [s1, s2, t1, t2, sigma1, sigma2, V', z1[y], z2[y]], [9, N] float32;
4. every rank finishes the same parts and stats from them, by the kernels' formulas.

That is 4 (3 N + world) bytes, then 36 N bytes, per call: O(N), never O(N V). The backward pass
needs no communication: a rank's gradient needs the finished stats and, where the label is in its
slice, its position there. The fused linear loss adds one SUM all-reduce of the hidden states'
gradients, whose matmul with each rank's weight slice gives only that slice's share.

Every rank must pass the same tokens, labels and keywords: the collectives pair up by order.
"""

import copy
import functools
import weakref
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

NEG_INF = float("-inf")
# The ignore_index of the local labels that vocab_parallel_rows returns for the backward kernels:
# a global label may be any id, so y - offset may equal the caller's ignore_index (0, a pad id,
# on rank 1 is global label V_0); local ids are in [0, V_r], so -1 is none of them.
LOCAL_IGNORE = -1


def check_group(group) -> None:
    """``vocab_parallel_group`` is None or a process group of an initialised torch.distributed."""
    if group is None:
        return
    if not (dist.is_available() and isinstance(group, dist.ProcessGroup)):
        raise TypeError("vocab_parallel_group must be a torch.distributed ProcessGroup or None, "
                        f"got {type(group).__name__}")


def deepcopy_sharing(module, group, memo: dict):
    """copy.deepcopy of a loss module that holds ``group``: the copy takes the same group. A
    process group is a handle to the ranks' communicator, which cannot be copied (deepcopy
    raised for a module holding one, as for a model that holds such a module)."""
    memo[id(group)] = group
    new = module.__class__.__new__(module.__class__)
    memo[id(module)] = new
    # its state as nn.Module gives it (without a compiled call of the original's, from .compile())
    new.__setstate__(copy.deepcopy(module.__getstate__(), memo))
    return new


def check_whole_vocabulary(total: int) -> None:
    """The slices of the ranks make a vocabulary of ``total`` >= 1 entries (one rank's may be
    empty, not all of them)."""
    if total == 0:
        raise ValueError("the vocabulary split across vocab_parallel_group is empty: every "
                         "rank's slice (of the logits, or of the weight's rows) has V_r = 0, and "
                         "the loss needs V >= 1")


def vocab_parallel_rows(z1: Tensor, z2: Tensor, target: Optional[Tensor], group, *,
                        ignore_index: int, label_smoothing: float, softcap: Optional[float],
                        backend: str, partials_rows, check_labels):
    """(parts [3, N], stats [8, N], labels for this rank's backward pass [N] or None) of the rows
    z1, z2 [N, V_r] of this rank's slice. The labels are local: y - offset in the slice,
    LOCAL_IGNORE where ignored (the backward kernels take it as their ignore_index), or V_r
    (another rank's label: no term here).
    ``partials_rows(z1, z2, label_smoothing, softcap, backend)`` launches the partials kernel;
    ``check_labels(target, V)`` checks the whole vocabulary's size V (a 0-d tensor), and the
    labels against it."""
    n_rows, vocab = z1.shape
    partials = partials_rows(z1, z2, label_smoothing, softcap, backend)  # [10, N]
    world, rank = dist.get_world_size(group), dist.get_rank(group)

    # 1. the references of both passes, the one-pass flag, and the slice sizes
    sizes = torch.zeros(world, dtype=torch.float32, device=z1.device)
    sizes[rank] = vocab
    maxima = torch.cat([partials[0], partials[1], partials[9], sizes])
    dist.all_reduce(maxima, op=dist.ReduceOp.MAX, group=group)
    global_max, lone = maxima[:2 * n_rows].view(2, n_rows), maxima[2 * n_rows:3 * n_rows] > 0
    sizes = maxima[3 * n_rows:]
    offset, total = sizes[:rank].sum().long(), sizes.sum().long()  # on the device: no sync
    check_labels(target, total)

    # 2. this rank's sums, brought to the global references (shift 0 where a pass saw nothing)
    shift = _guarded(partials[0:2])
    new_shift = _guarded(global_max)
    factor = torch.where(partials[0:2] == NEG_INF, 0.0, torch.exp(shift - new_shift))
    packed = torch.empty((9, n_rows), dtype=torch.float32, device=z1.device)
    packed[0:2] = partials[2:4] * factor
    packed[2:4] = partials[4:6] * factor
    packed[4:6] = partials[6:8] + partials[8] * (shift - new_shift)
    packed[6] = partials[8]
    labels = None
    if target is not None:
        packed[7:9], labels = _label_logits(z1, z2, target, offset, total, ignore_index, softcap)
    else:
        packed[7:9] = 0.0

    # 3. the sums over the whole vocabulary
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)

    # 4. the parts and stats of the whole rows
    parts, stats = _finish(global_max, packed, lone, target, ignore_index, label_smoothing)
    return parts, stats, labels


def _guarded(maxima: Tensor) -> Tensor:
    """The maxima as shifts: 0 where a pass saw nothing (never -inf - -inf)."""
    return torch.where(maxima == NEG_INF, 0.0, maxima)


def _label_logits(z1, z2, target, offset, total, ignore_index, softcap):
    """([2, N] the label's softcapped logits where this rank holds it, else 0; NaN for a label
    outside the whole vocabulary), and the local labels for the backward kernel."""
    vocab = z1.shape[1]
    labels = target.to(torch.int64)
    ignored = labels == ignore_index
    here = (labels >= offset) & (labels < offset + vocab) & ~ignored
    if vocab == 0:  # an empty slice holds no label
        values = torch.zeros((2, len(labels)), device=z1.device)
    else:
        local = (labels - offset).clamp(0, vocab - 1)[:, None]
        values = torch.stack([z1.gather(1, local)[:, 0], z2.gather(1, local)[:, 0]]).float()
    if softcap is not None:  # a label on an absent entry stays -inf
        absent = (values == NEG_INF).all(0)
        values = torch.where(absent, NEG_INF, softcap * torch.tanh(values / softcap))
    values = torch.where(here, values, 0.0)
    outside = ~ignored & ((labels < 0) | (labels >= total))
    values = torch.where(outside, float("nan"), values)
    # another rank's label: V_r, a position no row of this slice has
    local_labels = torch.where(ignored, LOCAL_IGNORE, torch.where(here, labels - offset, vocab))
    return values, local_labels


def _finish(maxima, sums, lone, target, ignore_index, eps):
    """parts [3, N] = (CE_1, CE_2, symKL) and stats [8, N] = (m1, m2, log s1, log s2, E_p[D],
    E_q[D], V', row_ok) from the global maxima [2, N], sums [9, N] and one-pass flags [N]: the
    finishing steps of the kernels (triton_kernels._row_stats)."""
    s, t, sigma, n_present, label = sums[0:2], sums[2:4], sums[4:6], sums[6], sums[7:9]
    log_s = torch.log(s)
    expected = t / s  # E_p[D], E_q[D]
    kl = torch.where((s == 0).all(0), 0.0, 0.5 * (expected[0] - expected[1]))
    # -inf in one pass only: +inf, unless the row is NaN (NaN sums) or a pass has no finite entry
    kl = torch.where(lone & (s > 0).all(0), float("inf"), kl)
    ce = torch.zeros_like(s)
    if target is not None:
        # a = z[y] - m, -inf for a label of probability 0, whose cross entropy is inf
        a = torch.where(label == NEG_INF, NEG_INF, label - maxima)
        ce = torch.where(a == NEG_INF, float("inf"), log_s - a)
        if eps > 0:
            ce = ce + eps * torch.where(a == NEG_INF, 0.0, a - sigma / n_present)
        kl = torch.where(label.isnan().any(0), float("nan"), kl)
    parts = torch.stack([ce[0], ce[1], kl])
    row_ok = torch.isfinite(parts.sum(0)).float()
    stats = torch.stack([maxima[0], maxima[1], log_s[0], log_s[1], expected[0], expected[1],
                         n_present, row_ok])
    if target is not None:  # an ignored row is never read: parts, stats 0
        ignored = target.reshape(-1) == ignore_index
        parts = parts.masked_fill(ignored, 0.0)
        stats = stats.masked_fill(ignored, 0.0)
    return parts, stats


def all_reduce_sum(tensors, group) -> None:
    """Sums each tensor over the ranks of ``group``, in place, in one all-reduce, in fp32 (float64
    where one of them is)."""
    tensors = [t for t in tensors if t is not None]
    if not tensors:
        return
    dtype = functools.reduce(torch.promote_types, (t.dtype for t in tensors), torch.float32)
    flat = torch.cat([t.reshape(-1).to(dtype) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    for t, part in zip(tensors, flat.split([t.numel() for t in tensors]), strict=True):
        t.copy_(part.view_as(t))


_AGREED: "weakref.WeakKeyDictionary[dist.ProcessGroup, dict]" = weakref.WeakKeyDictionary()


def agree_min(value: int, key: tuple, owner, group, device) -> int:
    """The smallest ``value`` over the ranks of ``group``, for a setting that every rank must share
    (the chunk size of the fused linear loss, which sets how many collectives a call makes). Once
    per ``key``, which must be the same on every rank, and ``owner``, each rank's own object that
    ``value`` depends on (its slice of the output embedding: a rank's value depends on its slice,
    whose size may change on one rank and not on another, so it cannot be part of the key). The
    ranks make the same calls with their slices of the same heads, so a call with another owner,
    on every rank, agrees anew. That call reads the result back to the host; later calls with the
    key and the owner (a training loop's later steps) make no collective and no read. While a
    graph is traced, an agreement of the key is taken whatever its owner; the eager call after
    it agrees anew."""
    agreed = _AGREED.setdefault(group, {})
    tracing = torch.compiler.is_compiling()
    held = agreed.get(key)
    if held is not None and (tracing or held[1]() is owner):
        return held[0]
    result = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(result, op=dist.ReduceOp.MIN, group=group)
    # the owner held weakly: one freed and another made at its address is another owner
    agreed[key] = (int(result.item()), (lambda: None) if tracing else weakref.ref(owner))
    return agreed[key][0]


class _GatheredVocab(torch.autograd.Function):
    """logits [..., V_r] of this rank -> [..., V] of all ranks' slices, in rank order; the
    backward pass returns this rank's slice of the gradient: each rank computes the same loss
    from the same gathered logits, so its slice is its whole gradient (no communication)."""

    @staticmethod
    def forward(ctx, local, group):
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        sizes = [torch.zeros((), dtype=torch.int64, device=local.device) for _ in range(world)]
        dist.all_gather(sizes, torch.tensor(local.shape[-1], device=local.device), group=group)
        sizes = [int(v) for v in sizes]
        widest = max(sizes)
        padded = torch.nn.functional.pad(local.contiguous(), (0, widest - local.shape[-1]))
        gathered = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(gathered, padded, group=group)
        ctx.slice = (sum(sizes[:rank]), local.shape[-1])
        return torch.cat([g[..., :v] for g, v in zip(gathered, sizes, strict=True)], dim=-1)

    @staticmethod
    def backward(ctx, grad):
        start, width = ctx.slice
        return grad[..., start:start + width], None


@torch.compiler.disable  # run eagerly in a compiled graph: Dynamo failed on its 0-d gathers
def gather_vocab(local: Tensor, group) -> Tensor:
    """The logits of the whole vocabulary on every rank, differentiable (the reference's way: it
    materialises [..., V] and is written to be read, not to be fast)."""
    return _GatheredVocab.apply(local, group)


def is_dtensor(t: Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch without DTensor
        return False
    return isinstance(t, DTensor)


def from_dtensor(*tensors, group=None):
    """DTensor logits sharded on the last dimension of a 1-D mesh -> (their local slices, ...,
    the mesh's process group); labels given as a DTensor -> the full labels. Plain tensors pass
    through with ``group``."""
    if not any(is_dtensor(t) for t in tensors):
        return (*tensors, group)
    from torch.distributed.tensor import Shard

    out = []
    for t in tensors:
        if not is_dtensor(t):
            out.append(t)
            continue
        if t.is_floating_point():
            mesh, placements = t.device_mesh, t.placements
            if mesh.ndim != 1 or placements[0] not in (Shard(t.ndim - 1), Shard(-1)):
                raise ValueError(
                    "DTensor logits must be sharded on their last (vocabulary) dimension over "
                    f"a 1-D device mesh, Shard(-1); got placements {placements} on a "
                    f"{mesh.ndim}-D mesh")
            if group is not None and group is not mesh.get_group():
                raise ValueError("vocab_parallel_group must be the DTensor logits' mesh group "
                                 "(or None)")
            group = mesh.get_group()
            out.append(t.to_local())
        else:
            out.append(t.full_tensor())
    return (*out, group)
