"""Progress, the Markdown table and the plots of a benchmark run."""

import itertools

STYLES = {  # provider -> (color, marker, linestyle): distinct in color and in shape
    "eager": ("#7f7f7f", "o", "--"),
    "textbook": ("#e377c2", "h", "--"),
    "compile": ("#1f77b4", "s", "--"),
    "liger": ("#ff7f0e", "^", "-."),
    "fastrdrop": ("#bcbd22", "D", "-."),
    "fastrdrop-stacked": ("#2ca02c", "D", "-"),
    "fastrdrop-stacked-inplace": ("#d62728", "v", "-"),
    "fastrdrop-pair": ("#8c564b", "X", ":"),
    "matmul+eager": ("#7f7f7f", "o", ":"),
    "matmul+fastrdrop": ("#9467bd", "P", "-."),
    "fastrdrop-linear": ("#17becf", "*", "-"),
}


def progress(cases):
    """Iterate over groups of cases with a progress bar naming the current one."""
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if tqdm is None:
        for i, case in enumerate(cases):
            print(f"[{i + 1}/{len(cases)}] {_label(case)}", flush=True)
            yield case
        return
    bar = tqdm(cases, unit="case", dynamic_ncols=True)
    for case in bar:
        bar.set_description(_label(case))
        yield case


def _label(group):
    case = group[0]
    modes = ", ".join(c.mode for c in group)
    hidden = f" H={case.hidden_size}" if case.hidden_size else ""
    return f"N={case.n_tokens} V={case.vocab_size}{hidden} {case.dtype} {case.provider} ({modes})"


def markdown(result):
    env = result["environment"]
    lines = [
        f"Device: **{env['device']}**; torch {env['torch']}, triton {env['triton']}, "
        + (f"liger-kernel {env['liger_kernel']}, " if env.get("liger_kernel") else "")
        + f"fastrdrop {env['fastrdrop']} (backend {env['backend']}), commit {env['commit']}, "
        f"{env['date']}. Median of {result['repeats']} calls{_rounds(result)} (20-80% "
        "quantiles); peak extra "
        "memory above the inputs, gradients included; GB/s on the minimal bytes (read both "
        "logits, and write both gradients for fwd+bwd) and as a share of a device copy. fwd: "
        "the loss alone, under torch.no_grad().",
        "",
        "| N | V | H | dtype | mode | provider | median ms | 20-80% ms | vs eager "
        "| peak extra MiB | GB/s | of copy |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    eager = {_key(r): r["median_ms"] for r in result["rows"]
             if r["provider"] in ("eager", "matmul+eager") and r["status"] == "ok"}
    for r in result["rows"]:
        cells = [r["n_tokens"], r["vocab_size"], r.get("hidden_size") or "-", r["dtype"],
                 r["mode"], r["provider"]]
        if r["status"] != "ok":
            cells += [r["status"].replace("|", "\\|"), "", "", "", "", ""]  # a table cell
        else:
            base = eager.get(_key(r))
            cells += [f"{r['median_ms']:.2f}", f"{r['q20_ms']:.2f}-{r['q80_ms']:.2f}",
                      f"{base / r['median_ms']:.1f}x" if base else "",
                      f"{r['peak_extra_mib']:.0f}", f"{r['gbps']:.1f}",
                      f"{100 * r['fraction_of_copy']:.0f}%"]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    if len(result["rows"]) < result.get("planned", 0):
        lines += ["", f"Cut short: {len(result['rows'])} of {result['planned']} cases measured."]
    elif result.get("rounds_done", 1) < result.get("rounds", 1):
        lines += ["", f"Cut short in round {result['rounds_done'] + 1} of {result['rounds']}: "
                  "each row holds the calls of the rounds it ran in."]
    return "\n".join(lines) + "\n"


def _rounds(result):
    rounds = result.get("rounds", 1)
    if rounds == 1:
        return ""
    return (f" in {rounds} rounds (the cases timed in turn, {result['repeats'] // rounds} calls "
            "each a round, in a process of their own on CPU)")


