"""randmask as a PEFT method, checked as PEFT checks the methods it ships (tests/testing_common.py of PEFT): tiny
config-built Llama, OPT and GPT-2 (Conv1D) models; the reference for every output is randmask's own short path
(randmask.apply with the same config and deltas) or the untouched base model."""
import json
import os

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

import randmask
import randmask.peft
from randmask.adapter import AdapterError
from randmask.peft import RandMaskLayer, RandMaskPeftConfig
from tests.test_adapter import TOKENS, base_model

pytestmark = pytest.mark.usefixtures("torch_backend")

CONFIGS = {
    "llama": dict(density=0.05, target_modules="all-linear", seed=7),
    "opt": dict(trainable_ratio=0.01, target_modules=["q_proj", "v_proj", "fc1"], seed=3),
    "gpt2": dict(density=0.1, target_modules=["c_attn", "c_fc"], seed=11),
}
ARCHS = list(CONFIGS)


def logits(model, tokens=TOKENS):
    with torch.no_grad():
        return model(input_ids=tokens).logits


def train(model, steps=3, lr=1e-2, tokens=TOKENS):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        model(input_ids=tokens, labels=tokens).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_state_equal(model, before):
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)


def reference(arch, deltas, **config):
    """randmask.apply on a fresh base with `config`, its deltas set to `deltas` (name -> tensor)."""
    model = randmask.apply(base_model(arch), randmask.RandMaskConfig(**config))
    with torch.no_grad():
        for name, layer in randmask.masked_layers(model):
            layer.delta.copy_(deltas[name])
    return model


def deltas_of(peft_model, adapter="default"):
    return {name: layer.randmask_delta[adapter].detach().clone()
            for name, layer in peft_model.base_model.model.named_modules() if isinstance(layer, RandMaskLayer)
            and adapter in layer.randmask_delta}


def test_config_is_a_peft_config_once_registered():
    config = randmask.RandMaskConfig(density=0.01)
    assert isinstance(config, RandMaskPeftConfig) and isinstance(config, randmask.RandMaskConfig)
    assert config.peft_type == "RANDMASK" and config.target_modules == ("q_proj", "v_proj")
    with pytest.raises(ValueError, match="density"):
        randmask.RandMaskConfig(density=0.0)


@pytest.mark.parametrize("arch", ARCHS)
def test_get_peft_model_masks_as_apply_does_and_trains_the_same(arch):
    model = get_peft_model(base_model(arch), randmask.RandMaskConfig(**CONFIGS[arch]))
    short = randmask.apply(base_model(arch), randmask.RandMaskConfig(**CONFIGS[arch]))
    layers = dict(randmask.masked_layers(short))
    peft_layers = {n: m for n, m in model.base_model.model.named_modules() if isinstance(m, RandMaskLayer)}
    assert list(peft_layers) == list(layers)
    for name, layer in layers.items():
        mask = peft_layers[name].randmask_mask["default"]
        assert (mask.shape, mask.n, mask.key) == (layer.mask.shape, layer.n, layer.key)
    trainable, _ = model.get_nb_trainable_parameters()
    assert trainable == sum(layer.n for layer in layers.values())
    train(model)
    train(short)
    assert torch.equal(logits(model), logits(short))


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_round_trip_is_exact_and_small(arch, tmp_path):
    model = train(get_peft_model(base_model(arch), randmask.RandMaskConfig(**CONFIGS[arch])))
    expected = logits(model)
    model.save_pretrained(tmp_path)
    n = model.get_nb_trainable_parameters()[0]
    assert os.path.getsize(tmp_path / "adapter_model.safetensors") <= 4 * n + 64 * 1024
    stored = load_file(tmp_path / "adapter_model.safetensors")
    assert all(k.endswith(".randmask_delta") and t.dtype == torch.float32 for k, t in stored.items())
    assert sum(t.numel() for t in stored.values()) == n  # the deltas only: no index, no base value
    header = json.loads((tmp_path / "adapter_config.json").read_text())["randmask_adapter"]
    assert header["format"] == "randmask-adapter" and len(header["base_fingerprint"]) == 32

    loaded = PeftModel.from_pretrained(base_model(arch), tmp_path)
    assert torch.equal(logits(loaded), expected)
    assert torch.equal(logits(randmask.load_adapter(base_model(arch), tmp_path)), expected)  # the short path too
    lazy = PeftModel.from_pretrained(base_model(arch), tmp_path, low_cpu_mem_usage=True)  # deltas made on "meta"
    assert torch.equal(logits(lazy), expected)


