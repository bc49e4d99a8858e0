"""Tables and plots from the results dataset (benchmarks/results/results.jsonl.gz), and nothing else.

    python benchmarks/report.py                     # every (bench, machine, table): its latest run
    python benchmarks/report.py --run ID [--run ID]  # these runs, into files named ..._<ID>
    python benchmarks/report.py --list              # the runs in the dataset, newest last
    python benchmarks/report.py --add OUT/results.jsonl   # append another dataset's new runs (a GPU machine's), then
                                                         # report

Writes <bench>_<machine-slug>[_<table>].md and .png beside the dataset (or into --out): the markdown table(s) with
the ratios side by side, and a plot. Every bench script calls write_reports for its own run when it ends.
Plots need matplotlib; without it only the markdown is written.
"""
import argparse
import collections
import os
import pathlib
import re
import statistics
import sys
import textwrap

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import ROOT, append_rows, dataset_path, fmt_mib, fmt_ms, markdown_table, read_rows  # noqa: E402


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def by_run(rows) -> dict:
    runs = collections.OrderedDict()
    for row in rows:
        runs.setdefault(row["run"], []).append(row)
    return runs


def latest_runs(rows) -> list:
    """The run ids that are current: per (bench, machine, table) the one with the latest date."""
    latest = {}
    for run, group in by_run(rows).items():
        first = group[0]
        key = (first["bench"], first["machine"], first.get("table", ""))
        if key not in latest or (first["date"], run) > latest[key]:
            latest[key] = (first["date"], run)
    return [run for _, run in sorted(latest.values())]


def stem(first, with_run=False) -> str:
    parts = [first["bench"], slug(first["machine"])] + ([slug(first["table"])] if first.get("table") else [])
    return "_".join(parts + ([first["run"]] if with_run else []))


def header(title, rows) -> str:
    first = rows[0]
    loads = [r["load"] for r in rows if r.get("load") is not None]
    load = f"; load average {min(loads)}–{max(loads)}" if loads else ""
    triton = f", triton {first['triton']}" if first.get("triton") else ""
    note = f"\n\n{first['note']}" if first.get("note") else ""
    return (f"# {title}\n\n{first['machine']} ({first['device']}); run `{first['run']}`, {first['date']}, commit "
            f"{first['commit']}, torch {first['torch']}{triton}{load}.\n\nCommand: `{first['command']}`{note}\n")


def by_round(a, b):
    """Median over rounds of a[i] / b[i] (two variants timed in the same rounds), or None."""
    if not a or not b or len(a) != len(b):
        return None
    return statistics.median(x / y for x, y in zip(a, b))


def density_text(d) -> str:
    short = f"{d:.1e}"
    return short if float(short) == d else f"{d:.4g}"


def times(r) -> str:
    return f"{r:.2f}×" if r < 10 else f"{r:.0f}×"


def ratio(a, b, digits=2) -> str:
    if a is None or not b:
        return "–"
    return f"{a / b:.2g}" if a / b < 0.1 else f"{a / b:.{digits}f}"


# ---------------------------------------------------------------------------------------------------- masked_grad
BASELINES = ("matmul-gather", "official-gather", "official-sampled")  # the peers' ways, not randmask's
GATHERS = ("torch-gather", "native", "triton-gather")


def implementation(variant) -> bool:
    """One of randmask's implementations (as named when the run was made), not dispatch, a peer or another build."""
    return variant != "dispatch" and variant not in BASELINES and not variant.startswith("native@")