def goals(result):
    """The performance goals (DESIGN.md section 7 and the fused linear variant's) that these rows
    can judge, each with its measured ratio; fwd+bwd only."""
    rows = [r for r in result["rows"] if r["status"] == "ok" and r["mode"] == "fwd+bwd"]
    by = {(r["n_tokens"], r["vocab_size"], r.get("hidden_size", 0), r["dtype"], r["provider"]): r
          for r in rows}
    failed = {(r["n_tokens"], r["vocab_size"], r.get("hidden_size", 0), r["dtype"],
               r["provider"]): r["status"]
              for r in result["rows"] if r["status"] != "ok" and r["mode"] == "fwd+bwd"}
    on_gpu = result["environment"]["device_type"] == "cuda"
    lines = ["Goals, fwd+bwd:", ""]

    def check(label, text, value, goal, at_least):
        met = value >= goal if at_least else value <= goal
        sign = ">=" if at_least else "<="
        lines.append(f"- {label}: {text} (goal {sign} {goal:g}): {'met' if met else 'NOT met'}")

    for (n, v, h, dtype, provider), r in sorted(by.items()):
        label = f"N={n} V={v}" + (f" H={h}" if h else "") + f" {dtype}"
        other = {p: by.get((n, v, h, dtype, p)) for p in STYLES}
        judged = not on_gpu or (dtype == "bfloat16" and v >= 128000)
        if provider == "fastrdrop-stacked" and judged:
            speed = [("eager", 6 if on_gpu else 20), ("compile", 2 if on_gpu else 4)]
            speed += [("liger", 2)] if on_gpu else []
            for name, goal in speed:
                if other[name]:
                    ratio = other[name]["median_ms"] / r["median_ms"]
                    check(label, f"{ratio:.1f}x faster than {name}", round(ratio, 1), goal, True)
                elif (n, v, h, dtype, name) in failed:
                    lines.append(f"- {label}: {name} not measured "
                                 f"({failed[n, v, h, dtype, name]}): the goal against it is "
                                 "not judged")
            if on_gpu:
                share = r["fraction_of_copy"]  # = floor time / time
                check(label, f"{1 / share:.2f}x the bandwidth floor", round(1 / share, 2), 1.3,
                      False)
            limit = r["input_mib"] * 1.05  # one gradient (as large as the input) + 5% of it
            check(label, f"peak extra memory {r['peak_extra_mib']:.0f} MiB, limit: the gradient "
                  "+ 5% of the input, MiB", round(r["peak_extra_mib"]), round(limit), False)
            halves = other["fastrdrop"]
            if halves:
                ratio = r["median_ms"] / halves["median_ms"]
                check(label, f"time {ratio:.2f}x fastrdrop on the halves", round(ratio, 2), 0.6,
                      False)
                share = r["peak_extra_mib"] / halves["peak_extra_mib"]
                check(label, f"peak memory {100 * share:.0f}% of fastrdrop on the halves "
                      "(one gradient against two)", round(share, 2), 0.55, False)
        if provider == "fastrdrop-stacked-inplace" and judged:
            if not on_gpu:
                share = r["fraction_of_copy"]
                check(label, f"in place at {100 * share:.0f}% of a copy's bandwidth, "
                      f"{r['gbps']:.1f} against {r['copy_gbps']:.1f} GB/s",
                      round(share, 2), 0.6, True)
            limit = 0.01 * r["input_mib"]  # O(N): a few numbers per row
            check(label, f"in-place peak extra memory {r['peak_extra_mib']:.1f} MiB, limit: 1% "
                  "of the input, MiB", round(r["peak_extra_mib"], 1), round(limit, 1), False)
        if provider == "fastrdrop-linear":
            eager, unfused = other["matmul+eager"], other["matmul+fastrdrop"]
            if eager:
                share = r["peak_extra_mib"] / eager["peak_extra_mib"]
                check(label, f"peak memory {100 * share:.1f}% of matmul+eager", round(share, 3),
                      0.125, False)
            if unfused and not on_gpu:
                share = r["peak_extra_mib"] / unfused["peak_extra_mib"]
                check(label, f"peak memory {100 * share:.1f}% of matmul+fastrdrop",
                      round(share, 3), 0.4, False)
            if unfused:
                ratio = r["median_ms"] / unfused["median_ms"]
                check(label, f"time {ratio:.2f}x matmul+fastrdrop", round(ratio, 2), 1.15,
                      False)
    return "\n".join(lines) + "\n"


def _key(row):
    return row["n_tokens"], row["vocab_size"], row.get("hidden_size", 0), row["dtype"], row["mode"]


def plots(result, out):
    """time, peak memory and share of copy bandwidth vs V: one figure each, one panel per
    (mode, N, dtype), one line per provider."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r["status"] == "ok"]
    modes = [m for m in ("fwd", "fwd+bwd") if any(r["mode"] == m for r in rows)]
    panels = sorted({(r["n_tokens"], r["dtype"]) for r in rows})
    if not rows:
        return
    env = result["environment"]
    metrics = [("median_ms", "time per call (ms, log)", "time", "log"),
               ("peak_extra_mib", "peak extra memory (MiB)", "memory", "linear"),
               ("fraction_of_copy", "% of device-copy bandwidth", "bandwidth", "linear")]
    for field, ylabel, name, scale in metrics:
        fig, axes = plt.subplots(len(modes), len(panels), squeeze=False,
                                 figsize=(5.5 * len(panels), 4.2 * len(modes)))
        for (i, mode), (j, (n, dtype)) in itertools.product(enumerate(modes), enumerate(panels)):
            ax = axes[i][j]
            cell = sorted((r for r in rows if (r["mode"], r["n_tokens"], r["dtype"]) ==
                           (mode, n, dtype)), key=lambda r: (r["provider"], r["vocab_size"]))
            for provider, group in itertools.groupby(cell, key=lambda r: r["provider"]):
                group = list(group)
                color, marker, style = STYLES.get(provider, ("black", "x", ":"))
                values = [r[field] * (100 if field == "fraction_of_copy" else 1) for r in group]
                ax.plot([r["vocab_size"] for r in group], values, label=provider, color=color,
                        marker=marker, linestyle=style, linewidth=2, markersize=7)
            ax.set_title(f"{mode}, N={n}, {dtype}")
            ax.set_xlabel("vocabulary size V")
            ax.set_ylabel(ylabel)
            ax.set_yscale(scale)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=9)
        fig.suptitle(f"fastrdrop vs alternatives on {env['device']} ({env['date'][:10]})")
        fig.tight_layout()
        fig.savefig(out / f"{name}_vs_vocab.png", dpi=100)
        plt.close(fig)
