"""Vocabulary-parallel R-Drop (vocab_parallel_group=) on 2, 3 and 4 gloo ranks, each holding a
slice of the vocabulary (uneven, down to one entry), against the float64 oracle of one process on
the whole vocabulary, by the rule of tests/oracle.py: the loss on every rank, and each rank's
slice of the gradients. Every backend (the reference included) and every API (rdrop_loss,
stacked_rdrop_loss, linear_rdrop_loss) over a covering grid of the keywords; the bytes that the
collectives move; labels out of range; DTensor logits from ColwiseParallel."""

import functools

import pytest
import torch
import torch.distributed as dist

import fastrdrop
from fastrdrop import reference

from conftest import DEVICE, fused_backends
from oracle import assert_oracle_rule, oracle_loss
from ranks import run_ranks

BACKENDS = [*fused_backends(), "torch"]
# slice sizes per rank (V = 41): uneven, one rank with a single entry, and one with none (a
# DTensor's shards of a vocabulary narrower than its mesh)
SPLITS = {2: [29, 12], 3: [20, 1, 20], 4: [9, 1, 0, 31]}
N, H = 5, 8

# One covering grid: each keyword value appears (DESIGN.md section 9: every keyword gives the
# one-process result). masked: a few entries -inf in both passes, and row 1 masked over the whole
# slice of rank 1 (a rank that sees nothing of that row). ignore_index 0: a pad id that is also
# the local id, on rank 1, of the label V_0 that one token has.
CASES = [  # api, dtype, reduction, target, smoothing, softcap, in place, parts, masked, ignore
    ("pair", torch.float32, "mean", True, 0.1, None, False, True, True, -100),
    ("pair", torch.bfloat16, "sum", False, 0.0, 20.0, True, False, False, -100),
    ("stacked", torch.float32, "none", True, 0.0, 20.0, True, True, True, 0),
    ("stacked", torch.bfloat16, "batchmean", True, 0.1, None, False, False, False, -100),
    ("pair", torch.float32, "none", False, 0.0, None, False, True, True, -100),
    ("pair", torch.float32, "sum", True, 0.1, None, False, False, False, 0),
    ("linear", torch.float32, "mean", True, 0.1, 20.0, False, True, True, 0),
    ("linear", torch.float32, "none", False, 0.0, None, False, False, False, -100),
    ("linear", torch.bfloat16, "sum", True, 0.0, None, False, True, False, -100),
    ("stacked", torch.float16, "mean", True, 0.1, None, True, False, True, -100),
]


def inputs(case, world):
    """The whole problem, the same on every rank: logits or hidden states and a weight, labels."""
    api, dtype, _, has_target, *_, masked, ignore_index = case
    vocab = sum(SPLITS[world])
    gen = torch.Generator().manual_seed(7)
    if api == "linear":
        h1 = torch.randn(N, H, generator=gen, dtype=torch.float64)
        h2 = h1 + 0.3 * torch.randn(N, H, generator=gen, dtype=torch.float64)
        weight = torch.randn(vocab, H, generator=gen, dtype=torch.float64) / H ** 0.5 * 3
        tensors = [h1, h2, weight]
    else:
        z1 = 3 * torch.randn(N, vocab, generator=gen, dtype=torch.float64)
        z2 = z1 + 0.5 * torch.randn(N, vocab, generator=gen, dtype=torch.float64)
        if masked:
            absent = torch.rand(N, vocab, generator=gen) < 0.2
            start = SPLITS[world][0]
            absent[1, start:start + SPLITS[world][1]] = True  # rank 1 sees none of row 1
            absent[:, 0] = False
            absent[0, start] = False  # row 0's label may be V_0 (see ignore_index 0)
            z1[absent] = z2[absent] = float("-inf")
        tensors = [z1, z2]
    target = None
    if has_target:
        target = torch.randint(0, vocab, (N,), generator=gen)
        if api != "linear" and masked:  # labels on present entries
            present = ~torch.isneginf(tensors[0])
            target = torch.multinomial(present.float(), 1, generator=gen)[:, 0]
        target[3] = ignore_index
        if ignore_index == 0:
            target[0] = SPLITS[world][0]  # global V_0: local 0 on rank 1, a counted token
    return [t.to(DEVICE, dtype) for t in tensors], None if target is None else target.to(DEVICE)


