"""Quantized bases (bitsandbytes Linear4bit nf4/fp4 with and without double quantization, Linear8bitLt) in additive
mode: the layer against a float64 dense reference (dequant(W0) + S(delta)), training a tiny Llama with the storage
bitwise unchanged, adapters that reproduce logits exactly on a fresh quantized base, merged vs additive on a plain
base, merge / restore, and bad input that changes nothing."""
import copy

import bitsandbytes as bnb
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import randmask
from randmask import MaskedLinear, RandMaskConfig, quantized

KINDS = ["nf4", "nf4-dq", "fp4", "fp4-dq", "int8"]


def quantize(linear: nn.Linear, kind: str, compute_dtype=torch.float32) -> nn.Module:
    """A bitsandbytes copy of `linear`, quantized on the CPU."""
    if kind == "int8":
        q = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                has_fp16_weights=False)
        q.weight = bnb.nn.Int8Params(linear.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
    else:
        quant_type, _, dq = kind.partition("-")
        q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=compute_dtype, compress_statistics=bool(dq), quant_type=quant_type)
        q.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False, quant_type=quant_type,
                                     compress_statistics=bool(dq))
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    return q.to(linear.weight.device)


def quantize_model(model: nn.Module, kind: str) -> nn.Module:
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name != "lm_head":
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, quantize(module, kind))
    return model


def storage(model: nn.Module) -> list[torch.Tensor]:
    layers = [m for m in model.modules() if not isinstance(m, MaskedLinear)]  # a masked layer's base is listed
    return [t.clone() for m in layers if quantized.quantization_of(m) is not None for t in quantized.storage_of(m)]


def assert_bitwise_equal(got, want):
    assert len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want))


def tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=61, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(config).eval()  # eval mode: the quantized storage must survive it (no dropout here)


# ---------------------------------------------------------------------------------------------------- one layer
@pytest.mark.parametrize("lead", [(7,), (2, 5)], ids=["2d", "3d"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_additive_layer_matches_the_dense_reference(kind, compute_dtype, bias, lead):
    """y = dequant(W0) x + S(delta) x + b, grad_x = grad_y (dequant(W0) + S(delta)), grad_delta = (grad_y^T x)[mask],
    in float64, within the compute dtype's rounding; the storage stays bitwise as it was."""
    torch.manual_seed(0)
    q = quantize(nn.Linear(29, 37, bias=bias), kind, compute_dtype)
    dense = quantized.dequantize(q).double()
    before = storage(q)
    layer = MaskedLinear.from_linear(q, density=0.1, name="layer")
    assert layer.mode == "additive" and layer.quantization == kind
    with torch.no_grad():
        layer.delta.normal_(std=0.05)
    rows, cols = layer.positions()
    effective = dense.clone()
    effective[rows, cols] += layer.delta.double()
    x = torch.randn(*lead, 29).to(compute_dtype).requires_grad_(True)
    grad_y = torch.randn(*lead, 37).to(compute_dtype)
    y = layer(x)
    y.backward(grad_y)

    eps = torch.finfo(compute_dtype).eps
    b = layer.bias.detach().double() if bias else 0.0
    want_y = x.detach().double() @ effective.t() + b
    scale_y = x.detach().double().abs() @ effective.abs().t() + (b.abs() if bias else 0.0)
    assert y.dtype == compute_dtype and ((y.double() - want_y).abs() <= 8 * eps * scale_y + 1e-6).all()
    want_gx = grad_y.double() @ effective
    scale_gx = grad_y.double().abs() @ effective.abs()
    assert x.grad.dtype == compute_dtype and ((x.grad.double() - want_gx).abs() <= 8 * eps * scale_gx + 1e-6).all()
    x2d, gy2d = x.detach().reshape(-1, 29).double(), grad_y.reshape(-1, 37).double()
    want_gd = (gy2d.t() @ x2d)[rows, cols]
    scale_gd = (gy2d.abs().t() @ x2d.abs())[rows, cols]
    assert ((layer.delta.grad.double() - want_gd).abs() <= 1e-5 * scale_gd + 1e-6).all()
    assert_bitwise_equal(storage(q), before)
    assert torch.equal(layer.base, dense.to(layer.base.dtype)[rows, cols])  # the dequantized W0 at the mask


# ---------------------------------------------------------------------------------------------------- a tiny Llama
@pytest.mark.parametrize("optimizer", ["MaskedAdamW", "AdamW"])
@pytest.mark.parametrize("kind", ["nf4-dq", "fp4", "int8"])
def test_tiny_llama_trains_on_a_quantized_base_and_its_adapter_reloads_exactly(tmp_path, kind, optimizer):
    model = quantize_model(tiny_llama(), kind)
    before = storage(model)
    randmask.apply(model, RandMaskConfig(density=0.05, target_modules="all-linear", seed=3))
    assert {layer.mode for _, layer in randmask.masked_layers(model)} == {"additive"}
    params = [p for p in model.parameters() if p.requires_grad]
    opt = randmask.MaskedAdamW(params, lr=1e-2, weight_decay=0.0) if optimizer == "MaskedAdamW" else \
        torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 61, (4, 16), generator=gen)
    losses = []
    for _ in range(8):
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    assert_bitwise_equal(storage(model), before)
    with torch.no_grad():
        logits = model(input_ids=tokens).logits
    randmask.save_adapter(model, tmp_path / "adapter.safetensors")

    fresh = quantize_model(tiny_llama(), kind)
    randmask.load_adapter(fresh, tmp_path / "adapter.safetensors")
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=tokens).logits, logits)


