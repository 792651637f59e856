"""rdrop_loss and linear_rdrop_loss inside DistributedDataParallel (2 gloo ranks, tests/ranks.py)
give the gradients of one process over the whole batch."""

import pytest
import torch
import torch.distributed as dist
from torch import nn

import fastrdrop

from ranks import run_ranks

N, H, V = 8, 16, 300  # global tokens (4 per rank, none ignored: the ranks' means are equal-sized)


class RDropModel(nn.Module):
    """A body and an output embedding; forward returns the R-Drop loss of two passes."""

    def __init__(self, kind):
        super().__init__()
        torch.manual_seed(0)
        self.kind = kind
        self.body = nn.Sequential(nn.Linear(H, H), nn.Tanh())
        self.head = nn.Parameter(torch.randn(V, H) / H ** 0.5)

    def forward(self, x1, x2, target):
        h1, h2 = self.body(x1), self.body(x2)
        if self.kind == "rdrop_loss":
            return fastrdrop.rdrop_loss(h1 @ self.head.t(), h2 @ self.head.t(), target, alpha=2.0)
        return fastrdrop.linear_rdrop_loss(h1, h2, self.head, target, alpha=2.0, chunk_size=3)


def make_batch():
    gen = torch.Generator().manual_seed(1)
    x1 = torch.randn(N, H, generator=gen)
    x2 = x1 + 0.3 * torch.randn(N, H, generator=gen)  # the second pass, as dropout would differ
    target = torch.randint(0, V, (N,), generator=gen)
    return x1, x2, target


def gradients(model):
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def _ddp_body(rank, world, kind):
    model = RDropModel(kind)
    ddp = nn.parallel.DistributedDataParallel(model)
    rows = slice(rank * N // world, (rank + 1) * N // world)
    ddp(*(t[rows] for t in make_batch())).backward()  # DDP averages the gradients
    one = RDropModel(kind)
    one(*make_batch()).backward()
    expected = gradients(one)
    assert any(g.abs().sum() > 0 for g in expected.values())
    for name, grad in gradients(model).items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-5, atol=1e-6, msg=name)
    dist.barrier()


@pytest.mark.parametrize("kind", ["rdrop_loss", "linear_rdrop_loss"])
def test_ddp_matches_one_process(kind):
    run_ranks(_ddp_body, 2, kind)
