"""The quick start in docs/quickstart.md and the README runs as written."""
import pathlib
import re

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