def loss_and_grads(fn, tensors, grad_scale):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    loss = fn(*leaves)
    grad = torch.full_like(loss, grad_scale)
    return loss.detach(), *torch.autograd.grad(loss, leaves, grad)


def check_case(rank, world, backend, case):
    api, dtype, reduction, _, smoothing, softcap, inplace, parts, _, ignore_index = case
    tensors, target = inputs(case, world)
    start = sum(SPLITS[world][:rank])
    rows = slice(start, start + SPLITS[world][rank])
    options = dict(reduction=reduction, label_smoothing=smoothing, softcap=softcap, alpha=1.3,
                   ignore_index=ignore_index)
    group = dist.group.WORLD

    if api == "linear":
        h1, h2, weight = tensors

        def fused(a, b, w):
            return fastrdrop.linear_rdrop_loss(a, b, w, target, backend=backend,
                                               vocab_parallel_group=group, chunk_size=2,
                                               **options)

        def single(fn, a, b, w):
            return fn(a @ w.t(), b @ w.t(), target, **options)

        got = loss_and_grads(fused, [h1, h2, weight[rows]], 0.7)
        eager = loss_and_grads(functools.partial(single, reference.rdrop_loss), tensors, 0.7)
        truth = loss_and_grads(functools.partial(single, oracle_loss),
                               [t.double() for t in tensors], 0.7)
        eager, truth = (r[:3] + (r[3][rows],) for r in (eager, truth))
        whats = ("loss", "dhidden1", "dhidden2", "dweight slice")
    else:
        z1, z2 = tensors
        keywords = dict(backend=backend, vocab_parallel_group=group, inplace_backward=inplace,
                        return_parts=parts, **options)

        def fused(a, b):
            if api == "stacked":
                out = fastrdrop.stacked_rdrop_loss(torch.cat([a, b]) * 1, target, **keywords)
            else:
                out = fastrdrop.rdrop_loss(a * 1, b * 1, target, **keywords)
            return out.loss if parts else out

        got = loss_and_grads(fused, [z1[:, rows], z2[:, rows]], 0.7)
        eager = loss_and_grads(functools.partial(reference.rdrop_loss, target=target, **options),
                               tensors, 0.7)
        truth = loss_and_grads(functools.partial(oracle_loss, target=target, **options),
                               [t.double() for t in tensors], 0.7)
        eager, truth = ((r[0], r[1][:, rows], r[2][:, rows]) for r in (eager, truth))
        whats = ("loss", "dlogits1 slice", "dlogits2 slice")
        if parts:  # the parts too, the same on every rank
            local = fastrdrop.rdrop_loss(z1[:, rows], z2[:, rows], target, **dict(
                keywords, inplace_backward=False))
            whole = reference.rdrop_loss(z1, z2, target, return_parts=True, **options)
            for a, b in zip(local, whole, strict=True):
                torch.testing.assert_close(a, b.float(), rtol=1e-4, atol=1e-5)
    for what, f, e, t in zip(whats, got, eager, truth, strict=True):
        assert_oracle_rule(f, e, t, dtype, f"rank {rank}/{world} {backend} {case}: {what}")


def _cases_body(rank, world, backend):
    for case in CASES:
        check_case(rank, world, backend, case)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("world", [2, 3, 4])
def test_matches_one_process(world, backend):
    run_ranks(_cases_body, world, backend)


def _float64_linear_body(rank, world):
    # float64 hidden states (the torch backend) keep float64 over the ranks: the gradients of the
    # hidden states, each rank's share summed across them, were rounded to fp32 (3.6e-8 off)
    case = ("linear", torch.float64, "mean", True, 0.1, None, False, False, False, -100)
    (h1, h2, weight), target = inputs(case, world)
    start = sum(SPLITS[world][:rank])
    rows = slice(start, start + SPLITS[world][rank])

    def loss(a, b, w, group=None):
        return fastrdrop.linear_rdrop_loss(a, b, w, target, backend="torch", chunk_size=2,
                                           vocab_parallel_group=group, label_smoothing=0.1)

    got = loss_and_grads(functools.partial(loss, group=dist.group.WORLD),
                         [h1, h2, weight[rows]], 0.7)
    want = loss_and_grads(loss, [h1, h2, weight], 0.7)
    for what, g, w in zip(("loss", "dhidden1", "dhidden2", "dweight slice"), got,
                          (*want[:3], want[3][rows]), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-14, msg=f"rank {rank}: {what}")