def test_training_goes_on_after_a_load_with_a_fused_optimizer(tmp_path):
    # a fused AdamW bumps no version counter: the step hook must write the merged entries of the loaded deltas
    model = train(get_peft_model(base_model("llama"), randmask.RandMaskConfig(**CONFIGS["llama"])))
    model.save_pretrained(tmp_path)
    short = randmask.load_adapter(base_model("llama"), tmp_path)
    loaded = PeftModel.from_pretrained(base_model("llama"), tmp_path, is_trainable=True, low_cpu_mem_usage=True)
    for m in (short, loaded):
        optimizer = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2, fused=True)
        m(input_ids=TOKENS, labels=TOKENS).loss.backward()
        optimizer.step()
    assert torch.equal(logits(loaded), logits(short))


def test_a_save_adapter_file_converts_to_a_peft_directory(tmp_path, capsys):
    from randmask.recipes.cli import main

    model = train(randmask.apply(base_model("llama"), randmask.RandMaskConfig(**CONFIGS["llama"])))
    randmask.save_adapter(model, tmp_path / "adapter.safetensors")
    main(["to-peft", str(tmp_path / "adapter.safetensors"), str(tmp_path / "peft")])
    loaded = PeftModel.from_pretrained(base_model("llama"), tmp_path / "peft")
    assert torch.equal(logits(loaded), logits(model))

    randmask.save_adapter(model, tmp_path / "half.safetensors", dtype=torch.bfloat16)
    with pytest.raises(SystemExit) as exit_:
        main(["to-peft", str(tmp_path / "half.safetensors"), str(tmp_path / "half")])
    assert exit_.value.code == 2 and not (tmp_path / "half").exists()
    assert "bfloat16 deltas" in capsys.readouterr().err


@pytest.mark.parametrize("arch", ARCHS)
def test_merge_and_unload_unload_and_disable(arch):
    model = train(get_peft_model(base_model(arch), randmask.RandMaskConfig(**CONFIGS[arch])))
    expected, base = logits(model), logits(base_model(arch))
    with model.disable_adapter():
        assert torch.equal(logits(model), base)
    assert torch.equal(logits(model), expected)
    merged = model.merge_and_unload()
    assert not any(isinstance(m, RandMaskLayer) for m in merged.modules())
    assert torch.equal(logits(merged), expected)

    model = train(get_peft_model(base_model(arch), randmask.RandMaskConfig(**CONFIGS[arch])))
    unloaded = model.unload()
    assert_state_equal(unloaded, base_model(arch).state_dict())


@pytest.mark.parametrize("arch", ARCHS)
def test_two_adapters_with_overlapping_masks_switch_back_and_forth_exactly(arch):
    # density 0.5 on the same layers: the two masks share about a quarter of each matrix
    targets = ["c_attn"] if arch == "gpt2" else ["q_proj", "v_proj"]
    a, b = dict(density=0.5, seed=1, target_modules=targets), dict(density=0.5, seed=2, target_modules=targets)
    model = train(get_peft_model(base_model(arch), randmask.RandMaskConfig(**a)), lr=1e-1)
    model.add_adapter("b", randmask.RandMaskConfig(**b))
    model.set_adapter("b")
    train(model, lr=1e-1, tokens=TOKENS.flip(1))
    expected_a = logits(reference(arch, deltas_of(model, "default"), **a))
    expected_b = logits(reference(arch, deltas_of(model, "b"), **b))
    assert not torch.equal(expected_a, expected_b)
    base = base_model(arch).state_dict()
    for _ in range(2):
        model.set_adapter("default")
        assert torch.equal(logits(model), expected_a)
        model.set_adapter("b")
        assert torch.equal(logits(model), expected_b)
    # the base weight differs from W0 only at b's positions
    name, layer = next((n, m) for n, m in model.base_model.model.named_modules() if isinstance(m, RandMaskLayer))
    weight, original = layer.base_layer.weight, base[f"{name}.weight"]
    changed = (weight != original).nonzero() if arch != "gpt2" else (weight != original).t().nonzero()
    mask = layer.randmask_mask["b"]
    assert len(changed) and bool((randmask.mask_slots(changed[:, 0], changed[:, 1], mask.shape, mask.n,
                                                      mask.key) >= 0).all())
    with model.disable_adapter():
        assert torch.equal(logits(model), logits(base_model(arch)))

    model.delete_adapter("default")
    assert torch.equal(logits(model), expected_b)
    assert_state_equal(model.unload(), base)