def test_trainable_ratio_counts_the_values_a_4bit_weight_packs():
    plain = tiny_llama()
    want = randmask.plan(plain, RandMaskConfig(trainable_ratio=0.01, target_modules="all-linear"))
    got = randmask.plan(quantize_model(tiny_llama(), "nf4"), RandMaskConfig(trainable_ratio=0.01,
                                                                            target_modules="all-linear"))
    assert got == want


# ---------------------------------------------------------------------------------------------------- both modes
def test_merged_and_additive_agree_and_share_adapters(tmp_path):
    """The same values in either mode: equal logits and gradients (fp32 rounding), and an adapter saved from one
    mode loads in the other with equal outputs."""
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 61, (2, 12), generator=gen)
    models = {}
    for mode in ("merged", "additive"):
        model = randmask.apply(tiny_llama(), RandMaskConfig(density=0.1, target_modules="all-linear", mode=mode))
        torch.manual_seed(5)
        with torch.no_grad():
            for _, layer in randmask.masked_layers(model):
                layer.delta.normal_(std=0.02)
        model(input_ids=tokens, labels=tokens).loss.backward()
        models[mode] = model
    merged, additive = models["merged"], models["additive"]
    with torch.no_grad():
        torch.testing.assert_close(additive(input_ids=tokens).logits, merged(input_ids=tokens).logits,
                                   rtol=1e-5, atol=1e-5)
    for (name, a), (_, m) in zip(randmask.masked_layers(additive), randmask.masked_layers(merged)):
        assert a.mode == "additive" and m.mode == "merged"
        torch.testing.assert_close(a.delta.grad, m.delta.grad, rtol=1e-4, atol=1e-5, msg=name)

    for source, target_mode in (("merged", "additive"), ("additive", "merged")):
        path = tmp_path / f"{source}.safetensors"
        randmask.save_adapter(models[source], path)
        loaded = randmask.load_adapter(tiny_llama(), path, mode=target_mode)
        assert {layer.mode for _, layer in randmask.masked_layers(loaded)} == {target_mode}
        with torch.no_grad():
            torch.testing.assert_close(loaded(input_ids=tokens).logits, models[source](input_ids=tokens).logits,
                                       rtol=1e-5, atol=1e-5)


def test_additive_mode_never_writes_a_plain_weight_and_restore_gives_it_back():
    model = tiny_llama()
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    randmask.apply(model, RandMaskConfig(density=0.1, target_modules="all-linear", mode="additive"))
    with torch.no_grad():
        for _, layer in randmask.masked_layers(model):
            layer.delta.normal_()
    model(input_ids=torch.zeros(1, 4, dtype=torch.long)).logits.sum().backward()
    restored = randmask.restore(model)
    assert not list(randmask.masked_layers(restored))
    now = dict(restored.named_parameters())
    assert now.keys() == weights.keys() and all(torch.equal(now[k], v) for k, v in weights.items())


# ---------------------------------------------------------------------------------------------------- merge / restore
@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_merge_of_a_quantized_base_makes_dense_layers_in_the_named_dtype(kind):
    model = quantize_model(tiny_llama(), kind)
    randmask.apply(model, RandMaskConfig(density=0.1, target_modules=("q_proj",)))
    with torch.no_grad():
        for _, layer in randmask.masked_layers(model):
            layer.delta.normal_(std=0.1)
    expected = {}
    for name, layer in randmask.masked_layers(model):
        weight = quantized.dequantize(layer.base_layer).to(torch.bfloat16)
        rows, cols = layer.positions()
        weight[rows, cols] = (layer.base.float() + layer.delta).to(torch.bfloat16)
        expected[name] = weight
    with pytest.raises(ValueError, match="dtype=torch.bfloat16"):
        randmask.merge(model)
    assert len(list(randmask.masked_layers(model))) == 2  # nothing changed
    merged = randmask.merge(model, dtype=torch.bfloat16)
    for name, weight in expected.items():
        module = merged.get_submodule(name)
        assert type(module) is nn.Linear and module.weight.dtype == torch.bfloat16
        assert torch.equal(module.weight, weight)
    assert not hasattr(merged, "randmask_config")


def test_restore_of_a_quantized_base_gives_back_its_untouched_layers():
    model = quantize_model(tiny_llama(), "nf4-dq")
    originals = {name: m for name, m in model.named_modules() if name.endswith(("q_proj", "v_proj"))}
    before = storage(model)
    randmask.apply(model, RandMaskConfig(density=0.1))
    restored = randmask.restore(model)
    assert all(restored.get_submodule(name) is m for name, m in originals.items())
    assert_bitwise_equal(storage(restored), before)


