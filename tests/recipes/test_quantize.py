"""Quantized bases in the recipes (randmask/recipes/models.py): quantize_linears (every nn.Linear but the head into a
bitsandbytes Linear4bit / Linear8bitLt), the BitsAndBytesConfig loading route of load_model, and `randmask finetune
--quantize` on a tiny config-built Llama: randmask (additive on the quantized base) and lora (QLoRA)."""
import copy
import json
import sys

import bitsandbytes as bnb  # the [quant] extra: the test setup installs it
import pytest
import torch
from tiny_task import QUANT_WIDTH, run_cli, tiny_model, tiny_tokenizer

import randmask
from randmask.recipes import data as D
from randmask.recipes import train as T
from randmask.recipes.data import MissingPackageError
from randmask.recipes.models import describe_base, load_model, quantize_linears

VARIANTS = [(4, "nf4", True), (4, "nf4", False), (4, "fp4", True), (4, "fp4", False), (8, None, None)]


def _kwargs(bits, quant_type, double_quant):
    return dict(quant_type=quant_type, double_quant=double_quant) if bits == 4 else {}


def _dequantized(layer) -> torch.Tensor:
    if isinstance(layer, bnb.nn.Linear4bit):
        return bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    scales = layer.weight.SCB if layer.weight.SCB is not None else layer.state.SCB
    return bnb.functional.int8_vectorwise_dequant(layer.weight.data, scales)


def _linears(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


@pytest.mark.parametrize("bits,quant_type,double_quant", VARIANTS)
def test_quantize_linears_replaces_every_linear_but_the_head(bits, quant_type, double_quant):
    model = tiny_model(64, **QUANT_WIDTH)
    dense = copy.deepcopy(model)
    assert quantize_linears(model, bits, **_kwargs(bits, quant_type, double_quant)) is model
    layers = _linears(model)
    assert type(layers.pop("lm_head")) is torch.nn.Linear and torch.equal(model.lm_head.weight, dense.lm_head.weight)
    assert len(layers) == 14  # 2 layers x (q, k, v, o, gate, up, down)
    for name, layer in layers.items():
        original = dense.get_submodule(name)
        assert (layer.in_features, layer.out_features) == (original.in_features, original.out_features)
        assert not layer.weight.requires_grad
        if bits == 4:
            assert isinstance(layer, bnb.nn.Linear4bit) and type(layer.weight).__name__ == "Params4bit"
            assert layer.weight.dtype == torch.uint8 and layer.weight.numel() * 2 == original.weight.numel()
            assert layer.weight.quant_type == quant_type and layer.weight.quant_state.nested == double_quant
            assert layer.compute_dtype == torch.float32 and layer.weight.quant_state.dtype == torch.float32
        else:
            assert isinstance(layer, bnb.nn.Linear8bitLt) and type(layer.weight).__name__ == "Int8Params"
            assert layer.weight.dtype == torch.int8 and not layer.weight.has_fp16_weights
        # the quantized values are the original's, to the format's precision
        error = (_dequantized(layer) - original.weight).norm() / original.weight.norm()
        assert error < (0.15 if bits == 4 else 0.01), name  # nf4 ~0.09, fp4 ~0.12 on normal weights
    assert getattr(model, f"is_loaded_in_{bits}bit") is True
    assert randmask.count_parameters(model) == sum(p.numel() for p in dense.parameters())
    assert describe_base(model)["quantize"] == f"{bits}bit" and describe_base(dense)["quantize"] == "none"


@pytest.mark.parametrize("bits,quant_type,double_quant", VARIANTS)
def test_quantized_model_computes_with_the_dequantized_weights(bits, quant_type, double_quant):
    """Its logits are those of the dense model holding dequant(W) (up to fp32 rounding, and for 8-bit the int8
    rounding of the activations), and close to the original model's."""
    model = tiny_model(64, **QUANT_WIDTH).eval()
    quantized = quantize_linears(copy.deepcopy(model), bits, **_kwargs(bits, quant_type, double_quant)).train()
    reference = copy.deepcopy(model).train()
    with torch.no_grad():
        for name, layer in _linears(quantized).items():
            if name != "lm_head":
                reference.get_submodule(name).weight.copy_(_dequantized(layer))
    ids = torch.randint(0, 64, (2, 12))
    out = quantized(ids).logits  # training mode: the dequantizing path that fine-tuning runs
    torch.testing.assert_close(out, reference(ids).logits, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        original = model(ids).logits
    cosine = torch.nn.functional.cosine_similarity(out.flatten(), original.flatten(), dim=0)
    assert cosine > (0.97 if bits == 4 else 0.999)


def test_quantize_linears_keeps_biases_and_honours_skip():
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16, bias=False))
    bias = model[0].bias.detach().clone()
    quantize_linears(model, 4, skip=("2",))
    assert isinstance(model[0], bnb.nn.Linear4bit) and torch.equal(model[0].bias, bias)
    assert not model[0].bias.requires_grad and type(model[2]) is torch.nn.Linear
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        quantize_linears(model, 3)


def test_a_model_built_on_meta_is_quantized_one_layer_at_a_time():
    """The way the benchmarks build shapes that never fit densely: every Linear materialized, filled and quantized."""
    with torch.device("meta"):
        model = tiny_model(64, **QUANT_WIDTH)
    filled = []

    def init(weight):
        filled.append(weight.shape)
        weight.normal_(0, 0.02)

    quantize_linears(model, 4, device="cpu", init=init)
    assert len(filled) == 14
    for name, layer in _linears(model).items():
        if name != "lm_head":
            assert layer.weight.device.type == "cpu" and layer.weight.bnb_quantized
    assert model.lm_head.weight.device.type == "meta"  # the rest is the caller's to materialize
    with torch.device("meta"):
        model = tiny_model(64, **QUANT_WIDTH)
    with pytest.raises(ValueError, match="meta device needs device= and init="):
        quantize_linears(model, 4)


