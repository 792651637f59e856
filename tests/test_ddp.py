"""rdrop_loss and linear_rdrop_loss inside DistributedDataParallel (gloo, 2 CPU processes, started
and stopped by the test) give the gradients of one process over the whole batch."""

import datetime
import faulthandler
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import fastrdrop

N, H, V = 8, 16, 300  # global tokens (4 per rank, none ignored: the ranks' means are equal-sized)
WORLD = 2


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


def _worker(rank, store, kind, out):
    # A worker still running after 90 s prints every thread's stack and exits, within the
    # parent's 2-minute wait, so a hang shows where it is.
    faulthandler.dump_traceback_later(90, exit=True)
    # Loopback only: gloo would otherwise look its address up from the hostname, which can stall
    # on machines without DNS.
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        torch.set_num_threads(1)
        model = RDropModel(kind)
        ddp = nn.parallel.DistributedDataParallel(model)
        rows = slice(rank * N // WORLD, (rank + 1) * N // WORLD)
        ddp(*(t[rows] for t in make_batch())).backward()  # DDP averages the gradients
        if rank == 0:
            torch.save(gradients(model), out)
        dist.barrier()  # neither rank leaves while the other still talks
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("kind", ["rdrop_loss", "linear_rdrop_loss"])
def test_ddp_matches_one_process(kind, tmp_path):
    out = tmp_path / "grads.pt"
    store = tmp_path / "store"
    context = mp.start_processes(_worker, args=(str(store), kind, str(out)), nprocs=WORLD,
                                 join=False, start_method="spawn")
    try:
        for _ in range(120):  # at most 2 minutes
            if context.join(timeout=1):
                break
        else:
            pytest.fail("the DDP processes did not finish in 2 minutes")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.terminate()

    model = RDropModel(kind)
    model(*make_batch()).backward()
    expected = gradients(model)
    got = torch.load(out)
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6)
    assert any(g.abs().sum() > 0 for g in expected.values())