def masked_grad(rows):
    first = rows[0]["params"]
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    shapes = list(dict.fromkeys(r["params"]["shape"] for r in rows))
    stat = rows[0]["stat"]
    rounds = max(len(r["seconds"]) for r in rows)
    others = [v for v in variants if v.startswith("native@")]
    lines = [header(f"Masked gradient, ms per call ({first['dtype']}, {first['tokens']} tokens)", rows),
             f"{stat} of {rounds or 'the'} interleaved rounds{', cold caches' if first.get('cold') else ''}"
             + (f", {first['threads']} thread(s)" if first.get("threads") else "")
             + ". Each cell: ms (× the fastest variant); picks = what the selector (randmask.ops.select) runs; "
             "dispatch / best = randmask.ops.masked_grad over the fastest of randmask's implementations; "
             "matmul / dispatch = the dense baseline (grad_yᵀx in the layer's dtype, then a gather) over dispatch."]
    with_picks = any(r.get("picks") for r in rows)
    table = collections.defaultdict(dict)
    for r in rows:
        table[r["params"]["shape"]][(r["params"]["density"], r["params"]["n"]), r["variant"]] = r
    worst = []
    for shape in shapes:
        cells = table[shape]
        keys = sorted({k for k, _ in cells})
        names = [v for v in variants if any((k, v) in cells for k in keys)]
        out, crossovers = [], {}
        for key in keys:
            got = {v: cells[key, v] for v in names if (key, v) in cells}
            s = {v: r["s"] for v, r in got.items() if r.get("s") is not None}
            best = min((t for v, t in s.items() if v != "dispatch"), default=None)
            ours = min((t for v, t in s.items() if implementation(v)), default=None)
            dense = "triton-matmul" if "triton-matmul" in s else "torch-dense"
            for g in GATHERS:
                if g in s and dense in s and s[dense] < s[g] and g not in crossovers:
                    crossovers[g] = key[0]
            row = [density_text(key[0]), f"{key[1]:,}"]
            for v in names:
                if v not in s:
                    row.append("–")
                elif s[v] == best:
                    row.append(f"**{fmt_ms(s[v])}**")
                else:
                    row.append(f"{fmt_ms(s[v])} ({times(s[v] / best)})")
            d_best = s["dispatch"] / ours if "dispatch" in s and ours else None
            if d_best is not None:
                worst.append(d_best)
            row += [got.get("dispatch", {}).get("picks") or "–"] if with_picks else []
            row += [f"{d_best:.2f}" if d_best else "–", ratio(s.get("matmul-gather"), s.get("dispatch"), 1)]
            for other in others:
                value = got.get(other, {}).get("by_round") or by_round(got.get("native", {}).get("seconds"),
                                                                        got.get(other, {}).get("seconds"))
                row.append(f"{value:.2f}" if value else "–")
            out.append(row)
        lines += [f"\n## {shape}\n", markdown_table(["density", "n", *names, *(["picks"] if with_picks else []),
                                                     "dispatch / best",
                                                     "matmul / dispatch", *(f"native / {o} by round" for o in others)],
                                                    out)]
        notes = [f"{dense} first beats {g} at density {crossovers[g]:g}" if g in crossovers else
                 f"{g} beats {dense} at every density measured" for g in GATHERS if g in names]
        if notes:
            lines.append("\n" + "; ".join(notes) + ".")
    if worst:
        lines.append(f"\nDispatch over the fastest implementation: worst {max(worst):.2f}×, within 1.10× in "
                     f"{sum(w <= 1.10 for w in worst)} of {len(worst)} rows.")
    return "\n".join(lines), lambda path: plot_masked_grad(rows, shapes, variants, path)


def plot_masked_grad(rows, shapes, variants, path):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(shapes), figsize=(4.2 * len(shapes), 3.6), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        for v in variants:
            pts = sorted((r["params"]["density"], r["s"] * 1e3) for r in rows
                         if r["params"]["shape"] == shape and r["variant"] == v and r.get("s") is not None)
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=3, label=v, ls="--" if v == "dispatch" else "-")
        ax.set(xscale="log", yscale="log", title=shape, xlabel="density")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("ms per call")
    axes[0][-1].legend(fontsize=7)
    return fig


