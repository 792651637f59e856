"""inplace_backward: gradients live in the logits' storage; what autograd keeps and allocates."""

import functools

import pytest
import torch
from allocations import AllocationLog

import fastrdrop
from fastrdrop import ops
from fastrdrop.ops import N_STATS

from conftest import DEVICE, fused_backends
from inputs import labels, logits_pair
from oracle import assert_oracle_rule, loss_and_grads, oracle_loss


def forward_backward(backend, z1, z2, target, inplace, grad_output=None, **kwargs):
    loss = fastrdrop.rdrop_loss(z1, z2, target, backend=backend, inplace_backward=inplace,
                                **kwargs)
    return loss, torch.autograd.grad(loss, (z1, z2), grad_output)


@pytest.mark.parametrize("backend", fused_backends())
def test_gradients_share_storage_and_nothing_nv_is_allocated(backend):
    n_rows, vocab_size = 8, 2048
    h1, h2 = (z.requires_grad_() for z in logits_pair((n_rows, vocab_size), torch.bfloat16))
    z1, z2 = h1 * 1, h2 * 1  # non-leaf logits, as a model's output would be
    ptrs = (z1.data_ptr(), z2.data_ptr())
    one_nv_buffer = n_rows * vocab_size * z1.element_size()
    with AllocationLog() as log:
        _, (g1, g2) = forward_backward(backend, z1, z2, labels((n_rows,), vocab_size), True)
    assert (g1.data_ptr(), g2.data_ptr()) == ptrs
    assert max(log.sizes) < one_nv_buffer, log.sizes

    # the default mode, by contrast, allocates the two gradients
    z1, z2 = h1 * 1, h2 * 1
    with AllocationLog() as log:
        forward_backward(backend, z1, z2, labels((n_rows,), vocab_size), False)
    assert sorted(log.sizes)[-2:] == [one_nv_buffer, one_nv_buffer]


@pytest.mark.parametrize("backend", fused_backends())
def test_gradients_of_halves_point_into_the_base(backend):
    # z1, z2 = halves of one [2N, V] tensor: the gradients handed to autograd are those halves.
    base = torch.cat(logits_pair((4, 999), torch.float32)).requires_grad_()
    logits = base * 1
    z1, z2 = logits.chunk(2)
    seen = []
    z1.register_hook(lambda g: seen.append(g.data_ptr()))
    z2.register_hook(lambda g: seen.append(g.data_ptr()))
    fastrdrop.rdrop_loss(z1, z2, labels((4,), 999), backend=backend,
                         inplace_backward=True).backward()
    assert sorted(seen) == sorted([z1.data_ptr(), z2.data_ptr()])


