"""studies/study_finetune.py: its pure helpers on synthetic numbers (no model, no training), and one grid entry of
each kind run through the recipe's own functions on a tiny model and data set."""
import argparse
import importlib.util
import json
import math
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "studies" / "study_finetune.py"


@pytest.fixture(scope="module")
def sf():
    spec = importlib.util.spec_from_file_location("study_finetune", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(sf, ratio, lr, dev, test, dev_loss=0.5, status="ok", method="randmask", targets=None, trainable=None):
    targets = list(sf.QV) if targets is None else targets
    config = sf.config_key(method, targets, ratio)
    return {"id": sf.run_id(method, targets, ratio, lr), "config": config, "method": method, "targets": targets,
            "ratio": ratio, "lr": lr, "lr_factor": round(lr / sf.rule_lr(ratio), 6) if ratio else None,
            "status": status, "best_dev_accuracy": dev if status == "ok" else None,
            "test_accuracy": test if status == "ok" else None, "best_epoch": 2,
            "history": [{"epoch": 1, "dev_accuracy": dev, "dev_loss": dev_loss + 0.1},
                        {"epoch": 2, "dev_accuracy": dev, "dev_loss": dev_loss}],
            "trainable": trainable or int(134_515_008 * (ratio or 1)),
            "trainable_ratio": (trainable or int(134_515_008 * (ratio or 1))) / 134_515_008}


def test_rule_and_grid_order(sf):
    assert sf.rule_lr(1e-4) == pytest.approx(1e-2)
    grid = sf.build_grid([1e-5, 1e-4], [0.3, 1, 3], 1e-3, [1e-4, 3e-4, 1e-3], [1e-5, 3e-5])
    assert len(grid) == 3 + 3 + 3 + 3 + 2
    first = grid[:5]  # the middle LR of every configuration comes first
    assert [g["config"] for g in first] == ["randmask-qv-1e-05", "randmask-qv-0.0001", "randmask-all-0.001",
                                            "lora-qv", "full"]
    assert first[0]["lr"] == pytest.approx(0.1) and first[1]["lr"] == pytest.approx(0.01)
    assert first[2]["targets"] == list(sf.ALL_LINEAR)
    assert first[3]["lr"] == pytest.approx(3e-4) and first[4]["lr"] == pytest.approx(1e-5)
    lrs = sorted(g["lr"] for g in grid if g["config"] == "randmask-qv-1e-05")
    assert lrs == pytest.approx([0.03, 0.1, 0.3])  # not clamped at 1e-1
    assert len({g["id"] for g in grid}) == len(grid)


def test_pick_best_on_dev_not_test(sf):
    runs = [_run(sf, 1e-4, 3e-3, dev=0.80, test=0.95), _run(sf, 1e-4, 1e-2, dev=0.85, test=0.70),
            _run(sf, 1e-4, 3e-2, dev=None, test=None, status="diverged")]
    best = sf.pick_best(runs)
    assert best["lr"] == 1e-2 and best["test_accuracy"] == 0.70
    # ties on dev accuracy: lower dev loss wins, then the lower LR
    tie = [_run(sf, 1e-4, 3e-3, 0.8, 0.1, dev_loss=0.4), _run(sf, 1e-4, 1e-2, 0.8, 0.2, dev_loss=0.3)]
    assert sf.pick_best(tie)["lr"] == 1e-2
    tie = [_run(sf, 1e-4, 1e-2, 0.8, 0.1), _run(sf, 1e-4, 3e-3, 0.8, 0.2)]
    assert sf.pick_best(tie)["lr"] == 3e-3
    assert sf.pick_best([_run(sf, 1e-4, 1e-2, None, None, status="diverged")]) is None


def test_best_per_config_marks_grid_edges(sf):
    runs = [_run(sf, 1e-5, lr, dev, 0.5) for lr, dev in ((0.03, 0.9), (0.1, 0.8), (0.3, 0.7))]
    runs += [_run(sf, 1e-3, lr, dev, 0.5) for lr, dev in ((3e-4, 0.7), (1e-3, 0.9), (3e-3, 0.8))]
    best = sf.best_per_config(runs)
    assert best["randmask-qv-1e-05"]["edge"] == "low" and best["randmask-qv-1e-05"]["best"]["lr"] == 0.03
    assert best["randmask-qv-0.001"]["edge"] is None and best["randmask-qv-0.001"]["tried"] == 3


def test_loglog_slope(sf):
    assert sf.loglog_slope([1e-5, 1e-4, 1e-3], [1e-1, 1e-2, 1e-3]) == pytest.approx(-1.0)
    assert sf.loglog_slope([1e-5, 1e-3], [0.03, 3e-3]) == pytest.approx(-0.5)
    assert sf.loglog_slope([1e-4, 1e-4], [1.0, 2.0]) is None
    assert sf.loglog_slope([1e-4], [1.0]) is None


def test_markdown_from_synthetic_results(sf, tmp_path):
    runs = [_run(sf, r, sf.rule_lr(r) * f, 0.8 + 0.01 * f, 0.7 + 0.01 * f) for r in (1e-5, 1e-4, 1e-3)
            for f in (0.3, 1.0)]
    runs.append(_run(sf, None, 3e-4, 0.9, 0.88, method="lora", trainable=460_800))
    for r in runs:
        if r["method"] == "randmask":
            r["delta_norm"] = 1 / math.sqrt(r["ratio"])
    data = {"meta": {"sizes": {"train": 250, "dev": 500, "test": 1000}, "epochs": 2, "seed": 0},
            "zero_shot": {"test_accuracy": 0.323, "n": 1000, "dtype": "bfloat16"}, "runs": runs,
            "flatness": [{"ratio": r, "trainable": int(1.3e8 * r), "batch": 16, "iters_max": 10, "tol": 0.01,
                          "init": {"lambda": 10 * r, "iterations": 5}} for r in (1e-5, 1e-4, 1e-3)]}
    text = sf.markdown(json.loads(json.dumps(data)))
    assert "| zero-shot |" in text and "32.3" in text
    assert "LoRA r=8 q,v" in text and "88.0" in text
    # every q,v ratio's best is the 1x LR (higher dev), so the slope is exactly the rule's -1
    assert "slope of best LR against trainable ratio: -1.00" in text
    assert "|λ| against ratio: +1.00 at init" in text
    assert "LARGEST one tried" in text and "| 1× |" in text  # all bests at the grid's high end; the grid table


# ---------------------------------------------------------------------------------------------------- on a tiny model
def _tiny_task():
    spec = importlib.util.spec_from_file_location("tiny_task", ROOT / "tests" / "recipes" / "tiny_task.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.full
def test_runs_go_through_the_recipe(sf, tmp_path):
    """The study prepares the task with randmask.recipes.finetune.prepare_task and trains with train_one: the
    zero-shot record, a randmask run (with its ||delta||), a diverging LR, LoRA, and the flatness at init and at the
    trained deltas, on a tiny config-built Llama and a generated CSV."""
    from randmask.recipes.finetune import Settings, prepare_task

    tiny = _tiny_task()
    model_dir = tiny.save_tiny_model_dir(tmp_path / "model")
    csv = tiny.write_csv(tmp_path / "reviews.csv")
    log = []
    ctx = prepare_task(Settings(model=str(model_dir), data=str(csv), split=(40, 16, 16), epochs=2, batch_size=8,
                                threads=1, progress=False), log.append)
    zero = sf.run_zero_shot(ctx, ctx.governor, log.append)
    assert zero["n"] == 16 and 0 <= zero["test_accuracy"] <= 1 and zero["dtype"] == ctx.settings.dtype
    assert ctx.model is None  # released: every run loads its own
    args = argparse.Namespace(work_dir=str(tmp_path / "work"), keep_checkpoints=False, hessian_batch=4,
                              hessian_iters=3, hessian_tol=1e-2)
    grid = {g["id"]: g for g in sf.build_grid([1e-2], [1.0, 1e42], 0, [1e-3], [])}  # lr 1e38: Adam's first
    # step moves every delta by ~1e38, so the next forward overflows and the loss turns NaN
    records = {i: sf.train_run(item, ctx, args, ctx.governor, log.append) for i, item in grid.items()}
    ok, diverged, lora = records["randmask-qv-0.01-lr0.0001"], records["randmask-qv-0.01-lr1e+38"], \
        records["lora-qv-lr0.001"]
    assert ok["status"] == "ok" and ok["steps"] == 10 and ok["delta_norm"] > 0 and ok["best_epoch"] in (1, 2)
    assert ok["adapter"] == "randmask_adapter.safetensors" and 0 < ok["trainable_ratio"] < 0.02
    assert diverged["status"] == "diverged" and "lower the learning rate" in diverged["error"]
    assert lora["status"] == "ok" and lora["trainable"] > 0 and "delta_norm" not in lora
    flat = sf.hessian_for(1e-2, ok, ctx, args, log.append, ["trained", "init"])
    assert flat["trainable"] == ok["trainable"] and flat["trained_lr"] == ok["lr"]
    assert flat["trained_delta_norm"] == pytest.approx(ok["delta_norm"], rel=1e-6)
    assert all(1 <= flat[p]["iterations"] <= 3 and math.isfinite(flat[p]["lambda"]) for p in ("init", "trained"))
