"""Codegen report: ``python -m benchmarks.codegen`` (``make codegen``).

Compiles, with Triton's real compiler and no GPU, every specialisation of the Triton kernels that
the public API launches, for NVIDIA sm_80, sm_90, sm_100 and AMD gfx942 (and gfx950 where the
installed Triton knows it), and reads the binaries: registers, shared memory, spills, the width of
the global loads and stores in the vocabulary loops, the instructions per iteration of each loop
(NVIDIA SASS), and how many programs fit on one SM (CU).

The launches are not listed by hand. ``fastrdrop.rdrop_loss`` and ``fastrdrop.linear_rdrop_loss``
run forward and backward over a grid of calls (dtypes, target or none, label smoothing, softcap,
in-place, V in every row of the launch table, rows aligned to 16 bytes or not, logits past 2 GiB)
with the kernels replaced by recorders; each recorded launch is specialised by Triton's own binder
for each target, as a launch on that GPU would be, and every distinct binary is compiled once.

Run it in a fresh TRITON_CACHE_DIR without TRITON_INTERPRET (tests/test_codegen.py does): a warm
cache returns binaries without compiling them again.
"""

import argparse
import contextlib
import functools
import json
import math
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results" / "codegen"
NVIDIA_ARCHS = (80, 90, 100)
AMD_ARCHS = ("gfx942", "gfx950")  # gfx950 where the installed Triton knows it

# Per-SM (per-CU) limits, from NVIDIA's CUDA C++ Programming Guide (compute capabilities table)
# and AMD's CDNA3/CDNA4 ISA guides: registers (VGPRs per SIMD lane on AMD), shared memory
# (LDS), resident warps (waves) and programs.
SM_LIMITS = {
    80: dict(regs=65536, shared=164 * 1024, warps=64, programs=32),
    90: dict(regs=65536, shared=228 * 1024, warps=64, programs=32),
    100: dict(regs=65536, shared=228 * 1024, warps=64, programs=32),
    "gfx942": dict(vgprs=512, shared=64 * 1024, waves_per_simd=8, simds=4, programs=32),
    "gfx950": dict(vgprs=512, shared=160 * 1024, waves_per_simd=8, simds=4, programs=32),
}


@dataclass
class Build:
    """One specialisation of one kernel for one target, and what its binary says."""

    target: str
    kernel: str  # "fwd", "fwd in-place", "bwd", "scale"
    dtype: str
    block: int
    num_warps: int
    aligned: bool  # the ALIGNED flag: rows start on 16-byte boundaries, V whole vectors
    flags: dict  # the other constexpr flags
    specialised: dict  # arguments Triton specialised on a property (none expected)
    ok: bool = False
    error: str = ""
    registers: int = 0  # per thread (VGPRs + AGPRs on AMD)
    shared_bytes: int = 0
    local_bytes: int = 0  # per thread, outside registers (spills land here): 0 is no spills
    sgprs_in_vgpr_lanes: int = 0  # AMD: scalar registers spilled to vector lanes (no memory)
    loop_load_bits: list = field(default_factory=list)  # widths of the loads in loops
    loop_store_bits: list = field(default_factory=list)
    # NVIDIA: per loop of the SASS, in address order, [instructions per iteration, of which
    # MUFU.EX2], on the path that skips the loop's conditional blocks (label smoothing's)
    loop_instructions: list = field(default_factory=list)
    programs_per_sm: int = 0
    warps_per_sm: int = 0
    kib_in_flight_per_sm: float = 0.0  # one loop iteration's loads of every resident program


# ---------------------------------------------------------------------------------------------
# 1. The launches of the public API, recorded.


@dataclass
class Launch:
    kernel: str  # the name of the @triton.jit function
    fn: object  # the function
    args: tuple
    kwargs: dict


class _Recorder:
    """Stands in for a JIT function: ``kernel[grid](*args, **kwargs)`` is handed to ``on_launch``
    instead of running."""

    def __init__(self, name, fn, on_launch):
        self.name, self.fn, self.on_launch = name, fn, on_launch

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.on_launch(Launch(self.name, self.fn, args, kwargs))