def test_adapters_on_an_additive_base_switch_without_writing(tmp_path):
    config = dict(density=0.05, seed=5, mode="additive")
    model = train(get_peft_model(base_model("opt"), randmask.RandMaskConfig(**config)))
    model.add_adapter("other", randmask.RandMaskConfig(**{**config, "seed": 6}))
    base = base_model("opt").state_dict()
    layers = [(n, m) for n, m in model.base_model.model.named_modules() if isinstance(m, RandMaskLayer)]
    expected = logits(model)
    model.set_adapter("other")
    assert not torch.equal(logits(model), expected)
    model.set_adapter("default")
    assert layers and all(torch.equal(m.base_layer.weight, base[f"{n}.weight"]) for n, m in layers)
    assert torch.equal(logits(model), expected)
    model.save_pretrained(tmp_path, selected_adapters=["default"])
    assert torch.equal(logits(PeftModel.from_pretrained(base_model("opt"), tmp_path)), expected)


def test_refusals_leave_the_model_untouched(tmp_path):
    model = train(get_peft_model(base_model("llama"), randmask.RandMaskConfig(**CONFIGS["llama"])))
    model.save_pretrained(tmp_path / "good")

    other_base = base_model("llama", init_seed=1)
    before, flags = state(other_base), [p.requires_grad for p in other_base.parameters()]
    modules = list(other_base.modules())
    with pytest.raises(AdapterError, match="another base model"):
        PeftModel.from_pretrained(other_base, tmp_path / "good")
    assert_state_equal(other_base, before)
    assert list(other_base.modules()) == modules and [p.requires_grad for p in other_base.parameters()] == flags
    assert not hasattr(other_base, "peft_config")

    # a tampered delta: refused by its checksum, after PEFT has read the file; the base is handed back as it came
    os.makedirs(tmp_path / "tampered")
    (tmp_path / "tampered" / "adapter_config.json").write_text((tmp_path / "good" / "adapter_config.json").read_text())
    tensors = load_file(tmp_path / "good" / "adapter_model.safetensors")
    first = sorted(tensors)[0]
    tensors[first] = tensors[first].clone()
    tensors[first][0] += 1.0
    save_file(tensors, tmp_path / "tampered" / "adapter_model.safetensors", metadata={"format": "pt"})
    fresh = base_model("llama")
    before, modules = state(fresh), list(fresh.modules())
    with pytest.raises(AdapterError, match="checksum"):
        PeftModel.from_pretrained(fresh, tmp_path / "tampered")
    assert_state_equal(fresh, before)
    assert list(fresh.modules()) == modules and not hasattr(fresh, "peft_config")
    with pytest.raises(AdapterError, match="checksum"):
        randmask.load_adapter(fresh, tmp_path / "tampered")
    assert_state_equal(fresh, before)

    # another method's adapter: refused by PEFT before anything changes, and by randmask.load_adapter
    from peft import LoraConfig
    lora = get_peft_model(base_model("llama"), LoraConfig(target_modules=["q_proj"], r=2))
    lora.save_pretrained(tmp_path / "lora")
    with pytest.raises(ValueError, match="different peft types"):
        model.load_adapter(tmp_path / "lora", adapter_name="lora")
    with pytest.raises(AdapterError, match="another method"):
        randmask.load_adapter(fresh, tmp_path / "lora")
    assert_state_equal(fresh, before)