# ---------------------------------------------------------------------------------------------------- update
def update(rows):
    methods = list(dict.fromkeys(r["variant"] for r in rows))
    p = rows[0]["params"]
    lines = [header(f"Sparse update step, one {p['shape']} weight, ms per step", rows),
             f"{rows[0]['stat']} over the interleaved rounds; MaskedAdamW runs {p.get('path', '?')}."
             + (f" {p['threads']} thread(s)." if p.get("threads") else ""), ""]
    cells = {(r["params"]["dtype"], r["params"]["n"], r["variant"]): r["s"] for r in rows}
    keys = sorted({(r["params"]["dtype"], r["params"]["n"]) for r in rows})
    refs = [m for m in ("AdamW(fused)+index", "AdamW(foreach)+index") if m in methods]
    out = []
    for dtype, n in keys:
        t = {m: cells.get((dtype, n, m)) for m in methods}
        out.append([dtype, f"{n:,}", *(fmt_ms(t[m]) for m in methods),
                    *(ratio(t.get("MaskedAdamW"), t[ref]) for ref in refs)])
    lines.append(markdown_table(["dtype", "n", *methods, *(f"MaskedAdamW / {ref}" for ref in refs)], out))

    def plot(path):
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        for dtype, style in zip(sorted({k[0] for k in keys}), ["-", "--", ":"]):
            ns = [n for d, n in keys if d == dtype]
            for m in methods:
                axes[0].plot(ns, [(cells.get((dtype, n, m)) or float("nan")) * 1e3 for n in ns], style, marker="o",
                             label=f"{m} {dtype}")
            for ref in refs:
                axes[1].plot(ns, [cells[(dtype, n, "MaskedAdamW")] / cells[(dtype, n, ref)] for n in ns], style,
                             marker="o", label=f"MaskedAdamW / {ref} {dtype}")
        axes[0].set(ylabel="ms per step", yscale="log")
        axes[1].axhline(1.0, color="black", linewidth=0.8)
        axes[1].set_ylabel("time ratio (< 1: MaskedAdamW faster)")
        for ax in axes:
            ax.set(xscale="log", xlabel="n (trainable values)")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
        return fig

    return "\n".join(lines), plot