@contextlib.contextmanager
def recording(target, on_launch):
    """Within: the Triton kernels hand their launches to ``on_launch`` (on CPU tensors, which the
    launchers treat as GPU tensors of the same layout), as on a GPU of Triton's ``target``."""
    from fastrdrop import ops

    binaries = dict(kernel_binaries())
    saved = {name: getattr(ops, name) for name in ("gpu_target", "triton_unavailable_reason")
             if hasattr(ops, name)}
    try:
        for name, fn in binaries.items():
            _set(name, _Recorder(name, fn, on_launch))
        ops.gpu_target = lambda device: target
        ops.triton_unavailable_reason = lambda device: None
        yield
    finally:
        for name, fn in binaries.items():
            _set(name, fn)
        for name, fn in saved.items():
            setattr(ops, name, fn)


def kernel_binaries():
    """(name, JITFunction) of every kernel of fastrdrop.triton_kernels."""
    from triton.runtime import JITFunction

    from fastrdrop import triton_kernels

    for name, kernel in vars(triton_kernels).items():
        if isinstance(kernel, JITFunction) and name.endswith("_kernel"):
            yield name, kernel


def _get(name):
    from fastrdrop import triton_kernels

    return getattr(triton_kernels, name)


def _set(name, value):
    from fastrdrop import triton_kernels

    setattr(triton_kernels, name, value)


def vocab_sizes(dtype):
    """Per row of the launch table, a V in its range whose rows fill whole 16-byte vectors and one
    (odd) whose rows do not."""
    from fastrdrop import ops

    elem = torch.finfo(dtype).bits // 8
    bounds = sorted(v for v, e in getattr(ops, "LAUNCH_TABLE", {}) if e == elem and v is not None)
    sizes = []
    for bound in [*bounds, None]:
        top = bound if bound is not None else max(32000, 2 * (bounds[-1] if bounds else 0))
        sizes += [top - top % 16, top - top % 16 - 1]
    return sizes


def api_calls():
    """(name, thunk) for every kind of call that reaches the Triton kernels."""
    calls = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for vocab in vocab_sizes(dtype):
            for layout in ("halves", "separate", "stacked"):
                for target in (False, True):
                    for smoothing in (0.0, 0.1) if target else (0.0,):
                        for softcap in (None, 30.0):
                            # the loss alone (gradients in the forward pass), or with its parts
                            # (gradients in the backward pass), or in place
                            for parts, inplace in ((False, False), (True, False), (False, True)):
                                kwargs = dict(label_smoothing=smoothing, softcap=softcap,
                                              return_parts=parts, inplace_backward=inplace)
                                calls.append((
                                    f"rdrop_loss {dtype} V={vocab} {layout} target={target} "
                                    f"{kwargs}",
                                    functools.partial(_loss_call, dtype, vocab, layout, target,
                                                      kwargs)))
        # logits past 2 GiB: Triton would specialise AMD pointers into smaller tensors, if any
        # argument were specialised
        vocab = 131072
        rows = 2 ** 31 // (vocab * (torch.finfo(dtype).bits // 8)) + 1
        for target in (False, True):
            for softcap in (None, 30.0):
                for parts, inplace in ((False, False), (True, False), (False, True)):
                    kwargs = dict(softcap=softcap, return_parts=parts, inplace_backward=inplace)
                    calls.append((f"rdrop_loss {dtype} 2x[{rows}, {vocab}] target={target} "
                                  f"{kwargs}",
                                  functools.partial(_loss_call, dtype, vocab, "separate", target,
                                                    kwargs, rows)))
        for vocab in vocab_sizes(dtype)[-2:]:
            for target in (False, True):
                for softcap in (None, 30.0):
                    for reduction in ("mean", "none"):
                        kwargs = dict(softcap=softcap, reduction=reduction, chunk_size=2)
                        calls.append((f"linear_rdrop_loss {dtype} V={vocab} target={target} "
                                      f"{kwargs}",
                                      functools.partial(_linear_call, dtype, vocab, target,
                                                        kwargs)))
        # the vocabulary split across ranks (a group of one): the partials kernel, then the
        # backward kernel, into new buffers or in place
        for vocab in vocab_sizes(dtype):
            for softcap in (None, 30.0):
                for smoothing, inplace in ((0.0, False), (0.1, True)):
                    kwargs = dict(softcap=softcap, label_smoothing=smoothing,
                                  inplace_backward=inplace)
                    calls.append((f"rdrop_loss vocab-parallel {dtype} V={vocab} {kwargs}",
                                  functools.partial(_vocab_parallel_call, dtype, vocab, kwargs)))
    return calls