def test_evaluation_does_not_repack_the_4bit_storage():
    """bitsandbytes would repack a Linear4bit for its CPU inference kernel on the first eval-mode call without
    gradients (on CPUs with AVX512-BF16): the storage would change and training would fail afterwards."""
    model = quantize_linears(tiny_model(64, **QUANT_WIDTH), 4)
    layer = model.model.layers[0].self_attn.q_proj
    packed, absmax = layer.weight.data.clone(), layer.weight.quant_state.absmax.clone()
    ids = torch.randint(0, 64, (2, 8))
    model.eval()
    with torch.no_grad():
        model(ids)
    assert torch.equal(layer.weight.data, packed) and torch.equal(layer.weight.quant_state.absmax, absmax)
    model.train()
    model.enable_input_require_grads()
    model(ids).logits.sum().backward()


@pytest.mark.parametrize("quantize", ["4bit", "8bit"])
def test_load_model_with_bitsandbytes_config_stores_what_quantize_linears_stores(quant_model_dir, quantize):
    loaded, _ = load_model(str(quant_model_dir), "float32", "cpu", quantize)
    dense, _ = load_model(str(quant_model_dir), "float32", "cpu")
    replaced = quantize_linears(dense, int(quantize[0]))
    for name, layer in _linears(loaded).items():
        other = replaced.get_submodule(name)
        assert type(layer) is type(other), name
        if name != "lm_head":
            assert torch.equal(layer.weight.data, other.weight.data) and not layer.weight.requires_grad
    assert describe_base(loaded)["kind"] == ("nf4 double-quantized" if quantize == "4bit" else "int8 (LLM.int8())")


def test_missing_bitsandbytes_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as if not installed
    with pytest.raises(MissingPackageError, match=r"pip install randmask\[quant\]"):
        quantize_linears(tiny_model(64, **QUANT_WIDTH), 4)


# ---------------------------------------------------------------------------------------------------- the CLI
def _dense_count() -> int:
    return sum(p.numel() for p in tiny_model(len(tiny_tokenizer()), **QUANT_WIDTH).parameters())


def test_help_explains_quantize(capsys):
    code, out, _ = run_cli(capsys, "finetune", "--help")
    assert code == 0 and "--quantize {none,4bit,8bit}" in out and "QLoRA" in out and "randmask[quant]" in out


def test_quantized_base_refuses_full_fine_tuning(capsys, model_dir, csv_file):
    code, _, err = run_cli(capsys, "finetune", "--model", str(model_dir), "--data", str(csv_file), "--method",
                           "full", "--quantize", "4bit")
    assert code == 2 and "--quantize 4bit base cannot hold" in err


def test_finetune_on_a_4bit_base_randmask_and_qlora(capsys, tmp_path, quant_model_dir, csv_file):
    out_dir = tmp_path / "run"
    code, _, err = run_cli(capsys, "finetune", "--model", str(quant_model_dir), "--data", str(csv_file), "--split",
                           "60,20,40", "--max-train", "32", "--epochs", "2", "--density", "0.25", "--method",
                           "randmask,lora", "--quantize", "4bit", "--dtype", "float32", "--threads", "1",
                           "--output-dir", str(out_dir), "--no-progress")
    assert code == 0, err
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics["settings"]["quantize"] == "4bit"
    assert metrics["base"]["quantize"] == "4bit" and metrics["base"]["kind"] == "nf4 double-quantized"
    rm, lora = metrics["methods"]["randmask"], metrics["methods"]["lora"]
    assert rm["config"]["mode"] == "auto" and rm["total_params"] == lora["total_params"] == _dense_count()
    # q (64x64) and v (32x64) of both layers, counted on the unpacked 4-bit matrices: 2 * 0.25 * (4096 + 2048)
    assert rm["trainable"] == 3072
    for r in (rm, lora):
        assert r["steps"] == 8 and all(torch.isfinite(torch.tensor(r["train_loss"])))
    assert (out_dir / "lora_adapter" / "adapter_config.json").exists()

    # The usual randmask adapter: loaded onto a fresh 4-bit base it runs additive and reproduces the test accuracy.
    model, tok = load_model(str(quant_model_dir), "float32", "cpu", "4bit")
    randmask.load_adapter(model, out_dir / "randmask_adapter.safetensors")
    assert {layer.mode for _, layer in randmask.masked_layers(model)} == {"additive"}
    _, _, test = D.split(D.load_file(csv_file, "text", "label"), 0, (60, 20, 40))
    items = D.encode(tok, D.Template(), test, 64)
    assert T.evaluate(model, items, 32, 0)["accuracy"] == pytest.approx(rm["test_accuracy"])


def test_qlora_uses_peft_bitsandbytes_layers(quant_model_dir):
    model, _ = load_model(str(quant_model_dir), "float32", "cpu", "4bit")
    from randmask.recipes import finetune as F

    model, params, info = T.apply_method(model, "lora", F.Settings(methods=("lora",)), log=lambda *_: None)
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, LoraLinear4bit) and info["total_params"] == _dense_count()
    assert all(p.dtype == torch.float32 for p in params)