# ---------------------------------------------------------------------------------------------------- positions
def positions(rows):
    methods = list(dict.fromkeys(r["variant"] for r in rows))
    matrix = [r for r in rows if r["params"]["case"] == "matrix"]
    model = [r for r in rows if r["params"]["case"] == "model"]
    hows = sorted({r["peak_how"] for r in rows if r.get("peak_how")})
    lines = [header("Mask positions: time and peak memory", rows),
             f"Positions as int64 (rows, cols); time = {rows[0]['stat']} of the calls; peak = {'; '.join(hows)}, in a "
             f"fresh process per measurement.", ""]
    if matrix:
        shape = matrix[0]["params"]["shape"]
        cells = {(r["params"]["density"], r["variant"]): r for r in matrix}
        keys = sorted({(r["params"]["density"], r["params"]["n"]) for r in matrix})
        names = [m for m in methods if any((d, m) in cells for d, _ in keys)]
        vs_randperm = [m for m in ("randmask", "native") if m in names and "randperm" in names]
        out = []
        for d, n in keys:
            t = {m: cells[d, m].get("s") if (d, m) in cells else None for m in names}
            out.append([f"{d:g}", f"{n:,}", *(fmt_ms(t[m]) for m in names),
                        *(fmt_mib(cells[d, m].get("peak_bytes")) if (d, m) in cells else "–" for m in names),
                        *(ratio(t[m], t["randperm"], 2) for m in vs_randperm)])
        lines += [f"**One {shape} matrix** (ms / MiB)", "", markdown_table(
            ["density", "n", *(f"{m} ms" for m in names), *(f"{m} MiB" for m in names),
             *(f"{m} / randperm time" for m in vs_randperm)], out), ""]
    if model:
        p = model[0]["params"]
        ours = {r["variant"]: r for r in model}
        lines += [f"**Llama-3-8B shape, every linear matrix** ({p['matrices']} matrices, {p['entries'] / 1e9:.2f} G "
                  f"entries) at trainable ratio {p['ratio'] * 100:g}% of {p['model_params'] / 1e9:.2f} G parameters: "
                  f"n = {p['n']:,} ({p['density']:.3g} of each matrix)", "",
                  markdown_table(["method", "time s", "peak MiB", "bytes / value", "× randmask time", "how"],
                                 [[m, f"{r['s']:.3f}" if r.get("s") is not None else "–",
                                   fmt_mib(r.get("peak_bytes")),
                                   f"{r['peak_bytes'] / p['n']:.1f}" if r.get("peak_bytes") is not None else "–",
                                   ratio(r.get("s"), ours.get("randmask", {}).get("s")), r.get("how", "")]
                                  for m, r in ours.items()]), ""]
        verdict = [f"{m} {r['s']:.3f} s ({'<' if r['s'] < 1 else '≥'} 1 s), peak +{r['peak_bytes'] / 2**20:.1f} MiB "
                   f"= {r['peak_bytes'] / p['n']:.1f} B per value" for m, r in ours.items()
                   if m in ("randmask", "native") and r.get("s") is not None and r.get("peak_bytes") is not None]
        lines.append(f"Target (the whole 8B model at {p['ratio'] * 100:g}% in < 1 s, O(n) memory; positions alone "
                     f"are 16 B per value): {'; '.join(verdict) or 'randmask not measured'}.")

    def plot(path):
        import matplotlib.pyplot as plt

        panels = 3 if model else 2
        fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4.2))
        for m in methods:
            pts = sorted((r["params"]["density"], r["s"], r.get("peak_bytes") or 0) for r in matrix
                         if r["variant"] == m and r.get("s") is not None)
            if pts:
                style = dict(marker="o", linewidth=2.5 if m in ("randmask", "native") else 1.2, label=m)
                axes[0].plot([d for d, _, _ in pts], [s * 1e3 for _, s, _ in pts], **style)
                axes[1].plot([d for d, _, _ in pts], [max(b, 1024) / 2**20 for _, _, b in pts], **style)
        for ax, what in ((axes[0], "ms"), (axes[1], "peak MiB")):
            ax.set(xscale="log", yscale="log", xlabel="density", ylabel=what)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        if model:
            names = [r["variant"] for r in model]
            bars = axes[2].bar(names, [r.get("s") or 0 for r in model],
                               color=["tab:red" if m in ("randmask", "native") else "tab:gray" for m in names])
            for bar, r in zip(bars, model):
                if r.get("how") != "measured":
                    bar.set_hatch("//")
            axes[2].axhline(1.0, color="black", linewidth=0.8, linestyle="--", label="1 s target")
            axes[2].set(yscale="log", ylabel="s", title="Llama-3-8B, every matrix (hatched: extrapolated)")
            axes[2].legend(fontsize=8)
        return fig

    return "\n".join(lines), plot