def _loss_call(dtype, vocab, layout, target, kwargs, rows=3):
    """Forward and backward of rdrop_loss on logits that are never read or written: the kernels
    only record. "halves": both passes in one [2 rows, V] activation, split; "stacked": the same
    to stacked_rdrop_loss; "separate": two tensors."""
    import fastrdrop

    labels = torch.zeros(rows, dtype=torch.long) if target else None
    if layout == "separate":
        z1, z2 = (torch.empty(rows, vocab, dtype=dtype, requires_grad=True) for _ in range(2))
        loss, wrt = fastrdrop.rdrop_loss(z1, z2, labels, backend="triton", **kwargs), (z1, z2)
    else:
        leaf = torch.empty(2 * rows, vocab, dtype=dtype, requires_grad=True)
        logits = leaf * 1
        loss = (fastrdrop.stacked_rdrop_loss(logits, labels, backend="triton", **kwargs)
                if layout == "stacked" else
                fastrdrop.rdrop_loss(logits[:rows], logits[rows:], labels, backend="triton",
                                     **kwargs))
        wrt = (leaf,)
    if kwargs.get("return_parts"):
        loss = loss.loss
    torch.autograd.grad(loss, wrt, torch.tensor(2.0))


def _linear_call(dtype, vocab, target, kwargs):
    import fastrdrop

    rows, hidden = 4, 8
    h1, h2 = (torch.randn(rows, hidden, dtype=dtype, requires_grad=True) for _ in range(2))
    weight = torch.randn(vocab, hidden, dtype=dtype, requires_grad=True)
    labels = torch.zeros(rows, dtype=torch.long) if target else None
    loss = fastrdrop.linear_rdrop_loss(h1, h2, weight, labels, backend="triton", **kwargs)
    torch.autograd.grad(loss, (h1, h2, weight), torch.ones_like(loss))


def _vocab_parallel_call(dtype, vocab, kwargs):
    import torch.distributed as dist

    import fastrdrop

    if not dist.is_initialized():  # one rank, in this process
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    leaf = torch.empty(6, vocab, dtype=dtype, requires_grad=True)
    logits = leaf * 1
    loss = fastrdrop.stacked_rdrop_loss(logits, torch.zeros(3, dtype=torch.long),
                                        backend="triton", vocab_parallel_group=dist.group.WORLD,
                                        **kwargs)
    torch.autograd.grad(loss, leaf, torch.tensor(2.0))


def record_launches(target, on_launch):
    """Hands every launch that the API calls make on a GPU of ``target`` to ``on_launch``."""
    with recording(target, on_launch):
        for _, call in api_calls():
            call()


# ---------------------------------------------------------------------------------------------
# 2. Specialise as Triton's launcher does, and compile.


def targets():
    """Triton's GPUTargets: the NVIDIA archs, and the AMD archs this Triton can compile for."""
    from triton.backends.compiler import GPUTarget

    found = [GPUTarget("cuda", arch, 32) for arch in NVIDIA_ARCHS]
    for arch in AMD_ARCHS:
        if arch == "gfx942" or _knows(GPUTarget("hip", arch, 64)):
            found.append(GPUTarget("hip", arch, 64))
    return found


def _knows(target):
    import triton
    import triton.language as tl
    from triton.compiler import ASTSource

    @triton.jit
    def probe(x_ptr):
        tl.store(x_ptr, 1.0)

    try:
        triton.compile(ASTSource(probe, {"x_ptr": "*fp32"}), target=target,
                       options=dict(enable_fp_fusion=True))
        return True
    except Exception:
        return False


def target_name(target):
    return f"sm_{target.arch}" if target.backend == "cuda" else target.arch


def specialise(launch, target):
    """(source, options) of the binary that ``launch`` would run on ``target``: Triton's binder
    on the launch's arguments, exactly as its JIT launcher calls it."""
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = launch.fn
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, launch.kwargs, bound,
                                                          specialization, options)
    return ASTSource(fn, signature, constexprs, attrs), options


