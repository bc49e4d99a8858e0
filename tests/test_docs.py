"""The quick start in docs/quickstart.md and the README runs as written."""
import json
import pathlib
import re

import pytest
import torch

ROOT = pathlib.Path(__file__).parent.parent


def first_python_block(path):
    return re.search(r"```python\n(.*?)```", path.read_text(), re.S).group(1)


def test_quickstart_runs_as_written(tmp_path, monkeypatch):
    from test_model import lm_loss, tiny_llama, tokens

    monkeypatch.chdir(tmp_path)
    code = first_python_block(ROOT / "docs" / "quickstart.md")
    assert code == first_python_block(ROOT / "README.md")
    training = "for _ in range(5):\n    optimizer.zero_grad(); lm_loss(model, batch).backward(); optimizer.step()\n"
    code = code.replace("# ... train as usual", training + "# ... train as usual")
    trained_logits = {}
    code = code.replace("model = randmask.merge(",
                        "trained_logits['x'] = model(batch).logits.detach()\nmodel = randmask.merge(")
    namespace = {"model": tiny_llama(), "fresh_base_model": tiny_llama(), "lm_loss": lm_loss, "batch": tokens(3),
                 "trained_logits": trained_logits}
    exec(compile(code, "quickstart", "exec"), namespace)
    with torch.no_grad():
        merged = namespace["model"](namespace["batch"]).logits
    assert (tmp_path / "adapter.safetensors").exists()
    assert not any(type(m).__name__ == "MaskedLinear" for m in namespace["model"].modules())
    assert torch.equal(merged, trained_logits["x"])


def test_the_readme_4bit_example_runs_as_written(tmp_path):
    from test_quantized import tiny_llama

    import randmask

    code = next(block for block in re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
                if "load_in_4bit" in block)
    tiny_llama().save_pretrained(tmp_path)
    namespace = {"path": tmp_path, "randmask": randmask, "torch": torch}
    exec(compile(code, "readme-4bit", "exec"), namespace)
    attention = namespace["merged"].model.layers[0].self_attn  # q_proj, v_proj masked (additive), then merged
    assert type(attention.q_proj) is torch.nn.Linear and attention.q_proj.weight.dtype == torch.bfloat16
    assert type(attention.k_proj).__name__ == "Linear4bit"


def python_block_with(path, marker):
    return next(block for block in re.findall(r"```python\n(.*?)```", path.read_text(), re.S) if marker in block)


def test_the_peft_example_runs_as_written_in_the_readme_and_docs(tmp_path, monkeypatch):
    from test_model import lm_loss, tiny_llama, tokens

    code = python_block_with(ROOT / "README.md", "get_peft_model")
    assert code == python_block_with(ROOT / "docs" / "peft.md", "get_peft_model")
    monkeypatch.chdir(tmp_path)
    trained = tiny_llama()
    namespace = {"model": trained, "fresh_base_model": tiny_llama()}
    first, last = code.rsplit("model.save_pretrained", 1)
    exec(compile(first, "readme-peft", "exec"), namespace)
    optimizer = torch.optim.AdamW([p for p in namespace["model"].parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        optimizer.zero_grad()
        lm_loss(namespace["model"], tokens(3)).backward()
        optimizer.step()
    with torch.no_grad():
        expected = namespace["model"](tokens(3)).logits
    exec(compile("model.save_pretrained" + last, "readme-peft", "exec"), namespace)
    with torch.no_grad():
        assert torch.equal(namespace["model"](tokens(3)).logits, expected)
    assert (tmp_path / "adapter" / "adapter_config.json").exists()


@pytest.mark.full
def test_the_trl_example_in_the_peft_doc_runs_as_written(tmp_path, monkeypatch):
    pytest.importorskip("trl")
    from datasets import Dataset
    from peft import PeftModel
    from test_peft import TOKENS, base_model, logits
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    monkeypatch.chdir(tmp_path)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(
        {f"t{i}": i for i in range(64)}, unk_token="t0")), pad_token="t0", eos_token="t1")
    namespace = {"model": base_model("llama"), "tokenizer": tokenizer,
                 "dataset": Dataset.from_list([{"input_ids": TOKENS[i % 2].tolist()} for i in range(8)])}
    code = python_block_with(ROOT / "docs" / "peft.md", "SFTTrainer")
    code = code.replace("SFTConfig(", "SFTConfig(use_cpu=True, bf16=False, report_to=[], ")  # CI has no GPU
    exec(compile(code, "peft-doc-trl", "exec"), namespace)
    trained = namespace["trainer"].model
    loaded = PeftModel.from_pretrained(base_model("llama"), tmp_path / "out" / "adapter")
    assert torch.equal(logits(loaded), logits(trained.eval()))
    assert not torch.equal(logits(loaded), logits(base_model("llama")))


def test_the_readme_own_task_commands_run_as_written(tmp_path, monkeypatch, capsys):
    """The README's two `randmask finetune` examples, on generated files of the shapes they name and a tiny model
    (the options that size the run are appended)."""
    import gzip
    import shlex
    import sys

    sys.path.insert(0, str(ROOT / "tests" / "recipes"))
    from tiny_task import run_cli, save_tiny_model_dir, write_csv, write_sft_jsonl

    block = next(b for b in re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
                 if "--verbalizers" in b)
    lines = [line.split("#")[0].rstrip() for line in block.replace("\\\n", " ").splitlines()]
    commands = [shlex.split(line) for line in lines if line.strip()]
    assert [c[:4] for c in commands] == [["python", "-m", "randmask", "finetune"]] * 2
    monkeypatch.chdir(tmp_path)
    model_dir = save_tiny_model_dir(tmp_path / "model")
    rows = write_csv(tmp_path / "plain.csv", n=80, labels=("ham", "spam")).read_text().splitlines()[1:]
    (tmp_path / "spam.csv.gz").write_bytes(gzip.compress(("message,category\n" + "\n".join(rows) + "\n").encode()))
    write_sft_jsonl(tmp_path / "qa.jsonl", n=80)
    for i, command in enumerate(commands):
        code, out, err = run_cli(capsys, *command[3:], "--model", str(model_dir), "--split", "40,16,16", "--epochs",
                                 "1", "--density", "0.25", "--dtype", "float32", "--threads", "1", "--no-progress",
                                 "--output-dir", f"run{i}")
        assert code == 0, err
        metrics = json.loads((tmp_path / f"run{i}" / "metrics.json").read_text())
        assert set(metrics["methods"]) == {"randmask", "lora"}
        if metrics["task"] == "classify":
            assert metrics["verbalizers"] == {"spam": "yes", "ham": "no"} and "' yes'" in out
        else:
            assert metrics["methods"]["randmask"]["test_loss"] < metrics["zero_shot"]["test_loss"]
    assert [json.loads((tmp_path / f"run{i}" / "metrics.json").read_text())["task"] for i in (0, 1)] == [
        "classify", "sft"]