@pytest.mark.parametrize("backend", fused_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none", "batchmean"])
@pytest.mark.parametrize("grad_scale", ["one", "random"])
def test_inplace_matches_oracle(backend, dtype, reduction, grad_scale):
    z1, z2 = logits_pair((2, 3, 1500), dtype, masked=0.1)
    target = labels((2, 3), 1500, logits=z1)
    kwargs = dict(reduction=reduction, label_smoothing=0.1, softcap=30.0, alpha=2.0)
    shape = (2, 3) if reduction == "none" else ()
    g = torch.ones(shape) if grad_scale == "one" else torch.rand(shape) + 0.5
    g = g.to(z1.device)
    fused = loss_and_grads(functools.partial(
        fastrdrop.rdrop_loss, target=target, backend=backend, inplace_backward=True, **kwargs),
        z1, z2, g)
    eager = loss_and_grads(functools.partial(fastrdrop.reference.rdrop_loss, target=target,
                                             **kwargs), z1, z2, g)
    truth = loss_and_grads(functools.partial(oracle_loss, target=target, **kwargs),
                           z1.double(), z2.double(), g)
    # With grad_output != 1 the in-place gradient is rounded to the dtype twice: in the forward
    # pass, and again after the scaling in the backward pass (fp16's: once, in the backward pass)
    extra = 1 if grad_scale == "random" and dtype != torch.float16 else 0
    for what, f, e, t in zip(("loss", "dlogits1", "dlogits2"), fused, eager, truth, strict=True):
        assert_oracle_rule(f, e, t, dtype, what, extra_roundings=extra if what != "loss" else 0)


@pytest.mark.parametrize("backend", fused_backends())
@pytest.mark.parametrize("stacked", [False, True], ids=["halves", "stacked"])
def test_fp16_gradients_in_place_see_the_loss_scale(backend, stacked):
    # GradScaler's upstream gradient, 2^16: gradients p / N that lie below fp16's subnormals
    # for an upstream gradient of 1 were written as 0 in the forward pass, before the scale
    # reached them (75% of the entries at 512 x 32000). fp16 writes them in the backward pass,
    # as the default mode computes them: the same bits.
    z1, z2 = logits_pair((16, 2048), torch.float16, spread=4.0)
    target = labels((16,), 2048, logits=z1, ignored=0.0)
    scale = torch.tensor(2.0 ** 16, device=DEVICE)
    grads = []
    for inplace in (False, True):
        leaf = torch.cat([z1, z2]).requires_grad_()
        if stacked:
            loss = fastrdrop.stacked_rdrop_loss(leaf * 1, target, backend=backend,
                                                inplace_backward=inplace)
        else:
            loss = fastrdrop.rdrop_loss(*(leaf * 1).chunk(2), target, backend=backend,
                                        inplace_backward=inplace)
        grads.append(torch.autograd.grad(loss, leaf, scale)[0])
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)
    truth = loss_and_grads(functools.partial(oracle_loss, target=target), z1.double(),
                           z2.double(), scale.double())
    truth = torch.cat(truth[1:]).abs()
    normal = truth >= torch.finfo(torch.float16).tiny
    # about 30% of the entries: 0 for an upstream gradient of 1, normal numbers for the scale's
    assert (normal & (truth / scale < 2.0 ** -25)).float().mean() > 0.2
    assert (grads[1][normal] != 0).all()