# ---------------------------------------------------------------------------------------------------- overhead
def overhead(rows):
    p = rows[0]["params"]
    frozen = next((r["s"] for r in rows if r["variant"] == "frozen"), None)
    lines = [header("Host cost per call, µs", rows),
             f"One {p['layer']} layer, {p['tokens']} tokens, n = {p['n']}; {rows[0]['stat']} over "
             f"{len(rows[0]['seconds']) or p.get('rounds', '?')} rounds of {p['calls']} calls; {p['threads']} "
             f"thread(s).", ""]
    out = [[r["variant"], r["params"].get("backend") or "–", f"{r['s'] * 1e6:.1f}", ratio(r["s"], frozen)]
           for r in rows]
    lines.append(markdown_table(["case", "backend", "µs per call", "× frozen fwd+bwd"], out))

    def plot(path):
        import matplotlib.pyplot as plt

        names = [f"{r['variant']} [{r['params']['backend']}]" if r["params"].get("backend") else r["variant"]
                 for r in rows]
        fig, ax = plt.subplots(figsize=(7, 0.35 * len(names) + 1.2))
        ax.barh(names, [r["s"] * 1e6 for r in rows],
                color=["tab:red" if r["params"].get("backend") else "tab:gray" for r in rows])
        if frozen:
            ax.axvline(frozen * 1e6, color="black", linewidth=0.8, linestyle="--", label="frozen fwd+bwd")
            ax.legend(fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("µs per call (host)")
        return fig

    return "\n".join(lines), plot


# ---------------------------------------------------------------------------------------------------- e2e
SETTING_TEXT = {"qv": "randmask at trainable_ratio 0.01% of the model; LoRA/SHiRA r=8",
                "all-linear": "every method at LoRA r=8's count per matrix"}


E2E_ORDER = ["frozen", "randmask", "randmask-additive", "randmask-peft", "lora", "shira", "naive", "full"]
QUANTIZED_BASE = {"4bit": "a bitsandbytes 4-bit base (nf4, double quantization) under every linear layer but the "
                          "head: frozen is the 4-bit floor, randmask runs additive (mode auto), lora is QLoRA, shira "
                          "PEFT SHiRA on the same base",
                  "8bit": "a bitsandbytes 8-bit base (LLM.int8()) under every linear layer but the head: frozen is "
                          "the 8-bit floor, randmask runs additive (mode auto), lora is PEFT LoRA on it"}


def e2e_methods(rows, setting) -> dict:
    """{method: {"s", "rounds" ([s] in round order), "row" (the fastest round's)}} for one setting; the methods that
    do not depend on the targets (setting null) belong to every setting."""
    found = collections.OrderedDict()
    for r in rows:
        if r["params"].get("setting") not in (setting, None):
            continue
        found.setdefault(r["variant"], []).append(r)
    out = collections.OrderedDict()
    for method, group in sorted(found.items(), key=lambda item: E2E_ORDER.index(item[0]) if item[0] in E2E_ORDER
                                else len(E2E_ORDER)):
        if group[0]["params"].get("mode") == "one-process":
            out[method] = {"s": group[0]["s"], "rounds": group[0]["seconds"], "row": group[0]}
        else:  # one row per round, each a process: the fastest round's median is the least disturbed
            group = sorted(group, key=lambda r: r["params"].get("round", 0))
            fastest = min(group, key=lambda r: r["s"])
            out[method] = {"s": fastest["s"], "rounds": [r["s"] for r in group], "row": fastest}
    return out


def by_round_text(a, b) -> str:
    if not a or not b or len(a["rounds"]) != len(b["rounds"]):
        return "–"
    ratios = sorted(x / y for x, y in zip(a["rounds"], b["rounds"]))
    spread = f" ({ratios[0]:.2f}–{ratios[-1]:.2f})" if len(ratios) > 1 else ""
    return f"{statistics.median(ratios):.2f}{spread}"


def e2e(rows):
    p = rows[0]["params"]
    one = p.get("mode") == "one-process"
    settings = list(dict.fromkeys(r["params"]["setting"] for r in rows if r["params"].get("setting")))
    how = ("all methods in one process, one step of each per round in a shuffled order; step = the median step"
           if one else "each method in its own process; step = the median step of the fastest round")
    quantized = QUANTIZED_BASE.get(p.get("quantize", "none"))
    lines = [header(f"End to end: one training step, {p['shape']} shape, {p['dtype']}"
                    + (f", {p['quantize']} base" if quantized else ""), rows),
             f"Batch {p['batch']} × {p['seq']} tokens; forward + backward + optimizer step; {how}"
             + (f"; torch.compile mode {p['compile']}" if p.get("compile", "none") != "none" else "")
             + (f"; {quantized}" if quantized else "") + ".", ""]
    for setting in settings:
        methods = e2e_methods(rows, setting)
        frozen, lora = methods.get("frozen"), methods.get("lora")
        out = []
        for method, m in methods.items():
            r = m["row"]
            peak = r.get("peak_bytes")
            lora_peak = lora["row"].get("peak_bytes") if lora else None
            out.append([method, f"{r.get('trainable', 0):,}", f"{m['s'] * 1e3:.1f}",
                        ratio(m["s"], frozen and frozen["s"]), ratio(m["s"], lora and lora["s"]),
                        by_round_text(m, frozen), by_round_text(m, lora),
                        f"{peak / 2**20:.0f}" if peak else "–", ratio(peak, lora_peak),
                        f"{r['adapter_bytes'] / 1024:.0f}" if r.get("adapter_bytes") else "–"])
        lines += [f"**{setting}** ({SETTING_TEXT.get(setting, '')})", "",
                  markdown_table(["method", "trainable", "step ms", "× frozen", "× LoRA", "× frozen, by round",
                                  "× LoRA, by round", "peak MiB", "peak × LoRA", "adapter KiB"], out), ""]
        merged, additive = methods.get("randmask"), methods.get("randmask-additive")
        if merged and additive and not quantized:
            lines += [f"randmask-additive × randmask (merged): {ratio(additive['s'], merged['s'])} median step, "
                      f"{by_round_text(additive, merged)} by round (target ≤ 1.10).", ""]
        through_peft = methods.get("randmask-peft")
        if merged and through_peft:
            lines += [f"randmask-peft × randmask: {ratio(through_peft['s'], merged['s'])} median step, "
                      f"{by_round_text(through_peft, merged)} by round, peak "
                      f"{ratio(through_peft['row'].get('peak_bytes'), merged['row'].get('peak_bytes'))}.", ""]
    lines.append("By round: the median over rounds of two methods' ratio within a round (they ran "
                 + ("seconds apart in one process" if one else "minutes apart") + "), with its range.")

    def plot(path):
        import matplotlib.pyplot as plt

        peaks = any(r.get("peak_bytes") for r in rows)  # per-process runs: a second row, peak memory
        fig, axes = plt.subplots(1 + peaks, len(settings), figsize=(6 * len(settings), 4 * (1 + peaks)),
                                 squeeze=False)
        for column, setting in enumerate(settings):
            methods = e2e_methods(rows, setting)
            names = list(methods)
            colors = ["tab:red" if m.startswith("randmask") else "tab:gray" for m in names]
            floor = methods.get("frozen", {}).get("s")
            ax = axes[0][column]
            ax.bar(names, [methods[m]["s"] / floor if floor else methods[m]["s"] for m in names], color=colors)
            ax.axhline(1.0, color="black", linewidth=0.8)
            ax.set_title(f"{setting}: step time / frozen floor")
            ax.tick_params(axis="x", rotation=30)
            if peaks:
                ax = axes[1][column]
                ax.bar(names, [(methods[m]["row"].get("peak_bytes") or 0) / 2**20 for m in names], color=colors)
                ax.set_title(f"{setting}: peak memory, MiB")
                ax.tick_params(axis="x", rotation=30)
        return fig

    return "\n".join(lines), plot


# ---------------------------------------------------------------------------------------------------- distributed
def distributed(rows):
    p = rows[0]["params"]
    single = next((r for r in rows if r["variant"] == "single"), None)
    out = []
    for r in rows:
        out.append([str(r["params"]["ranks"]), r["variant"], f"{r['s'] * 1e3:.1f}",
                    ratio(r["s"], single and single["s"]),
                    f"{r['peak_bytes'] / 2**20:.0f}", ratio(r["peak_bytes"], single and single["peak_bytes"]),
                    f"{r['base_bytes'] / 2**20:.0f}", ratio(r["base_bytes"], single and single["base_bytes"])])
    lines = [header(f"Several processes: one training step, {p['shape']} shape, {p['dtype']}", rows),
             f"Global batch {p['batch']} × {p['seq']} tokens split across the ranks; randmask q,v at 0.01%, "
             "MaskedAdamW; step = the slowest rank's median step; peak = the largest rank's (on the CPU its peak "
             "RSS, which includes the whole model it builds before sharding); base held = the frozen bytes a rank "
             "keeps after sharding.", "",
             markdown_table(["ranks", "mode", "step ms", "× one process", "peak MiB", "× one process",
                             "base held MiB", "× one process"], out)]
    return "\n".join(lines), None


# ---------------------------------------------------------------------------------------------------- fits
def fits(rows):
    """bench_e2e.py --fits: per shape tried (largest first), randmask's and QLoRA's q,v step, or out of memory."""
    p = rows[0]["params"]
    shapes = list(dict.fromkeys(r["params"]["shape"] for r in rows))
    cells = {(r["params"]["shape"], r["variant"]): r for r in rows}
    out = []
    for shape in shapes:
        rm, lora = cells.get((shape, "randmask")), cells.get((shape, "lora"))

        def peak(r):
            return r.get("peak_bytes") if r and not r.get("oom") else None

        def cell(r, what):
            if r is None:
                return "not run"
            if r.get("oom"):
                return "out of memory"
            return f"{r['s'] * 1e3:.1f}" if what == "s" else fmt_mib(peak(r))

        size = rm["params"]["parameters"] if rm else None
        out.append([shape, "–" if size is None else f"{size / 1e9:.1f} G" if size >= 1e8 else f"{size:,}",
                    cell(rm, "s"), cell(lora, "s"), cell(rm, "peak"), cell(lora, "peak"), ratio(peak(rm), peak(lora))])
    fitting = [shape for shape in shapes if (shape, "randmask") in cells and not cells[shape, "randmask"].get("oom")]
    lines = [header(f"The largest Llama shape whose q,v randmask step fits, {p['quantize']} base, {p['dtype']}", rows),
             f"Batch {p['batch']} × {p['seq']} tokens, forward + backward + optimizer step; shapes tried largest "
             "first, each method in its own process; randmask at trainable_ratio 0.01% of the model (additive on the "
             "quantized base), QLoRA = PEFT LoRA r=8 on the same base; peak: the GPU's peak allocated memory (on a "
             "CPU the process's peak resident set).", "",
             markdown_table(["shape", "parameters", "randmask step ms", "QLoRA step ms", "randmask peak MiB",
                             "QLoRA peak MiB", "peak × QLoRA"], out), "",
             f"Largest that fits: {fitting[0] if fitting else 'none tried'}."]

    def plot(path):
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(1.6 * len(shapes) + 3, 4))
        for offset, method, color in ((-0.2, "randmask", "tab:red"), (0.2, "lora", "tab:gray")):
            peaks = [(cells.get((shape, method)) or {}).get("peak_bytes") or 0 for shape in shapes]
            bars = ax.bar([i + offset for i in range(len(shapes))], [b / 2**30 for b in peaks], 0.4, color=color,
                          label="QLoRA" if method == "lora" else method)
            for bar, shape in zip(bars, shapes):
                if (cells.get((shape, method)) or {}).get("oom"):
                    bar.set_hatch("//")
        ax.set_xticks(range(len(shapes)), shapes)
        ax.set(ylabel="peak GiB", title="q,v step on one device (hatched: out of memory at that peak)")
        ax.legend(fontsize=8)
        return fig

    return "\n".join(lines), plot


