"""Runs a test body on several gloo ranks, each a process of its own, and never hangs.

``run_ranks(body, world)`` starts ``world`` processes (forkserver), joins them into one gloo process
group on loopback, and calls ``body(rank, world, *args)`` in each (``body`` a module-level
function). It fails the test with a rank's traceback if one raises, and after ``timeout`` seconds
with, for every rank still running, the last step it reached and the Python stack of each of its
threads (``faulthandler``, on a signal), plus the native stacks where ``py-spy`` is installed,
before it kills them. A rank counts as done only once its process has exited.

The rendezvous is a TCPStore that the test process itself serves, on a port the system picks
(no port chosen before the ranks start, so none can be taken in between), and that outlives every
rank (no rank's exit can remove it from under another). Each rank registers its stack dump before
it imports torch and gets one intra-op thread.

A rank never tears its process group down: it passes a barrier and ends with ``os._exit``. The
destructor of a gloo process group joins gloo's worker threads while its caller holds the GIL, and
a worker thread that frees the last reference to a finished work item (whose thread-local state
holds a Python object) needs the GIL first: a deadlock. It hung the DDP test under CPU load (one
run in a few with 4 busy loops on 2 cores): DDP's reducer held the last reference to the group,
which was destroyed when the worker function's frame was cleared, with no frame of it left on the
stack; py-spy showed the main thread in ``ProcessGroupGloo::~ProcessGroupGloo`` ->
``std::thread::join`` and gloo's worker in ``~AsyncBarrierWork`` -> ``gil_scoped_acquire``.
"""

import faulthandler
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

STACKS = signal.SIGUSR1  # a rank that gets it writes every thread's Python stack to its file
# Ranks are forked from a server process that has imported these once per test session (it runs
# no torch op, so no thread pool is forked): a rank starts in a fraction of a second, where
# importing torch anew took 4 s on two quiet cores and 15 s on loaded ones.
PRELOAD = ["torch", "torch.distributed", "fastrdrop", "transformers"]


def run_ranks(body, world: int, *args, timeout: float = 30.0) -> None:
    """body(rank, world, *args) on ``world`` gloo ranks; raises AssertionError with what went
    wrong: a rank's traceback, or every rank's step and stacks after ``timeout`` seconds."""
    import multiprocessing

    import torch.distributed as dist

    folder = Path(tempfile.mkdtemp(prefix="fastrdrop-ranks-"))
    store = dist.TCPStore("127.0.0.1", 0, world + 1, is_master=True, wait_for_workers=False)
    target = (body.__module__, body.__qualname__)
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    processes = [context.Process(target=_rank_main, daemon=True,
                                 args=(target, rank, world, store.port, str(folder), args,
                                       list(sys.path)))
                 for rank in range(world)]
    try:
        for process in processes:
            process.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(p.exitcode not in (None, 0) for p in processes):
                time.sleep(0.5)  # let the others report too
                raise AssertionError("\n".join(
                    _report(folder, rank, p) for rank, p in enumerate(processes)
                    if p.exitcode not in (None, 0)))
            if all(p.exitcode == 0 for p in processes):
                return
            time.sleep(0.05)
        raise AssertionError(f"ranks still running after {timeout:.0f} s:\n"
                             + _stacks(folder, processes))
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()
            process.join(5)
        del store
        shutil.rmtree(folder, ignore_errors=True)


def _rank_main(target, rank, world, port, folder, args, path):
    folder = Path(folder)
    stacks = open(folder / f"stacks-{rank}.txt", "w")  # noqa: SIM115 (open until the exit)
    faulthandler.register(STACKS, file=stacks, all_threads=True)
    steps = folder / f"steps-{rank}.txt"

    def step(name):
        with open(steps, "a") as f:
            f.write(f"{time.monotonic():.2f} {name}\n")

    try:
        step("started")
        sys.path[:] = path
        # loopback only: gloo would otherwise look its address up from the hostname
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"
        import datetime
        import importlib

        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        module, name = target
        body = getattr(importlib.import_module(module), name)
        step("imported")
        store = dist.TCPStore("127.0.0.1", port, world + 1, is_master=False,
                              timeout=datetime.timedelta(seconds=20))
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=20))
        step("joined the group")
        body(rank, world, *args)
        step("ran the body")
        dist.barrier()  # no rank leaves while another still talks to it
        step("passed the last barrier")
        code = 0
    except BaseException:
        (folder / f"error-{rank}.txt").write_text(traceback.format_exc())
        code = 1
    # no teardown of the group (see the module docstring): the process ends here
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _report(folder, rank, process):
    error = folder / f"error-{rank}.txt"
    text = error.read_text() if error.exists() else "(no traceback)"
    return f"rank {rank} exited with {process.exitcode}:\n{text}"


def _stacks(folder, processes):
    alive = [(rank, p) for rank, p in enumerate(processes) if p.is_alive()]
    for _, process in alive:
        os.kill(process.pid, STACKS)
    time.sleep(1.0)
    py_spy = shutil.which("py-spy")
    parts = []
    for rank, process in alive:
        steps = folder / f"steps-{rank}.txt"
        done = steps.read_text() if steps.exists() else "(none)\n"
        python = (folder / f"stacks-{rank}.txt").read_text()
        parts.append(f"--- rank {rank} (pid {process.pid}); its steps:\n{done}Python:\n{python}")
        if py_spy:
            native = subprocess.run([py_spy, "dump", "--native", "--pid", str(process.pid)],
                                    capture_output=True, text=True, timeout=20)
            parts.append(f"--- rank {rank}, py-spy --native:\n{native.stdout}{native.stderr}")
    return "\n".join(parts)