@pytest.mark.parametrize("backend", fused_backends())
def test_fp16_in_place_keeps_autograd_checks(backend):
    # fp16's logits keep their values until the backward pass writes the gradients over them: an
    # op that saved them after the loss's forward, and labels changed in between, make autograd
    # raise, as in the other modes (both went through silently at first)
    z = torch.cat(logits_pair((4, 300), torch.float16)).requires_grad_()
    target = labels((4,), 300, ignored=0.0)
    logits = z * 1
    loss = fastrdrop.stacked_rdrop_loss(logits, target, backend=backend, inplace_backward=True)
    weight = torch.ones((), dtype=torch.float16, device=DEVICE, requires_grad=True)
    aux = (logits * weight).sum()  # saves the logits for the weight's gradient
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        aux.backward()
    loss = fastrdrop.stacked_rdrop_loss(z * 1, target, backend=backend, inplace_backward=True)
    target.fill_(0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.skipif(DEVICE.type != "cuda", reason="a race between a GPU's warps")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_label_entries_are_read_before_any_warp_writes_the_row(dtype):
    # In place, one thread reads a row's label entries while the program's other warps write
    # the row's gradients over its logits: labels in the first block (the frequent tokens) and
    # many rows, in place against the default mode, whose gradients go to buffers of their own
    n_rows, vocab_size = 4096, 32000
    z1, z2 = logits_pair((n_rows, vocab_size), dtype)
    target = torch.randint(0, 64, (n_rows,), device=DEVICE)
    results = []
    for inplace in (False, True):
        leaf = torch.cat([z1, z2]).requires_grad_()
        parts = fastrdrop.stacked_rdrop_loss(leaf * 1, target, reduction="sum", return_parts=True,
                                             inplace_backward=inplace)
        results.append((*parts[1:], *torch.autograd.grad(parts.loss, leaf)))
    for what, default, inplace in zip(("ce1", "ce2", "kl", "grad"), *results, strict=True):
        torch.testing.assert_close(inplace, default, rtol=1e-5, atol=1e-5, msg=what)


@pytest.mark.parametrize("backend", fused_backends())
@pytest.mark.parametrize("stacked", [False, True], ids=["halves", "stacked"])
def test_inplace_bumps_the_version_counter(backend, stacked):
    # exp saves its output for backward; overwriting that output must fail loudly.
    h = torch.randn(6, 300, requires_grad=True, device=DEVICE)
    logits = h.exp()
    version = logits._version
    kwargs = dict(backend=backend, inplace_backward=True)
    target = labels((3,), 300)
    loss = (fastrdrop.stacked_rdrop_loss(logits, target, **kwargs) if stacked
            else fastrdrop.rdrop_loss(logits[:3], logits[3:], target, **kwargs))
    assert logits._version > version
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("backend", fused_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("return_parts", [False, True])
def test_default_mode_keeps_inputs_stats_and_gradients(backend, dtype, return_parts):
    # Autograd keeps the inputs themselves and O(N) statistics. For the loss alone of fp32 or
    # bf16 logits the forward pass also writes the two gradients, and the backward pass allocates
    # nothing of size N x V; otherwise (the parts carry gradient; fp16 logits, trained with a
    # loss scale) the backward pass computes them.
    n_rows, vocab_size = 6, 1000
    h1, h2 = (z.requires_grad_() for z in logits_pair((n_rows, vocab_size), dtype))
    logits = torch.cat([h1, h2]) * 1
    z1, z2 = logits[:n_rows], logits[n_rows:]
    one_gradient = n_rows * vocab_size * z1.element_size()
    saved = []

    def pack(t):
        saved.append((t.numel(), t.data_ptr()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), AllocationLog() as fwd:
        loss = fastrdrop.rdrop_loss(z1, z2, labels((n_rows,), vocab_size), backend=backend,
                                    label_smoothing=0.1, softcap=30.0, return_parts=return_parts)
    large = [ptr for numel, ptr in saved if numel >= n_rows * vocab_size]
    assert sorted(large) == sorted([z1.data_ptr(), z2.data_ptr()])
    assert all(numel <= N_STATS * n_rows for numel, ptr in saved if ptr not in large)
    with AllocationLog() as bwd:
        torch.autograd.grad(loss[0] if return_parts else loss, (z1, z2))
    made = [sorted(size for size in log.sizes if size >= one_gradient) for log in (fwd, bwd)]
    gradients = [one_gradient, one_gradient]
    in_forward = dtype != torch.float16 and not return_parts
    assert made == ([gradients, []] if in_forward else [[], gradients])


@pytest.mark.parametrize("backend", fused_backends())
@pytest.mark.parametrize("stacked", [False, True])
def test_bf16_gradients_made_in_the_forward_pass_are_rounded_once(backend, stacked):
    # The forward pass writes bf16 gradients for an upstream gradient of 1. The backward pass
    # keeps the rows whose upstream gradient is 1 and computes the others again with theirs:
    # rounded to bf16 once, those are the bits of the path that computes every gradient in the
    # backward pass (return_parts=True), not those gradients scaled after rounding.
    n_rows, vocab_size = 6, 1500
    z1, z2 = logits_pair((n_rows, vocab_size), torch.bfloat16, masked=0.1)
    target = labels((n_rows,), vocab_size, ignored=0.0, logits=z1)
    kwargs = dict(target=target, reduction="none", label_smoothing=0.1, alpha=2.0)
    grad_output = torch.tensor([1.0, 0.3, 1.0, 2.0, -1.7, 1.0], device=z1.device)

    def fused(a, b, return_parts=False, **kw):
        if stacked:
            loss = fastrdrop.stacked_rdrop_loss(torch.cat([a, b]), backend=backend,
                                                return_parts=return_parts, **kw)
        else:
            loss = fastrdrop.rdrop_loss(a, b, backend=backend, return_parts=return_parts, **kw)
        return loss.loss if return_parts else loss

    got = loss_and_grads(functools.partial(fused, **kwargs), z1, z2, grad_output)
    in_backward = loss_and_grads(functools.partial(fused, return_parts=True, **kwargs), z1, z2,
                                 grad_output)
    redone = grad_output != 1
    for g, b in zip(got[1:], in_backward[1:], strict=True):
        assert torch.equal(g[redone], b[redone])
    want = loss_and_grads(functools.partial(fastrdrop.reference.rdrop_loss, **kwargs), z1, z2,
                          grad_output)
    truth = loss_and_grads(functools.partial(oracle_loss, **kwargs), z1.double(), z2.double(),
                           grad_output)
    for what, f, e, t in zip(("loss", "dlogits1", "dlogits2"), got, want, truth, strict=True):
        assert_oracle_rule(f, e, t, torch.bfloat16, what)


@pytest.mark.skipif(DEVICE.type != "cpu", reason="on GPU, reading the upstream gradient would wait")
@pytest.mark.parametrize("backend", fused_backends())
@pytest.mark.parametrize("upstream", [1.0, 0.5])
def test_an_upstream_gradient_of_one_leaves_the_saved_logits_alone(backend, upstream):
    # the bf16 gradients written in the forward pass serve as they are: on CPU the backward pass
    # reads the upstream gradient and unpacks no saved logits (save_on_cpu would copy them)
    z = torch.cat(logits_pair((4, 700), torch.bfloat16)).requires_grad_()
    unpacked = []

    def unpack(t):
        unpacked.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, unpack):
        loss = fastrdrop.stacked_rdrop_loss(z, labels((4,), 700), backend=backend)
    torch.autograd.grad(loss, z, torch.tensor(upstream))
    assert (z.numel() in unpacked) == (upstream != 1.0)


@pytest.mark.parametrize("backend", fused_backends())
@pytest.mark.parametrize("upstream", [[1.0], [2.0], [1.0, 0.5, 1.0, -2.0]], ids=str)
def test_backward_kernel_leaves_the_rows_whose_upstream_gradient_is_one(backend, upstream):
    n_rows, vocab_size = 4, 700
    z1, z2 = logits_pair((n_rows, vocab_size), torch.bfloat16)
    target = labels((n_rows,), vocab_size)
    _, stats = ops.forward_rows(z1, z2, target, None, 0.0, -100, 0.0, None, backend)
    upstream = torch.tensor(upstream, device=z1.device)
    grad_parts = upstream.expand(n_rows).repeat(3, 1).contiguous()
    full = [torch.empty_like(z1), torch.empty_like(z2)]
    ops.BACKWARD[backend](z1, z2, target, stats, grad_parts, *full, -100, 0.0, None)
    kept = [torch.full_like(z1, torch.nan), torch.full_like(z2, torch.nan)]
    ops.BACKWARD[backend](z1, z2, target, stats, grad_parts, *kept, -100, 0.0, None,
                          upstream=upstream)
    one = (upstream == 1).expand(n_rows)
    for k, f in zip(kept, full, strict=True):
        assert k[one].isnan().all()
        assert torch.equal(k[~one], f[~one]) and not f[~one].isnan().any()


@pytest.mark.parametrize("backend", fused_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)  # fp16 writes later
def test_inplace_rejects_what_it_cannot_write(backend, dtype):
    z1, z2 = (z.requires_grad_() for z in logits_pair((4, 300), dtype))
    target = labels((4,), 300)
    transposed = z1.detach().t().contiguous().t().requires_grad_()
    with pytest.raises(ValueError, match="logits1"):
        fastrdrop.rdrop_loss(transposed, z2, target, backend=backend, inplace_backward=True)
    same = z1 * 1
    with pytest.raises(ValueError, match="logits2 must not be the same tensor"):
        fastrdrop.rdrop_loss(same, same, target, backend=backend, inplace_backward=True)
    # memory that two rows share: each row's gradient would overwrite another's (torch's own
    # in-place ops refuse such overlap too); nothing is written
    both = torch.cat([z1, z2]) * 1
    expanded = (z1[:1] * 1).expand(4, 300)
    cases = [(both[:4], both[1:5], "logits1 and logits2 overlap"),
             (expanded, z2 * 1, "logits1's rows overlap"),
             (z1 * 1, expanded, "logits2's rows overlap")]
    if DEVICE.type == "cpu":  # two storages over one array's memory (from numpy, or dlpack)
        array = torch.cat([z1, z2]).detach().numpy()
        first, second = (torch.from_numpy(array[rows]).requires_grad_() for rows in
                         (slice(0, 4), slice(1, 5)))
        assert first.untyped_storage().data_ptr() != second.untyped_storage().data_ptr()
        cases.append((first.view(4, 300), second.view(4, 300), "logits1 and logits2 overlap"))
    for first, second, message in cases:
        kept = first.detach().clone(), second.detach().clone()
        with pytest.raises(ValueError, match=message):
            fastrdrop.rdrop_loss(first, second, target, backend=backend, inplace_backward=True)
        assert torch.equal(first, kept[0]) and torch.equal(second, kept[1])


@pytest.mark.parametrize("backend", fused_backends())
def test_inplace_without_grad_writes_nothing_and_refuses_nothing(backend):
    # Nothing is written without grad, so the in-place rules on layout do not apply: an eval
    # loop keeps the module of its training loop.
    z = torch.cat(logits_pair((4, 5, 300), torch.float32))
    target = labels((4, 4), 300)
    rows = (slice(None), slice(0, 4))  # [8, 4, 300] of [8, 5, 300]: not one stride per row
    want = fastrdrop.stacked_rdrop_loss(z[rows], target, backend=backend)
    kept, leaf = z.clone(), z.clone().requires_grad_()
    one = leaf[:4, :4]  # requires grad
    with torch.no_grad():
        no_grad = fastrdrop.stacked_rdrop_loss(leaf[rows], target, backend=backend,
                                               inplace_backward=True)
        same = fastrdrop.rdrop_loss(one, one, target, backend=backend, inplace_backward=True)
    no_requires_grad = fastrdrop.stacked_rdrop_loss(z[rows], target, backend=backend,
                                                    inplace_backward=True)
    assert torch.equal(no_grad, want) and torch.equal(no_requires_grad, want)
    assert torch.equal(same, fastrdrop.rdrop_loss(one, one.clone(), target, backend=backend))
    assert torch.equal(leaf.detach(), kept) and torch.equal(z, kept)
    with pytest.raises(ValueError, match="logits must be viewable as"):  # with grad: refused
        fastrdrop.stacked_rdrop_loss(leaf[rows], target, backend=backend, inplace_backward=True)


@pytest.mark.parametrize("backend", fused_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("write", ["another in-place loss", "an in-place op"])
@pytest.mark.parametrize("stacked", [False, True], ids=["halves", "stacked"])
def test_a_write_into_the_logits_before_the_backward_pass_is_refused(backend, dtype, write,
                                                                     stacked):
    # The logits hold this loss's gradients (fp16's: the values they are written from): a write
    # in between changed the gradient without a word
    h = torch.randn(6, 50, device=DEVICE, dtype=dtype, requires_grad=True)
    logits = h * 1
    target = labels((3,), 50)
    loss = (fastrdrop.stacked_rdrop_loss(logits, target, backend=backend, inplace_backward=True)
            if stacked else fastrdrop.rdrop_loss(logits[:3], logits[3:], target, backend=backend,
                                                 inplace_backward=True))
    if write == "an in-place op":
        with torch.no_grad():
            logits.clamp_(-1.0, 1.0)
    else:
        loss = loss + fastrdrop.stacked_rdrop_loss(logits, target.flip(0), backend=backend,
                                                   inplace_backward=True)
    with pytest.raises(RuntimeError, match="logits were modified after the loss wrote"):
        loss.backward()


@pytest.mark.parametrize("backend", fused_backends())
def test_in_place_losses_on_other_rows_of_one_tensor_are_taken(backend):
    # chunks of one tensor's rows, each its own in-place loss: every chunk's write moves the
    # version counter that all views of the tensor share, and none touches another's rows
    h = torch.randn(8, 50, device=DEVICE, requires_grad=True)
    logits = h * 1
    target = labels((4,), 50)
    loss = sum(fastrdrop.rdrop_loss(logits[i:i + 2], logits[4 + i:6 + i], target[i:i + 2],
                                    backend=backend, inplace_backward=True) for i in (0, 2))
    loss.backward()
    reference = h.detach().requires_grad_()
    sum(fastrdrop.rdrop_loss(reference[i:i + 2], reference[4 + i:6 + i], target[i:i + 2],
                             backend=backend) for i in (0, 2)).backward()
    torch.testing.assert_close(h.grad, reference.grad)
    # chunks detached into leaves of their own: no views, and the same counter
    chunks = [c.detach().requires_grad_() for c in (h.detach() * 1).split(2)]
    sum(fastrdrop.rdrop_loss(chunks[k], chunks[k + 2], target[2 * k:2 * k + 2],
                             backend=backend, inplace_backward=True) for k in (0, 1)).backward()
    torch.testing.assert_close(torch.cat([c.grad for c in chunks]), reference.grad)


@pytest.mark.parametrize("backend", fused_backends())
def test_second_backward_is_refused(backend):
    # The gradients were made in the forward pass and are scaled in place: they serve once.
    z1, z2 = (z.requires_grad_() for z in logits_pair((3, 200), torch.float32))
    loss = fastrdrop.rdrop_loss(z1 * 1, z2 * 1, labels((3,), 200), backend=backend,
                                inplace_backward=True)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="already used"):
        loss.backward()


@pytest.mark.parametrize("backend", fused_backends())
@pytest.mark.parametrize("stacked", [False, True])
def test_default_mode_serves_a_second_backward(backend, stacked):
    # The loss alone gets its gradients from the forward pass, once; a second backward
    # (retain_graph=True) recomputes them from the saved logits, as the default mode always did.
    base = torch.cat(logits_pair((3, 200), torch.float32)).requires_grad_()
    target = labels((3,), 200)
    logits = base * 1
    loss = (fastrdrop.stacked_rdrop_loss(logits, target, backend=backend, reduction="none")
            if stacked else
            fastrdrop.rdrop_loss(logits[:3], logits[3:], target, backend=backend,
                                 reduction="none"))
    g1, g2 = torch.rand(3) + 0.5, torch.rand(3) + 0.5
    (first,) = torch.autograd.grad(loss, base, g1.to(loss.device), retain_graph=True)
    (second,) = torch.autograd.grad(loss, base, g2.to(loss.device))
    for grad, g in ((first, g1), (second, g2)):
        leaf = base.detach().clone().requires_grad_()
        want = fastrdrop.reference.rdrop_loss(leaf[:3], leaf[3:], target, reduction="none")
        (want,) = torch.autograd.grad(want, leaf, g.to(want.device))
        torch.testing.assert_close(grad, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", fused_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("options", [dict(), dict(label_smoothing=0.1), dict(softcap=30.0)],
                         ids=str)
def test_the_loss_has_the_same_bits_in_every_mode(backend, dtype, options):
    # without grad (statistics only), with grad (the gradients written in the forward pass or
    # not) and in place: the same statistics, in the same order, whatever else the pass does
    # 32 rows: a change of summation order shows in some row's loss with near certainty
    z1, z2 = logits_pair((32, 1500), dtype, masked=0.1)
    kwargs = dict(target=labels((32,), 1500, logits=z1), backend=backend, reduction="none",
                  **options)
    with torch.no_grad():
        losses = [fastrdrop.rdrop_loss(z1, z2, **kwargs)]
    for inplace in (False, True):
        a, b = (z.clone().requires_grad_() for z in (z1, z2))
        losses.append(fastrdrop.rdrop_loss(a, b, inplace_backward=inplace, **kwargs).detach())
    parts = fastrdrop.rdrop_loss(*(z.clone().requires_grad_() for z in (z1, z2)),
                                 return_parts=True, **kwargs)
    losses.append(parts.loss.detach())
    for loss in losses[1:]:
        assert torch.equal(loss, losses[0])
