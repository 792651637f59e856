"""torch.compile(fullgraph=True) traces rdrop_loss and StackedRDropLoss through their custom ops,
without graph breaks."""

import pytest
import torch

import fastrdrop

from conftest import fused_backends
from inputs import labels, logits_pair


@pytest.mark.parametrize("backend", fused_backends())
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("stacked", [False, True])
def test_compile_fullgraph_matches_eager(backend, inplace, stacked):
    torch._dynamo.reset()
    keywords = dict(alpha=0.5, label_smoothing=0.1, softcap=30.0, backend=backend,
                    return_parts=True, inplace_backward=inplace)
    criterion = fastrdrop.StackedRDropLoss(**keywords)

    def step(logits, target):
        if stacked:
            parts = criterion(logits, target)
        else:  # in-place: slices, as compiled graphs refuse in-place writes to chunk's views
            z1, z2 = (logits[:5], logits[5:]) if inplace else logits.chunk(2)
            parts = fastrdrop.rdrop_loss(z1, z2, target, **keywords)
        return parts.loss * 3.0, parts.kl

    z1, z2 = logits_pair((5, 700), torch.float32)
    base = torch.cat([z1, z2])
    target = labels((5,), 700)
    results = []
    for fn in (step, torch.compile(step, fullgraph=True)):
        leaf = base.clone().requires_grad_()
        loss, kl = fn(leaf * 1, target)
        loss.backward()
        results.append((loss.detach(), kl.detach(), leaf.grad))
    for eager, compiled in zip(*results, strict=True):
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