def test_several_active_adapters_are_refused():
    model = get_peft_model(base_model("llama"), randmask.RandMaskConfig(density=0.05))
    model.add_adapter("b", randmask.RandMaskConfig(density=0.05, seed=1))
    with pytest.raises(ValueError, match="one adapter at a time"):
        model.base_model.set_adapter(["default", "b"])


@pytest.mark.full
@pytest.mark.parametrize("optimizer", ["torch", "masked"])
def test_trainer_with_gradient_checkpointing_lowers_the_loss(optimizer, tmp_path):
    from transformers import Trainer, TrainingArguments

    model = get_peft_model(base_model("llama"), randmask.RandMaskConfig(density=0.1, target_modules="all-linear"))
    data = [{"input_ids": TOKENS[i % 2], "labels": TOKENS[i % 2]} for i in range(16)]
    with torch.no_grad():
        start = sum(model(input_ids=t[None], labels=t[None]).loss for t in TOKENS)
    optimizers = (randmask.MaskedAdamW([p for p in model.parameters() if p.requires_grad], lr=1e-1), None) \
        if optimizer == "masked" else (None, None)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, num_train_epochs=4,
                             learning_rate=1e-1, gradient_checkpointing=True, use_cpu=True, report_to=[],
                             save_strategy="no", logging_strategy="no", disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=data, optimizers=optimizers).train()
    with torch.no_grad():
        end = sum(model(input_ids=t[None], labels=t[None]).loss for t in TOKENS)
    assert end < 0.9 * start


@pytest.mark.full
def test_trl_sft_trainer_takes_a_randmask_peft_config(tmp_path):
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    # a word-level tokenizer over the tiny vocabulary (the data is already tokenized; SFTTrainer pads with it)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(
        {f"t{i}": i for i in range(64)}, unk_token="t0")), pad_token="t0", eos_token="t1")
    data = Dataset.from_list([{"input_ids": TOKENS[i % 2].tolist()} for i in range(16)])
    model = base_model("llama")
    args = trl.SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_train_epochs=4,
                         learning_rate=1e-1, use_cpu=True, report_to=[], save_strategy="no", logging_strategy="no",
                         disable_tqdm=True, dataset_kwargs={"skip_prepare_dataset": True}, gradient_checkpointing=True)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                             peft_config=randmask.RandMaskConfig(density=0.1, target_modules="all-linear"))
    with torch.no_grad():
        start = sum(trainer.model(input_ids=t[None], labels=t[None]).loss for t in TOKENS)
    trainer.train()
    with torch.no_grad():
        end = sum(trainer.model(input_ids=t[None], labels=t[None]).loss for t in TOKENS)
    assert any(isinstance(m, RandMaskLayer) for m in trainer.model.modules())
    assert end < 0.9 * start


def test_a_4bit_base_trains_additively_and_reloads_exactly(tmp_path):
    from test_quantized import quantize_model, storage, tiny_llama

    tokens = torch.randint(0, 61, (2, 12), generator=torch.Generator().manual_seed(1))
    model = get_peft_model(quantize_model(tiny_llama(), "nf4-dq"), randmask.RandMaskConfig(density=0.02))
    packed = storage(model)
    train(model, tokens=tokens)
    assert {m.mode for m in model.modules() if isinstance(m, RandMaskLayer)} == {"additive"}
    assert all(torch.equal(a, b) for a, b in zip(storage(model), packed))  # the 4-bit storage is never written
    expected = logits(model, tokens)
    model.save_pretrained(tmp_path)
    # train mode, as the trained model: bitsandbytes runs other kernels for the unmasked 4-bit layers in eval mode
    loaded = PeftModel.from_pretrained(quantize_model(tiny_llama(), "nf4-dq"), tmp_path).train()
    assert torch.equal(logits(loaded, tokens), expected)
    merged = loaded.merge_and_unload()  # dense layers in the compute dtype: W0 dequantized + delta
    assert type(merged.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert torch.allclose(logits(merged, tokens), expected, atol=1e-4)