# ---------------------------------------------------------------------------------------------------- bad input
def state(model):
    return [(name, type(m).__name__, [(n, p.requires_grad, p.device, p.clone()) for n, p in m.named_parameters(
        recurse=False)]) for name, m in model.named_modules()]


def assert_same_state(got, want):
    assert [(n, t) for n, t, _ in got] == [(n, t) for n, t, _ in want]
    for (_, _, a), (_, _, b) in zip(got, want):
        assert [(n, g, d) for n, g, d, _ in a] == [(n, g, d) for n, g, d, _ in b]
        assert all(torch.equal(x, y) for (*_, x), (*_, y) in zip(a, b))


def test_merged_mode_on_a_quantized_weight_is_refused_and_changes_nothing():
    model = quantize_model(tiny_llama(), "nf4")
    model.model.layers[0].self_attn.q_proj = nn.Linear(64, 64)  # a plain layer first: must stay unwrapped too
    before = state(model)
    with pytest.raises(ValueError, match="cannot hold the merged values.*mode='additive'"):
        randmask.apply(model, RandMaskConfig(density=0.1, mode="merged"))
    assert_same_state(state(model), before)
    assert not hasattr(model, "randmask_config")
    with pytest.raises(ValueError, match="cannot hold the merged values"):
        MaskedLinear.from_linear(quantize(nn.Linear(8, 8), "int8"), n=3, mode="merged")


def test_an_adapter_from_a_4bit_base_on_another_quantization_is_refused(tmp_path):
    model = quantize_model(tiny_llama(), "nf4")
    randmask.apply(model, RandMaskConfig(density=0.1))
    randmask.save_adapter(model, tmp_path / "nf4.safetensors")
    for kind, words in (("int8", "8-bit"), ("fp4", "4-bit fp4"), ("nf4-dq", "nf4 double-quantized")):
        other = quantize_model(tiny_llama(), kind)
        before = state(other)
        with pytest.raises(randmask.AdapterError, match=f"trained on a bitsandbytes 4-bit nf4 base.*{words}"):
            randmask.load_adapter(other, tmp_path / "nf4.safetensors")
        assert_same_state(state(other), before)
    plain = tiny_llama()
    with pytest.raises(randmask.AdapterError, match="4-bit nf4 base.*plain float32 base"):
        randmask.load_adapter(plain, tmp_path / "nf4.safetensors")


def test_moving_a_quantized_masked_layer_is_refused_and_changes_nothing():
    layer = MaskedLinear.from_linear(quantize(nn.Linear(16, 8), "nf4"), n=5, name="l")
    before = [(t.device, t.clone()) for t in [*storage(layer), layer.delta, layer.base]]
    with pytest.raises(RuntimeError, match="moving it to meta is not supported"):
        layer.to("meta")
    after = [*storage(layer), layer.delta, layer.base]
    assert all(t.device == d and torch.equal(t, c) for (d, c), t in zip(before, after))
    layer.to(torch.float32)  # no device move: allowed
    layer.float()


def test_a_4bit_layer_not_quantized_yet_is_refused():
    q = bnb.nn.Linear4bit(16, 8, quant_type="nf4")  # built, never moved to a device: still full precision
    with pytest.raises(ValueError, match="not quantized yet"):
        MaskedLinear.from_linear(q, n=4, name="l")


def test_copies_keep_working():
    layer = MaskedLinear.from_linear(quantize(nn.Linear(16, 8), "nf4"), n=5, name="l")
    twin = copy.deepcopy(layer)
    x = torch.randn(3, 16)
    with torch.no_grad():
        layer.delta.fill_(0.5)
        twin.delta.fill_(0.5)
        assert torch.equal(layer(x), twin(x))
        assert not torch.equal(layer(x), layer.base_layer(x))
        assert torch.allclose(F.linear(x, quantized.dequantize(layer.base_layer), layer.bias), layer.base_layer(x),
                              atol=1e-5)


@pytest.mark.parametrize("bits", [4, 8])
def test_a_model_loaded_by_transformers_in_4bit_or_8bit(tmp_path, bits):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    tiny_llama().save_pretrained(tmp_path / "base")
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32) if bits == 4 else \
        BitsAndBytesConfig(load_in_8bit=True)

    def load():
        return AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=config, device_map="cpu")

    model = load()
    before = storage(model)
    randmask.apply(model, RandMaskConfig(trainable_ratio=0.01, target_modules="all-linear"))
    assert {layer.quantization for _, layer in randmask.masked_layers(model)} == {"nf4-dq" if bits == 4 else "int8"}
    opt = randmask.MaskedAdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    tokens = torch.randint(0, 61, (2, 12), generator=torch.Generator().manual_seed(2))
    for _ in range(3):
        model(input_ids=tokens, labels=tokens).loss.backward()
        opt.step()
        opt.zero_grad()
    assert_bitwise_equal(storage(model), before)
    randmask.save_adapter(model, tmp_path / "adapter.safetensors")
    with torch.no_grad():
        logits = model(input_ids=tokens).logits
        fresh = randmask.load_adapter(load(), tmp_path / "adapter.safetensors")
        assert torch.equal(fresh(input_ids=tokens).logits, logits)