# ---------------------------------------------------------------------------------------------------- any other
def generic(rows):
    """A pivot: one line per distinct params, a column per variant (ms, its statistic), for benches without their
    own layout."""
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    keys = list(dict.fromkeys(k for r in rows for k in r["params"]))
    varying = [k for k in keys if len({repr(r["params"].get(k)) for r in rows}) > 1]
    fixed = {k: rows[0]["params"].get(k) for k in keys if k not in varying}
    cells, order = {}, []
    for r in rows:
        key = tuple(repr(r["params"].get(k)) for k in varying)
        if key not in cells:
            order.append((key, [r["params"].get(k) for k in varying]))
            cells[key] = {}
        cells[key][r["variant"]] = r.get("s")
    out = [[*("–" if v is None else str(v) for v in shown), *(fmt_ms(cells[key].get(v)) for v in variants)]
           for key, shown in order]
    lines = [header(f"{rows[0]['bench']}, ms ({rows[0]['stat']})", rows),
             ("Fixed: " + ", ".join(f"{k} {v}" for k, v in fixed.items()) + ".\n") if fixed else "",
             markdown_table([*varying, *variants], out)]
    return "\n".join(lines), None


RENDERERS = {"masked_grad": masked_grad, "update": update, "positions": positions, "overhead": overhead,
             "e2e": e2e, "fits": fits, "distributed": distributed}


