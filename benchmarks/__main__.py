"""Benchmark runner: ``python -m benchmarks`` (what ``make bench`` runs).

Sweeps sizes x providers x {fwd, fwd+bwd} on one device, prints a table and writes
``results.json``, ``results.md`` and PNG plots into ``benchmarks/results/<device>-<date>/``
(then the preset, and the options given beyond it: a slice of the grid keeps a folder of its own).
On CPU each provider and size runs in its own process, so that its peak resident memory is its
own.
"""

import argparse
import hashlib
import itertools
import json
import re
import statistics
from dataclasses import asdict
from pathlib import Path

import torch

from benchmarks import report, vocab_parallel
from benchmarks.measure import (
    FAILED,
    MAX_WARMUP_CALLS,
    MODES,
    WARMUP_SECONDS,
    Case,
    environment,
    measure,
    measure_in_subprocess,
    time_copy,
    timings,
)
from benchmarks.providers import PROVIDERS

# DESIGN.md section 6 on a GPU; on 2 CPU cores, sizes that finish in a few minutes. The linear
# providers run where a grid names hidden sizes (their matmuls dominate: see the presets).
GPU_GRID = dict(tokens=[4096, 8192, 16384], vocab=[32000, 128256, 151936, 262144],
                dtypes=["bfloat16"], repeats=10)
GPU_FP32 = dict(tokens=[4096], vocab=[32000, 128256, 151936, 262144], dtypes=["float32"])
CPU_GRID = dict(tokens=[256], vocab=[32000, 131072], dtypes=["float32", "bfloat16"], repeats=5)
LINEAR = [name for name, p in PROVIDERS.items() if p.inputs == "linear"]
LOGITS = [name for name, p in PROVIDERS.items() if p.inputs != "linear"]
# Named subsets; cpu-native: the native CPU kernel's cases, fwd+bwd at N=256.
PRESETS = {
    # one GPU case first, so that a short GPU session has it: N=8192, V=128256, bf16
    "gpu-quick": dict(tokens=[8192], vocab=[128256], dtypes=["bfloat16"], repeats=10),
    "cpu-native": dict(tokens=[256], vocab=[32000, 131072], dtypes=["float32", "bfloat16"],
                       modes=["fwd+bwd"], repeats=7, providers=LOGITS),
    # the fused linear variant against matmul + a loss, each in its own process on CPU
    "cpu-linear": dict(tokens=[4096], vocab=[32000], hidden=[1024], dtypes=["float32"],
                       modes=["fwd+bwd"], repeats=5, warmup=1, providers=LINEAR),
    "gpu-linear": dict(tokens=[16384], vocab=[128256], hidden=[4096], dtypes=["bfloat16"],
                       modes=["fwd+bwd"], repeats=10, providers=LINEAR),
    # vocab_parallel_group= on 1, 2 and 4 gloo ranks of this machine (benchmarks/vocab_parallel.py)
    "cpu-vocab-parallel": dict(tokens=[1024], vocab=[131072], dtypes=["float32"],
                               modes=["fwd+bwd"], repeats=15, worlds=[1, 2, 4]),
}


