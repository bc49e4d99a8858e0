"""The pure helpers of benchmarks/study_finetune.py on synthetic numbers (no model, no training)."""
import importlib.util
import json
import math
import pathlib

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "study_finetune.py"


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