def test_float64_linear_stays_float64_over_the_ranks():
    run_ranks(_float64_linear_body, 2)


def _lone_body(rank, world, backend):
    # a -inf in one pass only makes its row's KL +inf, also on a rank whose maxima are far below
    # the row's (its sums are scaled by exp(-300) = 0): rows 0 and 1, on rank 1 and rank 0
    vocab = 2 * 20
    gen = torch.Generator().manual_seed(3)
    z1, z2 = (torch.randn(3, vocab, generator=gen) for _ in range(2))
    z1[0, 20:] -= 300
    z2[0, 20:] -= 300
    z1[0, 25] = z2[1, 5] = float("-inf")
    target = torch.tensor([1, 30, 7])
    rows = slice(20 * rank, 20 * rank + 20)
    z1, z2 = (z[:, rows].to(DEVICE).requires_grad_() for z in (z1, z2))
    loss = fastrdrop.rdrop_loss(z1 * 1, z2 * 1, target.to(DEVICE), backend=backend,
                                reduction="none", vocab_parallel_group=dist.group.WORLD)
    assert loss[0].item() == loss[1].item() == float("inf") and torch.isfinite(loss[2])
    for grad in torch.autograd.grad(loss.sum(), (z1, z2)):
        assert grad[:2].isnan().all() and torch.isfinite(grad[2]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_minus_inf_in_one_pass_on_a_rank_far_below_the_maximum(backend):
    run_ranks(_lone_body, 2, backend)


def _bytes_body(rank, world, backend):
    # what the collectives of one call carry: O(N) bytes, whatever V
    sent = []
    all_reduce = dist.all_reduce

    def counting(tensor, *args, **kwargs):
        sent.append(tensor.numel() * tensor.element_size())
        return all_reduce(tensor, *args, **kwargs)

    dist.all_reduce = counting
    try:
        vocab = 1000 * world
        z1, z2 = (torch.randn(N, vocab // world, device=DEVICE, requires_grad=True)
                  for _ in range(2))
        target = torch.randint(0, vocab, (N,), device=DEVICE)
        loss = fastrdrop.rdrop_loss(z1, z2, target, backend=backend, label_smoothing=0.1,
                                    vocab_parallel_group=dist.group.WORLD)
        forward = list(sent)
        loss.backward()
    finally:
        dist.all_reduce = all_reduce
    # one MAX all-reduce of 2 maxima and a flag per row and the slice sizes, one SUM of 9 sums
    assert forward == [4 * (3 * N + world), 4 * 9 * N], forward
    assert sent == forward  # the backward pass communicates nothing


@pytest.mark.parametrize("backend", fused_backends())
def test_collectives_move_o_of_n_bytes(backend):
    run_ranks(_bytes_body, 2, backend)


def _bad_label_body(rank, world):
    z1, z2 = torch.randn(2, N, 10, device="cpu").unbind(0)
    target = torch.full((N,), 2 * 10 + 3)  # past the whole vocabulary of 2 x 10
    with pytest.raises(ValueError, match="outside"):
        fastrdrop.rdrop_loss(z1, z2, target, backend="native",
                             vocab_parallel_group=dist.group.WORLD)


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the CPU backends check labels")
def test_labels_past_the_whole_vocabulary_raise_on_every_rank():
    run_ranks(_bad_label_body, 2)


def test_group_must_be_a_process_group():
    z = torch.randn(2, 4)
    with pytest.raises(TypeError, match="vocab_parallel_group"):
        fastrdrop.rdrop_loss(z, z, vocab_parallel_group="world")


def _deepcopy_body(rank, world):
    import copy

    group = dist.group.WORLD
    keywords = dict(vocab_parallel_group=group, alpha=0.7)
    head = torch.nn.ModuleDict({"stacked": fastrdrop.StackedRDropLoss(**keywords),
                                "pair": fastrdrop.RDropLoss(**keywords),
                                "linear": fastrdrop.LinearRDropLoss(**keywords)})
    twin = copy.deepcopy(head)
    assert twin["stacked"] is not head["stacked"] and twin["linear"] is not head["linear"]
    assert twin["stacked"].vocab_parallel_group is group
    assert twin["pair"].vocab_parallel_group is group
    assert twin["linear"].kwargs["vocab_parallel_group"] is group
    assert twin["linear"].kwargs is not head["linear"].kwargs
    gen = torch.Generator().manual_seed(rank)
    z = torch.randn(2 * N, 3 + rank, generator=gen, device="cpu").to(DEVICE)
    h = torch.randn(2 * N, H, generator=gen, device="cpu").to(DEVICE)
    w = torch.randn(3 + rank, H, generator=gen, device="cpu").to(DEVICE)
    target = torch.arange(N, device=DEVICE) % (2 * 3 + 1)
    for losses in (head, twin):  # the copy's collectives pair with the original's
        got = [losses["stacked"](z, target), losses["pair"](*z.chunk(2), target),
               losses["linear"](*h.chunk(2), w, target)]
        if losses is head:
            want = got
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_deepcopy_shares_the_process_group():
    """A process group cannot be copied: copy.deepcopy of a loss module holding one (or of a
    model holding such a module) raised; the copy takes the same group."""
    run_ranks(_deepcopy_body, 2)


def _empty_vocabulary_body(rank, world, backend):
    group, target = dist.group.WORLD, torch.zeros(N, dtype=torch.long, device=DEVICE)
    z = torch.zeros(2 * N, 0, device=DEVICE, requires_grad=True)
    h = torch.randn(2 * N, H, device=DEVICE, requires_grad=True)
    calls = [lambda: fastrdrop.stacked_rdrop_loss(z, target, backend=backend,
                                                  vocab_parallel_group=group),
             lambda: fastrdrop.rdrop_loss(z[:N], z[N:], None, backend=backend,
                                          vocab_parallel_group=group),
             lambda: fastrdrop.linear_rdrop_loss(h[:N], h[N:], torch.zeros(0, H, device=DEVICE),
                                                 None, backend=backend,
                                                 vocab_parallel_group=group)]
    for call in calls:
        with pytest.raises(ValueError, match="vocab_parallel_group is empty"):
            call()


@pytest.mark.skipif(DEVICE.type != "cpu", reason="read back on CPU only: a host sync elsewhere")
@pytest.mark.parametrize("backend", ["torch", *fused_backends()])
def test_a_vocabulary_empty_on_every_rank_raises(backend):
    """A whole vocabulary of 0 entries (one rank's slice may be empty, not all) is refused on
    every rank, as V = 0 is in one process; the fused losses were 0, the reference raised an
    error of torch.reshape."""
    run_ranks(_empty_vocabulary_body, 2, backend)


def _reference_compiled_body(rank, world):
    whole = 3 * torch.randn(2 * N, 7, generator=torch.Generator().manual_seed(5))
    z = whole[:, :3] if rank == 0 else whole[:, 3:]
    target = torch.randint(0, 7, (N,), generator=torch.Generator().manual_seed(1))

    def loss(x):
        return fastrdrop.stacked_rdrop_loss(x, target, alpha=0.7, backend="torch",
                                            vocab_parallel_group=dist.group.WORLD)

    results = []
    for fn in (loss, torch.compile(loss, backend="eager")):
        leaf = z.clone().requires_grad_()
        value = fn(leaf)
        results.append((value.detach(), *torch.autograd.grad(value, leaf)))
    torch.testing.assert_close(results[1], results[0])


def test_the_reference_compiles_with_a_split_vocabulary():
    """Its gather of the whole vocabulary runs eagerly in a compiled graph (a graph break, so
    not with fullgraph=True): Dynamo failed on its gathers of 0-d sizes."""
    run_ranks(_reference_compiled_body, 2)


def _empty_shard_body(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    gen = torch.Generator().manual_seed(3)
    z = 3 * torch.randn(6, 3, generator=gen, dtype=torch.float64)
    target = torch.randint(0, 3, (3,), generator=gen)
    mesh = init_device_mesh("cpu", (world,))
    logits = distribute_tensor(z.float(), mesh, [Shard(-1)]).requires_grad_()
    assert logits.to_local().shape[-1] == (0 if rank == world - 1 else 1)
    loss = fastrdrop.stacked_rdrop_loss(logits, target, alpha=0.7, label_smoothing=0.1)
    loss.backward()
    leaf = z.clone().requires_grad_()
    expected = reference.rdrop_loss(leaf[:3], leaf[3:], target, alpha=0.7, label_smoothing=0.1)
    expected.backward()
    torch.testing.assert_close(loss, expected.float().detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits.grad.full_tensor(), leaf.grad.float(), rtol=1e-5, atol=1e-6)
    dist.barrier()


def test_dtensor_vocabulary_narrower_than_the_mesh():
    # 3 entries over 4 ranks: torch gives the last rank an empty shard, which holds nothing
    # (once it raised there, before the first collective, while the others waited in it)
    run_ranks(_empty_shard_body, 4)


def _inplace_layout_body(rank, world, splits):
    # logits that cannot take their gradients in place, on every rank: each must raise before
    # the first collective, a rank whose slice is 0 or 1 wide too (it once went on, and waited
    # in the all-reduce while the others had raised)
    v = splits[rank]
    h = torch.randn(2 * N, H, requires_grad=True)
    weight = torch.randn(v, H)
    target = torch.randint(0, sum(splits), (N,))
    layouts = {
        "rows of a sliced sequence": ((h @ weight.t()).view(2, N, v)[:, :-1], target[None, :-1]),
        "transposed": ((weight @ h.t()).t(), target),  # [2N, V_r] with strides (1, 2N)
        "expanded": ((h[:1] @ weight.t()).expand(2 * N, v), target),
    }
    logits = h @ weight.t()
    with pytest.raises(ValueError, match="inplace_backward=True"):  # one row apart
        fastrdrop.rdrop_loss(logits[:N], logits[1:N + 1], target, inplace_backward=True,
                             backend="native", vocab_parallel_group=dist.group.WORLD)
    for name, (logits, labels) in layouts.items():
        with pytest.raises(ValueError, match="inplace_backward=True"):
            fastrdrop.stacked_rdrop_loss(logits, labels, inplace_backward=True, backend="native",
                                         vocab_parallel_group=dist.group.WORLD)
            pytest.fail(f"{name} logits were taken")
    dist.barrier()


def _inplace_chunks_body(rank, world, splits):
    # a loss computed chunk by chunk over one tensor's rows, in place: an empty slice's chunks
    # each seemed to fill its 0 bytes, and that rank alone found their writes a modification
    h = torch.randn(2 * N, H, requires_grad=True)
    logits = h @ torch.randn(splits[rank], H).t()
    target = torch.randint(0, sum(splits), (N,), generator=torch.Generator().manual_seed(0))
    sum(fastrdrop.rdrop_loss(logits[i:i + 2], logits[N + i:N + i + 2], target[i:i + 2],
                             inplace_backward=True, backend="native",
                             vocab_parallel_group=dist.group.WORLD) for i in (0, 2)).backward()
    dist.barrier()


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the native backend on CPU tensors")
def test_in_place_chunks_with_an_empty_slice_are_taken():
    run_ranks(_inplace_chunks_body, 2, [3, 0])


def _inplace_dtensor_pair_body(rank, world):
    # the same with DTensor logits, whose halves' local shards are views of no common tensor
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    full = torch.randn(2 * N, 1, generator=torch.Generator().manual_seed(0))
    logits = distribute_tensor(full, mesh, [Shard(1)]).requires_grad_() * 1  # rank 1: empty
    with pytest.raises(ValueError, match="inplace_backward=True"):
        fastrdrop.rdrop_loss(logits[:N], logits[1:N + 1], torch.zeros(N, dtype=torch.long),
                             inplace_backward=True, backend="native")
    dist.barrier()


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the native backend on CPU tensors")
@pytest.mark.parametrize("splits", [[3, 0], [3, 1], "dtensor"], ids=str)
def test_logits_that_cannot_be_written_in_place_raise_on_every_rank(splits):
    if splits == "dtensor":
        run_ranks(_inplace_dtensor_pair_body, 2)
    else:
        run_ranks(_inplace_layout_body, len(splits), splits)


def _agreed_chunk_body(rank, world):
    # The default chunk size is the smallest over the ranks, agreed once per head: a rank's
    # default depends on its own slice (made to differ here), whose size may change on one rank
    # only (29 -> 30 entries on rank 0, 12 on rank 1), and then the ranks must still agree anew
    # together. A head used again needs no agreement.
    from fastrdrop import linear

    chosen, agreements = [], []
    apply, default, all_reduce = (linear.LinearRDropFunction.apply, linear.default_chunk_size,
                                  dist.all_reduce)
    linear.LinearRDropFunction.apply = lambda *args: chosen.append(args[-1][5]) or apply(*args)
    linear.default_chunk_size = lambda n, h, vocab, *_: vocab * (rank + 1)
    dist.all_reduce = lambda tensor, *args, **kw: agreements.append(tensor.numel() == 1) or \
        all_reduce(tensor, *args, **kw)
    try:
        hidden = torch.randn(2 * N, H)
        heads = [torch.randn(sizes[rank], H) for sizes in ([29, 12], [58, 36], [30, 12])]
        for weight in (heads[0], heads[1], heads[2], heads[2]):
            fastrdrop.linear_rdrop_loss(*hidden.chunk(2), weight, None,
                                        vocab_parallel_group=dist.group.WORLD)
    finally:
        linear.LinearRDropFunction.apply, linear.default_chunk_size = apply, default
        dist.all_reduce = all_reduce
    assert chosen == [24, 58, 24, 24], chosen  # min(29, 2 x 12), min(58, 2 x 36), ...
    assert sum(agreements) == 3, agreements  # none for the head used again
    dist.barrier()


def test_the_default_chunk_size_is_agreed_per_head():
    # it was agreed once per hidden shape: a second head kept the first head's chunk size; then
    # once per shape and rank's slice size, which one rank's new head could leave unchanged
    # (that rank skipped the all-reduce the other made)
    run_ranks(_agreed_chunk_body, 2)


def _compiled_body(rank, world, backend):
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(11)
    vocab = sum(SPLITS[world])
    z = 3 * torch.randn(2 * N, vocab, generator=gen)
    target = torch.randint(0, vocab, (N,), generator=gen)
    weight = torch.randn(vocab, H, generator=gen) / H ** 0.5
    hidden = torch.randn(2 * N, H, generator=gen)
    start = sum(SPLITS[world][:rank])
    rows = slice(start, start + SPLITS[world][rank])
    group = dist.group.WORLD
    keywords = dict(backend=backend, vocab_parallel_group=group, alpha=0.7, label_smoothing=0.1)

    def stacked(x, inplace):
        return fastrdrop.stacked_rdrop_loss(x * 1, target, inplace_backward=inplace, **keywords)

    def pair(x):
        return fastrdrop.rdrop_loss(*(x * 1).chunk(2), target, **keywords)

    def linear(h, w, chunk_size):  # None: agreed over the ranks, once, while tracing
        return fastrdrop.linear_rdrop_loss(*h.chunk(2), w, target, chunk_size=chunk_size,
                                           **keywords)

    cases = [(functools.partial(stacked, inplace=False), [z[:, rows]]),
             (functools.partial(stacked, inplace=True), [z[:, rows]]),
             (pair, [z[:, rows]]),
             (functools.partial(linear, chunk_size=2), [hidden, weight[rows]]),
             (functools.partial(linear, chunk_size=None), [hidden, weight[rows]])]
    for fn, tensors in cases:
        results = []
        # compiled first: what it reads once (the agreed chunk size) it reads while tracing
        for run in (torch.compile(fn, fullgraph=True), fn):
            leaves = [t.clone().requires_grad_() for t in tensors]
            loss = run(*leaves)
            results.append((loss.detach(), *torch.autograd.grad(loss, leaves)))
        for compiled, eager in zip(*results, strict=True):
            torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    dist.barrier()


@pytest.mark.parametrize("backend", fused_backends())
def test_compile_fullgraph(backend):
    # the partials and the in-place gradients are custom ops, the collectives traced: one graph,
    # eager's loss and gradients (the label check does not run while a graph is traced)
    run_ranks(_compiled_body, 2, backend, timeout=120)