# What the folder name leaves out (see results_name); the sizes and dtypes default per device.
DEFAULTS = dict(tokens=None, vocab=None, dtypes=None, hidden=[], providers=list(PROVIDERS),
                modes=list(MODES), worlds=None)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", choices=list(PRESETS),
                        help="a named set of the options below; those given with it win")
    parser.add_argument("--tokens", type=_positive, nargs="+",
                        help="N values (default: per device)")
    parser.add_argument("--vocab", type=_positive, nargs="+",
                        help="V values (default: per device)")
    parser.add_argument("--hidden", type=_positive, nargs="+", default=DEFAULTS["hidden"],
                        help="H values for the linear providers (default: none)")
    parser.add_argument("--dtypes", nargs="+", choices=["bfloat16", "float32", "float16"])
    parser.add_argument("--providers", nargs="+", choices=list(PROVIDERS),
                        default=DEFAULTS["providers"])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=DEFAULTS["modes"])
    parser.add_argument("--repeats", type=int, help="timed calls per case (median reported)")
    parser.add_argument("--rounds", type=int,
                        help="times the cases are timed in turn, the repeats split among them, "
                             "each row the median of all its calls: so that no one moment of a "
                             "shared machine sets a row (default: 3 on CPU, 1 on GPU)")
    parser.add_argument("--warmup", type=int, default=2,
                        help="untimed calls first: this many, then more for "
                             f"{WARMUP_SECONDS} s ({MAX_WARMUP_CALLS} in all at most); the "
                             "vocabulary-parallel ranks (--worlds) make one")
    parser.add_argument("--out", type=Path, help="results folder (default: benchmarks/results/"
                        "<device>-<date>, then the preset and the options given beyond it)")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--worlds", type=_positive, nargs="+",
                        help="gloo ranks: run the vocabulary-parallel loss on each number of "
                             "ranks instead of the providers (see cpu-vocab-parallel)")
    preset = parser.parse_args(argv).preset
    parser.set_defaults(**PRESETS.get(preset, {}))
    args = parser.parse_args(argv)
    if args.warmup < 1:  # the first call compiles (torch.compile, Triton) or pages memory in
        parser.error(f"--warmup must be >= 1, got {args.warmup}")
    if args.repeats is not None and args.repeats < 2:  # a median with its quantiles
        parser.error(f"--repeats must be >= 2, got {args.repeats}")
    if args.rounds is not None and args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    if args.worlds:
        # one size of fp32 logits, fwd+bwd of rdrop_loss (benchmarks/vocab_parallel.py)
        if len(args.tokens or [0]) > 1 or len(args.vocab or [0]) > 1:
            parser.error("--worlds runs one size: give one --tokens and one --vocab value")
        if (args.dtypes not in (None, ["float32"]) or args.hidden
                or args.providers != DEFAULTS["providers"]
                or args.modes not in (DEFAULTS["modes"], ["fwd+bwd"])):
            parser.error("--worlds times fwd+bwd of rdrop_loss on fp32 logits: it takes no "
                         "--dtypes, --hidden, --providers or --modes (nor a preset that sets "
                         "them)")
    elif not any(True for _ in case_groups(args, torch.device(args.device))):
        parser.error(
            f"--providers {' '.join(args.providers)} with --modes {' '.join(args.modes)} and "
            f"--hidden {' '.join(map(str, args.hidden)) or '(none)'} select no case: the "
            f"linear providers ({', '.join(LINEAR)}) need --hidden, and "
            f"{', '.join(n for n, p in PROVIDERS.items() if p.grad_only)} are timed fwd+bwd "
            "only")
    return args


def case_groups(args, device):
    """Lists of cases that share sizes, dtype and provider (one per mode): one process each.
    Sizes or dtypes given pick a slice of the device's grid: the axes not given keep its values."""
    grid = GPU_GRID if device.type == "cuda" else CPU_GRID
    if args.tokens or args.vocab or args.dtypes:
        grids = [dict(tokens=args.tokens or grid["tokens"], vocab=args.vocab or grid["vocab"],
                      dtypes=args.dtypes or grid["dtypes"])]
    else:
        grids = [GPU_GRID, GPU_FP32] if device.type == "cuda" else [CPU_GRID]
    for grid in grids:
        for n, v, dtype in itertools.product(grid["tokens"], grid["vocab"], grid["dtypes"]):
            for provider in args.providers:
                modes = [m for m in args.modes if m != "fwd" or not PROVIDERS[provider].grad_only]
                for h in args.hidden if PROVIDERS[provider].inputs == "linear" else [0]:
                    if modes:
                        yield [Case(n, v, dtype, provider, mode, h) for mode in modes]


