"""The vocabulary-parallel loss on 1, 2 and 4 gloo ranks of this machine:
``python -m benchmarks --preset cpu-vocab-parallel``.

Each rank holds [N, V / world] slices of both passes' logits (fp32) and runs fwd+bwd of
``rdrop_loss(..., vocab_parallel_group=)``: the median time of the slowest rank, the peak memory
one call adds on each rank (its resident set, gradients included), and the bytes that the
collectives of one call carry, counted on the all-reduces themselves. On 2 cores every rank gets
2 // world threads (at least 1): 4 ranks share 2 cores, so their times say little about speed;
the memory and the bytes are what they show.
"""

import datetime
import gc
import json
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastrdrop

from benchmarks.measure import _current_rss, _peak_rss, _release_freed_memory, frozen_gc


def _slice_sizes(vocab, world):
    """The ranks' slices of the vocabulary: as even as it divides, the first ranks one more."""
    return [vocab // world + (rank < vocab % world) for rank in range(world)]


def _rank(rank, world, port, n, vocab, repeats, out):
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(max(1, (cores or 1) // world))
    store = dist.TCPStore("127.0.0.1", port, world + 1, is_master=False,
                          timeout=datetime.timedelta(seconds=120))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        width = _slice_sizes(vocab, world)[rank]
        gen = torch.Generator().manual_seed(rank)
        z1 = 3 * torch.randn(n, width, generator=gen)
        z2 = z1 + 0.5 * torch.randn(n, width, generator=gen)
        target = torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(0))
        group = dist.group.WORLD if world > 1 else None

        def call():
            a, b = z1.detach().requires_grad_(), z2.detach().requires_grad_()
            loss = fastrdrop.rdrop_loss(a, b, target, vocab_parallel_group=group)
            return torch.autograd.grad(loss, (a, b))

        sent, all_reduce = [], dist.all_reduce

        def counting(tensor, *args, **kwargs):
            sent.append(tensor.numel() * tensor.element_size())
            return all_reduce(tensor, *args, **kwargs)

        dist.all_reduce = counting
        gc.collect()  # before the warm-up calls (see frozen_gc)
        try:
            call()
        finally:
            dist.all_reduce = all_reduce
        times = []
        with frozen_gc():  # a collection in one rank would hold up the others
            for _ in range(repeats + 1):
                dist.barrier()
                start = time.perf_counter()
                del_me = call()
                dist.barrier()  # the slowest rank's time
                times.append(time.perf_counter() - start)
                del del_me
        _release_freed_memory()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _current_rss()
        grads = call()
        peak = _peak_rss() - base
        del grads
        row = dict(rank=rank, median_ms=statistics.median(times[1:]) * 1e3,
                   peak_extra_mib=peak / 2**20, bytes_all_reduced=sum(sent),
                   all_reduces=len(sent), threads=torch.get_num_threads())
        with open(f"{out}.{rank}", "w") as f:
            json.dump(row, f)
    finally:
        dist.destroy_process_group()


def run(n, vocab, worlds, repeats, folder):
    """One row per world size: the slowest rank's median, each rank's peak, the bytes."""
    rows = []
    for world in worlds:
        store = dist.TCPStore("127.0.0.1", 0, world + 1, is_master=True, wait_for_workers=False)
        out = os.path.join(folder, f"world{world}")
        mp.start_processes(_rank, args=(world, store.port, n, vocab, repeats, out),
                           nprocs=world, start_method="spawn")
        ranks = []
        for rank in range(world):
            with open(f"{out}.{rank}") as f:
                ranks.append(json.load(f))
        rows.append(dict(world=world, n_tokens=n, vocab_size=vocab, dtype="float32",
                         median_ms=max(r["median_ms"] for r in ranks),
                         peak_extra_mib=[round(r["peak_extra_mib"], 1) for r in ranks],
                         bytes_all_reduced=ranks[0]["bytes_all_reduced"],
                         all_reduces=ranks[0]["all_reduces"], threads=ranks[0]["threads"]))
    return rows


def markdown(result):
    env = result["environment"]
    lines = [
        f"Device: **{env['device']}**; torch {env['torch']}, fastrdrop {env['fastrdrop']} "
        f"(backend {env['backend']}), commit {env['commit']}, {env['date']}. fwd+bwd of "
        f"rdrop_loss with vocab_parallel_group, fp32; median of {result['repeats']} calls "
        "(the slowest rank); peak extra memory per rank (resident set, gradients included); "
        "bytes all-reduced per call, counted on the all-reduces.",
        "",
        "| ranks | N | V | V per rank | threads per rank | median ms | peak extra MiB per rank "
        "| all-reduces per call | bytes all-reduced per call |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['world']} | {r['n_tokens']} | {r['vocab_size']} | "
            f"{_per_rank(r['vocab_size'], r['world'])} | {r['threads']} | {r['median_ms']:.1f} | "
            f"{', '.join(f'{m:.0f}' for m in r['peak_extra_mib'])} | {r['all_reduces']} | "
            f"{r['bytes_all_reduced']} |")
    return "\n".join(lines) + "\n"


def _per_rank(vocab, world):
    sizes = sorted(set(_slice_sizes(vocab, world)), reverse=True)
    return "-".join(map(str, sizes))
