"""Progress, the Markdown table and the plots of a benchmark run."""

import itertools

STYLES = {  # provider -> (color, marker, linestyle): distinct in color and in shape
    "eager": ("#7f7f7f", "o", "--"),
    "compile": ("#1f77b4", "s", "--"),
    "liger": ("#ff7f0e", "^", "-."),
    "fastrdrop": ("#2ca02c", "D", "-"),
    "fastrdrop-inplace": ("#d62728", "v", "-"),
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
    return f"N={case.n_tokens} V={case.vocab_size} {case.dtype} {case.provider} ({modes})"


def markdown(result):
    env = result["environment"]
    lines = [
        f"Device: **{env['device']}**; torch {env['torch']}, triton {env['triton']}, "
        f"fastrdrop {env['fastrdrop']} (backend {env['backend']}), commit {env['commit']}, "
        f"{env['date']}. Median of {result['repeats']} calls (20-80% quantiles); peak extra "
        "memory above the inputs, gradients included; GB/s on the minimal bytes (read both "
        "logits, and write both gradients for fwd+bwd) and as a share of a device copy.",
        "",
        "| N | V | dtype | mode | provider | median ms | 20-80% ms | vs eager | peak extra MiB "
        "| GB/s | of copy |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    eager = {_key(r): r["median_ms"] for r in result["rows"]
             if r["provider"] == "eager" and r["status"] == "ok"}
    for r in result["rows"]:
        cells = [r["n_tokens"], r["vocab_size"], r["dtype"], r["mode"], r["provider"]]
        if r["status"] != "ok":
            cells += [r["status"], "", "", "", "", ""]
        else:
            base = eager.get(_key(r))
            cells += [f"{r['median_ms']:.2f}", f"{r['q20_ms']:.2f}-{r['q80_ms']:.2f}",
                      f"{base / r['median_ms']:.1f}x" if base else "",
                      f"{r['peak_extra_mib']:.0f}", f"{r['gbps']:.1f}",
                      f"{100 * r['fraction_of_copy']:.0f}%"]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines) + "\n"


def goals(result):
    """The performance goals of DESIGN.md section 7 that these rows can judge, each with its
    measured ratio: fwd+bwd of fastrdrop against the other providers, and its memory."""
    rows = [r for r in result["rows"] if r["status"] == "ok" and r["mode"] == "fwd+bwd"]
    by = {(r["n_tokens"], r["vocab_size"], r["dtype"], r["provider"]): r for r in rows}
    on_gpu = result["environment"]["device_type"] == "cuda"
    lines = ["Goals (DESIGN.md section 7), fwd+bwd:", ""]
    for (n, v, dtype, provider), r in sorted(by.items()):
        if provider != "fastrdrop" or (on_gpu and (dtype != "bfloat16" or v < 128000)):
            continue
        checks = [("eager", 6 if on_gpu else 20), ("compile", 2 if on_gpu else 4)]
        checks += [("liger", 2)] if on_gpu else []
        for other, goal in checks:
            if on_gpu or other == "eager" or dtype == "float32":
                base = by.get((n, v, dtype, other))
                if base:
                    ratio = base["median_ms"] / r["median_ms"]
                    lines.append(f"- N={n} V={v} {dtype}: {ratio:.1f}x faster than {other} "
                                 f"(goal >= {goal}x): {'met' if ratio >= goal else 'NOT met'}")
        if on_gpu:
            share = r["fraction_of_copy"]  # = floor time / time
            lines.append(f"- N={n} V={v} {dtype}: {100 * share:.0f}% of copy bandwidth, i.e. "
                         f"{1 / share:.2f}x the floor (goal <= 1.3x): "
                         f"{'met' if 1 / share <= 1.3 else 'NOT met'}")
        else:
            limit = r["input_mib"] * 1.05  # gradients (the size of the inputs) + 5% of inputs
            lines.append(f"- N={n} V={v} {dtype}: peak extra memory {r['peak_extra_mib']:.0f} "
                         f"MiB, goal <= gradients + 5% of inputs = {limit:.0f} MiB: "
                         f"{'met' if r['peak_extra_mib'] <= limit else 'NOT met'}")
    return "\n".join(lines) + "\n"


def _key(row):
    return row["n_tokens"], row["vocab_size"], row["dtype"], row["mode"]


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
