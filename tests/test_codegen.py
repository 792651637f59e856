"""Triton's real compiler builds every kernel binary that the public API launches, for each GPU
target, and the binaries are what the launch table promises (DESIGN.md section 5).

The interpreter that runs the other tests on CPU accepts code that no GPU compiler does, so this
test compiles with the real one, without a GPU: ``python -m benchmarks.codegen`` in a subprocess
without TRITON_INTERPRET, in a fresh TRITON_CACHE_DIR (a warm cache returns binaries without
compiling them again, and would hide a compile error).
"""

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastrdrop import ops

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {"sm_80", "sm_90", "sm_100", "gfx942"}  # and gfx950 where Triton knows it
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    folder = tmp_path_factory.mktemp("codegen")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(folder / "cache")
    out = folder / "builds.json"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.codegen", "--no-save", "--json", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.exists(), f"benchmarks.codegen wrote nothing:\n{done.stdout}\n{done.stderr}"
    return json.loads(out.read_text())["builds"]


def _where(build):
    return (f"{build['kernel']} {build['dtype']} BLOCK={build['block']} "
            f"warps={build['num_warps']} aligned={build['aligned']} {build['flags']} "
            f"on {build['target']}")


def test_every_binary_compiles(builds):
    failed = [f"{_where(b)}: {b['error'].splitlines()[0]}" for b in builds if not b["ok"]]
    assert not failed, f"{len(failed)} of {len(builds)} builds failed, e.g.\n" + "\n".join(
        failed[:5])


def test_every_target_and_launch_is_covered(builds):
    # the binaries the launch table and the flags allow, per target; the recorded launches of
    # the API must reach all of them (a launch the grid misses would go unchecked)
    targets = {b["target"] for b in builds}
    assert TARGETS <= targets, f"targets compiled: {sorted(targets)}"
    expected = set()
    for dtype, elem in ((name, torch.finfo(t).bits // 8) for name, t in DTYPES.items()):
        blocks = {config[0] for (_, e), config in ops.LAUNCH_TABLE.items() if e == elem}
        # fp16 in place writes its gradients in the backward pass, for the upstream gradient:
        # nothing scales fp16 rows
        kernels = ("fwd", "bwd", "partials") + (("scale",) if dtype != "fp16" else ())
        for kernel, block, aligned in itertools.product(kernels, blocks, (False, True)):
            for softcap in ((False, True) if kernel != "scale" else (None,)):
                expected.add((kernel, dtype, block, aligned, softcap))
    for target in targets:
        found = {(b["kernel"], b["dtype"], b["block"], b["aligned"], b["flags"].get("SOFTCAP"))
                 for b in builds if b["target"] == target}
        assert found == expected, (f"{target}: missing {sorted(expected - found)}, "
                                   f"unexpected {sorted(found - expected)}")


def test_only_the_constexpr_flags_are_specialised(builds):
    # otherwise the binaries a call launches would depend on its sizes and pointers, and this test
    # could not list them all
    specialised = [f"{_where(b)}: {b['specialised']}" for b in builds if b["specialised"]]
    assert not specialised, "arguments specialised on their values in\n" + "\n".join(specialised)


def test_no_spills(builds):
    spilled = [f"{_where(b)}: {b['local_bytes']} B" for b in builds
               if b["ok"] and b["local_bytes"]]
    assert not spilled, "local memory (spills) in\n" + "\n".join(spilled)


def test_aligned_rows_load_and_store_128_bits_in_the_vocabulary_loops(builds):
    for b in (b for b in builds if b["ok"] and b["aligned"]):
        assert b["loop_load_bits"], f"{_where(b)}: no global load found in a loop"
        assert b["loop_load_bits"] == [128], f"{_where(b)}: loads of {b['loop_load_bits']} bits"
        # every kernel but the partials writes rows in a loop: gradients (fwd: in place), scaled
        # rows, zeros
        stores = [] if b["kernel"] == "partials" else [128]
        assert b["loop_store_bits"] == stores, (
            f"{_where(b)}: stores of {b['loop_store_bits']} bits in loops")


def test_registers_leave_room_for_programs_per_sm(builds):
    # the launch table's premise: several programs per SM, so that one program's reductions hide
    # behind another's loads (and at least one, or the launch fails)
    for b in (b for b in builds if b["ok"]):
        assert b["programs_per_sm"] >= 2, (
            f"{_where(b)}: {b['registers']} registers per thread leave room for "
            f"{b['programs_per_sm']} program(s) per SM")


# The 16-bit vocabulary loops are bound by their instructions, not their bytes (docs/performance.md,
# "Instructions per entry"). A budget per element pair of both rows, per iteration of each loop
# with exponentials, in the NVIDIA binaries for aligned rows without softcap (the statistics loop
# without its label-smoothing branch). With a mask and a comparison per entry for -inf and
# exp's subnormal path, the loops took 42-43 (statistics) and 52-54 (gradients).
BUDGET = {"statistics": 28, "gradients": 35}
LOOPS = {"fwd": ("statistics", "gradients"), "bwd": ("gradients",), "partials": ("statistics",)}


def test_the_vocabulary_loops_keep_their_instruction_budget(builds):
    plain = [b for b in builds if b["ok"] and b["target"].startswith("sm_") and b["aligned"]
             and not any(b["flags"].values()) and b["kernel"] in LOOPS]
    assert plain
    for b in plain:
        pairs = 128 // int(b["dtype"][2:])  # a thread's entries per row per iteration
        counts = [n for n, exponentials in b["loop_instructions"] if exponentials]
        assert len(counts) == len(LOOPS[b["kernel"]]), (
            f"{_where(b)}: loops with exponentials {b['loop_instructions']}")
        for loop, count in zip(LOOPS[b["kernel"]], counts, strict=True):
            assert count / pairs <= BUDGET[loop], (
                f"{_where(b)}: the {loop} loop takes {count} instructions per iteration, "
                f"{count / pairs:.1f} per element pair (budget {BUDGET[loop]})")