def write_reports(rows, out_dir, with_run=False, plots=True) -> list:
    """Render every run among `rows` into out_dir: <stem>.md and, with matplotlib (and `plots`), <stem>.png.
    Returns the paths written."""
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for group in by_run(rows).values():
        name = stem(group[0], with_run)
        text, plot = RENDERERS.get(group[0]["bench"], generic)(group)
        md = out_dir / f"{name}.md"
        md.write_text(text.rstrip() + "\n")
        written.append(md)
        if plot is not None and plots:
            try:
                import matplotlib

                matplotlib.use("Agg")
                import matplotlib.pyplot as plt
            except ImportError:
                continue
            fig = plot(out_dir / f"{name}.png")
            first = group[0]
            fig.suptitle("\n".join(textwrap.wrap(f"{first['bench']} {first.get('table', '')}, {first['machine']}, "
                                                 f"{first['date'][:10]}, commit {first['commit']}", 110)), fontsize=8)
            fig.tight_layout()
            fig.savefig(out_dir / f"{name}.png", dpi=110)
            plt.close(fig)
            written.append(out_dir / f"{name}.png")
    return written


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", metavar="PATH", default=None, help="the dataset (default: as the benches)")
    parser.add_argument("--out", metavar="DIR", default=None, help="where to write (default: beside the dataset)")
    parser.add_argument("--run", action="append", default=[], metavar="ID", help="render this run (repeatable)")
    parser.add_argument("--list", action="store_true", help="list the runs and exit")
    parser.add_argument("--add", metavar="PATH", action="append", default=[],
                        help="append the rows of another dataset whose runs this one lacks, then report")
    args = parser.parse_args()
    path = dataset_path(args.results)
    rows = read_rows(path)
    for other in args.add:
        known = {r["run"] for r in rows}
        new = [r for r in read_rows(other) if r["run"] not in known]
        append_rows(new, path)
        rows += new
        print(f"added {len(new)} rows ({len(by_run(new))} runs) from {other}")
    runs = by_run(rows)
    if args.list:
        current = set(latest_runs(rows))
        for run, group in sorted(runs.items(), key=lambda item: item[1][0]["date"]):
            first = group[0]
            print(f"{'*' if run in current else ' '} {run}  {first['bench']:<12} {first.get('table', ''):<22} "
                  f"{first['machine']:<28} {first['commit']:<14} {len(group):4d} rows  {first['command'][:60]}")
        return
    chosen = args.run or latest_runs(rows)
    missing = [run for run in chosen if run not in runs]
    if missing:
        parser.error(f"no such run in {path}: {', '.join(missing)}")
    out = pathlib.Path(args.out) if args.out else path.parent
    for p in write_reports([r for run in chosen for r in runs[run]], out, with_run=bool(args.run)):
        try:
            shown = p.resolve().relative_to(ROOT)
        except ValueError:
            shown = p
        print(f"wrote {shown}")


if __name__ == "__main__":
    main()