def jobs(target_list):
    """One (target, kernel, signature, constexprs, attrs, options, description) per distinct
    binary."""
    found = {}

    def add(launch):  # specialised at once: a launch's tensors are not kept
        src, options = specialise(launch, target)
        key = (target_name(target), launch.kernel, src.hash(), options.hash())
        if key not in found:
            found[key] = (target, launch.kernel, src.signature, src.constants, src.attrs,
                          options.__dict__, _describe(launch, src))

    for target in target_list:
        record_launches(target, add)
    return list(found.values())


def _describe(launch, src):
    constants = {src.fn.arg_names[path[0]]: value for path, value in src.constants.items()}
    kernel = {"_rdrop_fwd_kernel": "fwd", "_rdrop_bwd_kernel": "bwd",
              "_rdrop_partials_kernel": "partials",
              "_scale_rows_kernel": "scale"}.get(launch.kernel, launch.kernel)
    dtype = str(src.signature["z1_ptr"]).lstrip("*")
    specialised = {src.fn.arg_names[path[0]]: value for path, value in src.attrs.items() if value}
    return dict(kernel=kernel, dtype=dtype, block=constants.pop("BLOCK"),
                num_warps=launch.kwargs["num_warps"], aligned=constants.pop("ALIGNED", False),
                flags={k: v for k, v in constants.items() if v is not None},
                specialised=specialised)


def compile_job(job):
    """Build one binary and read its resources: a Build."""
    import triton
    from triton.compiler import ASTSource

    target, kernel, signature, constants, attrs, options, described = job
    build = Build(target=target_name(target), **described)
    fn = _get(kernel)
    try:
        compiled = triton.compile(ASTSource(fn, signature, constants, attrs), target=target,
                                  options=options)
    except Exception as error:  # noqa: BLE001 (every failure is a result to report)
        build.error = _error_text(error)
        return build
    build.ok = True
    if target.backend == "cuda":
        _read_cuda(build, compiled)
    else:
        _read_amd(build, compiled)
    build.kib_in_flight_per_sm = (build.programs_per_sm * 2 * build.block
                                  * int(re.sub(r"\D", "", build.dtype)) / 8 / 1024)
    return build


def _error_text(error):
    """The innermost cause first (Triton wraps a NameError in a CompilationError), then the
    outermost error with its place in the source."""
    causes = [error]
    while (causes[-1].__cause__ or causes[-1].__context__) is not None:
        causes.append(causes[-1].__cause__ or causes[-1].__context__)
    root, outer = causes[-1], f"{type(error).__name__}: {error}"
    return outer if root is error else f"{type(root).__name__}: {root}\n{outer}"