def main():
    args = parse_args()
    torch._dynamo.config.fail_on_recompile_limit_hit = True  # not a compile row timing eager
    device = torch.device(args.device)
    repeats = args.repeats or (GPU_GRID if device.type == "cuda" else CPU_GRID)["repeats"]
    env = environment(device)
    if args.worlds:
        return main_vocab_parallel(args, env, repeats)
    rounds = args.rounds or (1 if device.type == "cuda" else 3)
    per_round = max(2, -(-repeats // rounds))  # each round's rows need their own quantiles
    rows, copy_seconds, row_of = [], {}, {}
    groups = list(case_groups(args, device))
    result = dict(environment=env, repeats=per_round * rounds, rounds=rounds, rounds_done=0,
                  planned=sum(map(len, groups)), rows=rows)
    out = _out_folder(args, env)
    table = _write(out, result)
    for stale in out.glob("*_vs_vocab.png"):  # an earlier run's, which this one replaces
        stale.unlink()
    for i, group in enumerate(report.progress(groups * rounds)):
        first = i < len(groups)  # the first round also checks results and measures memory
        head = group[0]
        key = (head.n_tokens, head.vocab_size, head.dtype)
        reason = PROVIDERS[head.provider].unavailable(device)
        if not first and (reason is not None or any(row_of[c]["status"] != "ok" for c in group)):
            continue  # skipped, or failed, in the first round
        # The copy of the size's logits, timed before each of its groups: the median of all
        # those samples, so that no one moment of a shared machine sets every row's share
        elem = torch.finfo(getattr(torch, head.dtype)).bits // 8
        n_bytes = 2 * head.n_tokens * head.vocab_size * elem
        copy_seconds.setdefault(key, []).extend(time_copy(n_bytes, device, max(per_round, 5)))
        copy_gbps = 2 * n_bytes / statistics.median(copy_seconds[key]) / 1e9  # reads, writes
        if reason is not None:
            group_rows = [dict(asdict(case), status=f"skipped: {reason}") for case in group]
        elif device.type == "cpu":
            group_rows = measure_in_subprocess(group, device, per_round, args.warmup, first)
        else:
            group_rows = measure(group, device, per_round, args.warmup, first)
            torch.cuda.empty_cache()
        for case, row in zip(group, group_rows, strict=True):
            _merge(rows, row_of, case, row, i // len(groups))
        for row in rows:  # this size's rows so far, against the copy's samples so far
            if row["status"] == "ok" and (row["n_tokens"], row["vocab_size"], row["dtype"]) == key:
                row["copy_gbps"] = copy_gbps
                row["fraction_of_copy"] = row["gbps"] / copy_gbps
        result["rounds_done"] = (i + 1) // len(groups)
        # after every group: a run cut short (a GPU lease ending) keeps what it measured
        table = _write(out, result)
    result["rounds_done"] = rounds  # where the last groups were skipped, too
    table = _write(out, result)
    if not args.no_plots:
        report.plots(result, out)
    print(table)
    print(f"results written to {out}")
    failed = [r for r in rows if r["status"].startswith(FAILED)]
    if failed:
        raise SystemExit(f"{len(failed)} cases failed (their errors are above), e.g. "
                         f"{failed[0]['provider']} {failed[0]['mode']}: {failed[0]['status']}")


def _merge(rows, row_of, case, row, round_index):
    """A case's row of one round into the run's rows: the first round's as it is, a later
    round's calls added to its samples (or, where that round failed, its status). Later rounds
    run only the cases whose first round was ok."""
    earlier = row_of.get(case)
    if earlier is None:
        row_of[case] = row
        rows.append(row)
    elif row["status"] != "ok":
        earlier.update(status=f"{row['status']} (round {round_index + 1})")
    else:
        earlier.update(timings(case, earlier["samples_ms"] + row["samples_ms"]))


def _write(out, result):
    """results.json and results.md of the rows so far; returns the table."""
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    table = report.markdown(result) + "\n" + report.goals(result)
    (out / "results.md").write_text(table)
    return table


def main_vocab_parallel(args, env, repeats):
    out = _out_folder(args, env)
    rows = vocab_parallel.run((args.tokens or [1024])[0], (args.vocab or [131072])[0],
                              args.worlds, repeats, str(out))
    result = dict(environment=env, repeats=repeats, rows=rows)
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    table = vocab_parallel.markdown(result)
    (out / "results.md").write_text(table)
    for stale in out.glob("world*"):
        stale.unlink()
    print(table)
    print(f"results written to {out}")


def _out_folder(args, env):
    out = args.out or Path(__file__).parent / "results" / results_name(args, env)
    out.mkdir(parents=True, exist_ok=True)
    return out


def results_name(args, env) -> str:
    """<device>-<date>, then the preset and the options given beyond it (sizes, dtypes,
    providers, modes, ranks): a slice of the grid gets a folder of its own instead of
    overwriting the day's run."""
    preset = PRESETS.get(args.preset, {})
    name = [_slug(env["device"]), env["date"][:10], *([args.preset] if args.preset else [])]
    for key, tag in (("tokens", "n"), ("vocab", "v"), ("hidden", "h"), ("dtypes", ""),
                     ("providers", ""), ("modes", ""), ("worlds", "w")):
        values = getattr(args, key)
        if values != preset.get(key, DEFAULTS[key]):
            name.append(_slug(tag + "-".join(map(str, values))))
    return "-".join(name)


def _slug(name, limit=64):
    """Lower-case words joined by hyphens, without trademark signs ("Intel(R) Xeon(R)"). Longer
    than limit, the words that fit whole and a hash of the whole name: two names that differ
    only at the end (a CPU's thread count) keep folders of their own."""
    words = re.sub(r"\((r|tm)\)", " ", name.lower())
    slug = re.sub(r"[^a-z0-9]+", "-", words).strip("-") or "unnamed"
    if len(slug) <= limit:
        return slug
    tag = hashlib.sha1(slug.encode()).hexdigest()[:6]
    room = limit - len(tag) - 1
    head = slug[:room + 1].rsplit("-", 1)[0]  # the words that fit whole
    return f"{head if len(head) <= room else slug[:room]}-{tag}"


if __name__ == "__main__":
    main()