def _read_cuda(build, compiled):
    """Registers, local memory and the loops' instructions from cuobjdump (one call), vector
    widths from the PTX, occupancy from the register allocation unit (256 per warp) and the SM's
    limits."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([_cuobjdump(), "--dump-resource-usage", "-sass", cubin.name],
                               capture_output=True, text=True, check=True).stdout
    build.loop_instructions = sass_loops(usage)
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    build.registers = int(fields["REG"])
    build.local_bytes = int(fields["LOCAL"]) + int(fields["STACK"])
    build.shared_bytes = compiled.metadata.shared + int(fields["SHARED"])
    loads, stores = _loop_access_bits(
        compiled.asm["ptx"], block=r"^(\$L__BB\d+_\d+:|//\s*%bb\.\d+:)",
        access=r"\b(ld|st)\.global((?:\.[\w:]+)+)", width=_ptx_width)
    build.loop_load_bits, build.loop_store_bits = loads, stores
    limits = SM_LIMITS[int(build.target[3:])]
    regs_per_warp = math.ceil(build.registers * 32 / 256) * 256
    by_regs = limits["regs"] // regs_per_warp // build.num_warps
    by_warps = limits["warps"] // build.num_warps
    by_shared = limits["shared"] // (build.shared_bytes + 1024)  # 1 KiB reserved per program
    build.programs_per_sm = min(by_regs, by_warps, by_shared, limits["programs"])
    build.warps_per_sm = build.programs_per_sm * build.num_warps


def _read_amd(build, compiled):
    """VGPRs (the file is unified with the AGPRs), scratch memory and LDS from the assembly's
    metadata and Triton's (a spilled VGPR goes to scratch; a spilled SGPR to a lane of a VGPR);
    occupancy from the VGPRs per SIMD (granule 8) for waves spread over the CU's 4 SIMDs, and
    the LDS per CU."""
    asm = compiled.asm["amdgcn"]

    def meta(key):
        return int(re.search(rf"\.{key}:\s+(\d+)", asm).group(1))

    build.registers = meta("vgpr_count")
    build.local_bytes = meta("private_segment_fixed_size") + 4 * meta("vgpr_spill_count")
    build.sgprs_in_vgpr_lanes = meta("sgpr_spill_count")
    build.shared_bytes = meta("group_segment_fixed_size") + compiled.metadata.shared
    loads, stores = _loop_access_bits(
        asm, block=r"^(\.LBB\d+_\d+:|;\s*%bb\.\d+:)",
        access=r"\b(?:global|buffer)_(load|store)_(\w+)", width=_amd_width)
    build.loop_load_bits, build.loop_store_bits = loads, stores
    limits = SM_LIMITS[build.target]
    waves_per_simd = min(limits["waves_per_simd"],
                         limits["vgprs"] // (math.ceil(build.registers / 8) * 8))
    by_regs = waves_per_simd * limits["simds"] // build.num_warps
    by_shared = limits["shared"] // build.shared_bytes if build.shared_bytes else by_regs
    build.programs_per_sm = min(by_regs, by_shared, limits["programs"])
    build.warps_per_sm = build.programs_per_sm * build.num_warps


def sass_loops(sass):
    """[instructions, of which MUFU.EX2] per iteration of each loop of cuobjdump's SASS, in
    address order. A loop is a backward branch and the code from its target; a forward branch
    inside it that lands inside it skips a conditional block, left out of the count."""
    code = [(int(address, 16), text.strip()) for address, text in
            re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    index = {address: i for i, (address, _) in enumerate(code)}
    loops = []
    for end, (address, text) in enumerate(code):
        branch = re.search(r"\bBRA\b.*?0x([0-9a-f]+)", text)
        target = int(branch.group(1), 16) if branch else None
        if target is None or target > address or target not in index or index[target] == end:
            continue  # not a loop (or the idle loop after EXIT, a branch to itself)
        body = code[index[target]:end + 1]
        skipped = set()
        for at, inner in body:
            jump = re.search(r"^@!?U?P\w+\s+BRA\b.*?0x([0-9a-f]+)", inner)
            if jump and at < int(jump.group(1), 16) <= address:
                skipped |= {a for a, _ in body if at < a < int(jump.group(1), 16)}
        kept = [t for a, t in body if a not in skipped]
        loops.append([len(kept), sum("MUFU.EX2" in t for t in kept)])
    return loops


def _loop_access_bits(asm, *, block, access, width):
    """Sorted distinct widths in bits of the global loads and stores inside loops. LLVM marks the
    basic blocks of a loop in the assembly it prints ("=>This Inner Loop Header",
    "in Loop: Header=..."), on the line that starts the block or the comment line after it."""
    lines = asm.splitlines()
    loads, stores, in_loop = set(), set(), False
    for i, line in enumerate(lines):
        if re.match(block, line.strip()):
            after = lines[i + 1].strip() if i + 1 < len(lines) else ""
            notes = line + (after if after.startswith(("//", ";")) and not re.match(block, after)
                            else "")
            in_loop = "Loop Header" in notes or "in Loop:" in notes
        elif in_loop:
            for kind, suffix in re.findall(access, line):
                (loads if kind in ("ld", "load") else stores).add(width(suffix))
    return sorted(loads), sorted(stores)


def _ptx_width(suffix):
    # ".v4.b32" -> 128, ".b16" -> 16 (cache and eviction qualifiers are skipped)
    parts = suffix.strip(".").split(".")
    lanes = next((int(p[1:]) for p in parts if re.fullmatch(r"v\d", p)), 1)
    bits = next(int(p[1:]) for p in reversed(parts) if re.fullmatch(r"[bsuf]\d+", p))
    return lanes * bits


def _amd_width(suffix):
    # dwordx4 -> 128, dword -> 32, short / ushort / short_d16 -> 16, byte -> 8
    if suffix.startswith("dword"):
        return 32 * int(suffix[6:] or 1)
    if "short" in suffix:
        return 16
    if "byte" in suffix:
        return 8
    return int(re.search(r"\d+", suffix).group())


@functools.lru_cache(maxsize=None)
def _cuobjdump():
    import triton

    from_knobs = getattr(getattr(getattr(triton, "knobs", None), "nvidia", None), "cuobjdump", None)
    if from_knobs is not None and getattr(from_knobs, "path", None):
        return from_knobs.path
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")


def run(target_list=None, workers=None):
    """Compile every binary the API launches for every target; Builds, in a stable order."""
    target_list = target_list or targets()
    todo = jobs(target_list)
    context = multiprocessing.get_context("spawn")  # no fork of a process that holds torch
    workers = workers or len(os.sched_getaffinity(0))
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        builds = list(pool.map(compile_job, todo, chunksize=4))
    order = [target_name(t) for t in target_list]
    return sorted(builds, key=lambda b: (order.index(b.target), b.kernel, b.dtype, b.block,
                                         not b.aligned, sorted(b.flags.items())))


# ---------------------------------------------------------------------------------------------
# 3. The report: one row per target, kernel, dtype and launch configuration (the flags and the
# row alignment folded in: registers and shared memory are their maxima, occupancy its minimum;
# the loops' instructions are those of aligned rows without softcap, on NVIDIA).


def summary(builds):
    groups = {}
    for b in builds:
        groups.setdefault((b.target, b.kernel, b.dtype, b.block, b.num_warps), []).append(b)
    lines = ["| target | kernel | dtype | BLOCK | warps | builds | registers | shared B | local B "
             "| load bits (aligned) | store bits (aligned) | programs/SM | warps/SM "
             "| KiB in flight/SM | loop instructions (aligned) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (target, kernel, dtype, block, warps), group in groups.items():
        failed = [b for b in group if not b.ok]
        if failed:
            lines.append(f"| {target} | {kernel} | {dtype} | {block} | {warps} | {len(group)} "
                         f"| FAILED: {failed[0].error[:80]} |")
            continue
        aligned = [b for b in group if b.aligned]
        lines.append(
            f"| {target} | {kernel} | {dtype} | {block} | {warps} | {len(group)} "
            f"| {max(b.registers for b in group)} | {max(b.shared_bytes for b in group)} "
            f"| {max(b.local_bytes for b in group)} | {_bits(aligned, 'loop_load_bits')} "
            f"| {_bits(aligned, 'loop_store_bits')} "
            f"| {min(b.programs_per_sm for b in group)} | {min(b.warps_per_sm for b in group)} "
            f"| {min(b.kib_in_flight_per_sm for b in group):.0f} | {_loops(aligned)} |")
    return "\n".join(lines)


def _loops(builds):
    """The SASS instructions per iteration of each loop of the build without flags."""
    plain = [b for b in builds if not any(b.flags.values()) and b.loop_instructions]
    return " / ".join(str(n) for n, _ in plain[0].loop_instructions) if plain else "-"


def _bits(builds, name):
    widths = sorted({w for b in builds for w in getattr(b, name)})
    return "/".join(map(str, widths)) or "-"


def environment():
    import triton

    return dict(triton=triton.__version__, torch=torch.__version__, python=sys.version.split()[0])


def main():
    parser = argparse.ArgumentParser(prog="python -m benchmarks.codegen", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="also write every build here")
    parser.add_argument("--out", type=Path, default=RESULTS,
                        help=f"folder for codegen.md and codegen.json (default {RESULTS})")
    parser.add_argument("--no-save", action="store_true", help="print only")
    parser.add_argument("--workers", type=int, help="compiling processes (default: all cores)")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("unset TRITON_INTERPRET: the interpreter does not compile")
    builds = run(workers=args.workers)
    env = environment()
    failed = sum(not b.ok for b in builds)
    lanes = sorted({b.target for b in builds if b.sgprs_in_vgpr_lanes})
    header = (f"Triton {env['triton']}, torch {env['torch']}: {len(builds)} builds, "
              f"{failed} failed, "
              f"{sum(b.local_bytes > 0 for b in builds)} with local memory (spills); "
              f"{sum(b.sgprs_in_vgpr_lanes > 0 for b in builds)} keep spilled scalar registers "
              f"in vector-register lanes, no memory ({', '.join(lanes) or 'none'})")
    table = f"{header}\n\n{summary(builds)}\n"
    print(table)
    result = dict(environment=env, builds=[asdict(b) for b in builds])
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    if not args.no_save:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "codegen.md").write_text(table)
        (args.out / "codegen.json").write_text(json.dumps(result, indent=1) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
