"""Adapters on tiny Llama-, OPT- and GPT-2-shaped models (built from configs, no downloads; GPT-2 uses Conv1D):
save -> load onto a fresh base reproduces the trained model exactly; wrong bases, newer versions and damaged files
are refused with clear errors and leave the model bitwise untouched; merge and restore give plain modules."""
import json
import os

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, OPTConfig
from transformers.pytorch_utils import Conv1D

import randmask
from randmask.adapter import (
    HEADER_HASH_KEY,
    HEADER_KEY,
    AdapterError,
    _digest,
    _tensor_bytes,
    load_adapter,
    merge,
    read_adapter_header,
    restore,
    save_adapter,
)
from randmask.layer import MaskedLinear

pytestmark = pytest.mark.usefixtures("torch_backend")



def model_config(arch: str, hidden: int = 32):
    if arch == "llama":
        return LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    if arch == "opt":
        return OPTConfig(vocab_size=64, hidden_size=hidden, ffn_dim=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=hidden,
                         dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
    return GPT2Config(vocab_size=64, n_embd=hidden, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0,
                      embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)


# One config per architecture, covering density and trainable_ratio, all-linear, suffixes and a regex.
RANDMASK_CONFIGS = {
    "llama": randmask.RandMaskConfig(density=0.05, target_modules="all-linear", seed=7),
    "opt": randmask.RandMaskConfig(trainable_ratio=0.01, target_modules=("q_proj", "v_proj", "fc1"), seed=3),
    "gpt2": randmask.RandMaskConfig(density=0.1, target_modules=r".*\.(c_attn|c_fc|c_proj)", seed=11),
}
ARCHS = list(RANDMASK_CONFIGS)


def base_model(arch: str, init_seed: int = 0, hidden: int = 32) -> nn.Module:
    torch.manual_seed(init_seed)
    return AutoModelForCausalLM.from_config(model_config(arch, hidden)).eval()


TOKENS = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))


def trained_model(arch: str, steps: int = 3) -> nn.Module:
    model = randmask.apply(base_model(arch), RANDMASK_CONFIGS[arch])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(steps):
        model(TOKENS, labels=TOKENS).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(layer.delta.abs().max() > 0 for _, layer in randmask.masked_layers(model))
    return model


@torch.no_grad()
def logits(model: nn.Module) -> torch.Tensor:
    return model(TOKENS).logits


def total_n(model: nn.Module) -> int:
    return sum(layer.n for _, layer in randmask.masked_layers(model))


def snapshot(model: nn.Module) -> dict:
    """Everything a failed load must leave alone: bits of every tensor, requires_grad, module types."""
    return {"state": {k: (v.dtype, tuple(v.shape), _tensor_bytes(v)) for k, v in model.state_dict().items()},
            "grad": {k: p.requires_grad for k, p in model.named_parameters()},
            "types": {k: type(m) for k, m in model.named_modules()}}


def assert_untouched(model: nn.Module, before: dict) -> None:
    assert snapshot(model) == before
    assert not any(isinstance(m, MaskedLinear) for m in model.modules())
    assert not hasattr(model, "randmask_config")


def rewrite(src, dst, header_fn=None, tensors_fn=None, rehash=True):
    """Copy an adapter with its header and/or tensors changed; rehash=True keeps every checksum consistent, so the
    check under test is the one that trips, not the checksum."""
    with safe_open(src, framework="pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    header = json.loads(metadata[HEADER_KEY])
    if tensors_fn:
        tensors = tensors_fn(tensors)
    if header_fn:
        header_fn(header)
    if rehash:
        for entry in header["layers"]:
            t = tensors.get(entry["name"] + ".delta")
            if t is not None:
                entry["delta_blake2b"] = _digest(_tensor_bytes(t))
    text = json.dumps(header)
    metadata = dict(metadata, **{HEADER_KEY: text})
    if rehash:
        metadata[HEADER_HASH_KEY] = _digest(text.encode())
    save_file(tensors, dst, metadata=metadata)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """arch -> (path of an fp32 adapter, the trained model's logits, total n)."""
    out = {}
    for arch in ARCHS:
        model = trained_model(arch)
        path = tmp_path_factory.mktemp(arch) / "adapter.safetensors"
        save_adapter(model, path)
        out[arch] = (path, logits(model), total_n(model))
    return out


# ---------------------------------------------------------------------------------------------------- round trip
@pytest.mark.parametrize("arch", ARCHS)
def test_round_trip_fp32_is_exact(arch, tmp_path):
    trained = trained_model(arch)
    path = tmp_path / "a.safetensors"
    save_adapter(trained, path)
    loaded = load_adapter(base_model(arch), path)
    assert torch.equal(logits(loaded), logits(trained))
    assert loaded.randmask_config == trained.randmask_config
    mine, theirs = dict(randmask.masked_layers(loaded)), dict(randmask.masked_layers(trained))
    assert list(mine) == list(theirs)
    for name, layer in mine.items():
        assert torch.equal(layer.delta, theirs[name].delta) and layer.delta.requires_grad
        assert torch.equal(layer.weight, theirs[name].weight) and torch.equal(layer.base, theirs[name].base)
        assert layer.transposed == (arch == "gpt2")
    if arch == "gpt2":  # the Conv1D path: the wrapped weights are transposed views of (in, out) storage
        assert all(layer.weight.stride() == (1, layer.out_features) for layer in mine.values())


@pytest.mark.parametrize("arch", ARCHS)
def test_file_holds_only_deltas(arch, saved):
    path, _, n = saved[arch]
    assert os.path.getsize(path) <= 4 * n + 64 * 1024
    header = read_adapter_header(path)
    with safe_open(path, framework="pt") as f:
        names = list(f.keys())
        tensors = {k: f.get_tensor(k) for k in names}
    assert sorted(names) == sorted(entry["name"] + ".delta" for entry in header["layers"])
    assert all(t.dtype == torch.float32 and t.dim() == 1 for t in tensors.values())  # no index tensors
    assert sum(t.numel() for t in tensors.values()) == n
    assert header["mask_scheme"] == 1 and header["format_version"] == 1  # tests/vectors/mask_scheme1.txt
    assert randmask.RandMaskConfig.from_dict(header["config"]) == RANDMASK_CONFIGS[arch]
    for entry in header["layers"]:
        assert int(entry["key"]) == randmask.layer_key(RANDMASK_CONFIGS[arch].seed, entry["name"])
        assert entry["transposed"] == (arch == "gpt2")


@pytest.mark.parametrize("dtype,eps", [(torch.bfloat16, 2**-8), (torch.float16, 2**-11)])
def test_half_precision_adapter(dtype, eps, tmp_path):
    trained = trained_model("llama")
    n = total_n(trained)
    path = tmp_path / "half.safetensors"
    save_adapter(trained, path, dtype=dtype)
    assert 2 * n < os.path.getsize(path) <= 2 * n + 64 * 1024
    loaded = load_adapter(base_model("llama"), path)
    theirs = dict(randmask.masked_layers(trained))
    for name, layer in randmask.masked_layers(loaded):
        assert layer.delta.dtype == torch.float32
        assert torch.equal(layer.delta, theirs[name].delta.to(dtype).float())
        torch.testing.assert_close(layer.delta, theirs[name].delta, rtol=eps, atol=0)
    want = logits(trained)
    torch.testing.assert_close(logits(loaded), want, rtol=0, atol=20 * eps * want.abs().max().item())


def test_save_refuses_clearly(tmp_path):
    with pytest.raises(AdapterError, match="no masked layers"):
        save_adapter(base_model("llama"), tmp_path / "x.safetensors")
    trained = trained_model("llama", steps=1)
    for bad in (torch.float64, torch.int8, "fp8", None):
        with pytest.raises(AdapterError, match="float32, torch.bfloat16 or torch.float16"):
            save_adapter(trained, tmp_path / "x.safetensors", dtype=bad)
    next(randmask.masked_layers(trained))[1].delta.data[0] = 1e6
    with pytest.raises(AdapterError, match="too large for float16"):
        save_adapter(trained, tmp_path / "x.safetensors", dtype=torch.float16)
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_load_into_model_masked_with_the_same_config(saved):
    path, want, _ = saved["opt"]
    model = randmask.apply(base_model("opt"), RANDMASK_CONFIGS["opt"])
    assert load_adapter(model, path) is model
    assert torch.equal(logits(model), want)
    assert torch.equal(logits(load_adapter(model, path)), want)  # loading twice overwrites, nothing accumulates


def test_load_refuses_a_model_masked_with_another_config(saved):
    path, _, _ = saved["opt"]
    other = randmask.RandMaskConfig(trainable_ratio=0.01, target_modules=("q_proj", "v_proj", "fc1"), seed=4)
    model = randmask.apply(base_model("opt"), other)
    deltas = [layer.delta.clone() for _, layer in randmask.masked_layers(model)]
    with pytest.raises(AdapterError, match="already masked with a different config"):
        load_adapter(model, path)
    assert model.randmask_config == other
    assert all(torch.equal(a, layer.delta) for a, (_, layer) in zip(deltas, randmask.masked_layers(model)))


# ---------------------------------------------------------------------------------------------------- refusals
def _rename_module(model):
    attn = model.model.decoder.layers[1].self_attn
    attn.query = attn.q_proj
    del attn.q_proj
    return model


WRONG_BASES = {
    "another init seed": (lambda: base_model("opt", init_seed=1), "trained on another base model"),
    "another shape": (lambda: base_model("opt", hidden=48), "does not fit this model"),
    "a renamed module": (lambda: _rename_module(base_model("opt")),
                         r"the model lacks the adapter's layers \['model.decoder.layers.1.self_attn.q_proj'\]$"),
    "another dtype": (lambda: base_model("opt").to(torch.bfloat16), "trained on a float32 base model"),
    "another architecture": (lambda: base_model("llama"), "does not fit this model"),
}


@pytest.mark.parametrize("case", list(WRONG_BASES))
def test_wrong_base_is_refused(case, saved):
    build, message = WRONG_BASES[case]
    model = build()
    before = snapshot(model)
    with pytest.raises(AdapterError, match=message):
        load_adapter(model, saved["opt"][0])
    assert_untouched(model, before)


def _flip_header_byte(data: bytes) -> bytes:
    at = data.index(b"base_fingerprint") + 40  # inside the hex digest, in the JSON header
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1:]


def _set(header, **fields):
    header.update(fields)


def _set_nan(tensors):
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].clone()
    tensors[name][0] = float("nan")
    return tensors


def _drop_one(tensors):
    return dict(sorted(tensors.items())[1:])


def _as_bf16(tensors):
    return {k: v.to(torch.bfloat16) for k, v in tensors.items()}


def _with_header_text(src, dst, text):
    """An adapter whose header is `text`, with a matching checksum (so the parse is what fails)."""
    with safe_open(src, framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, dst, metadata={"format": "pt", HEADER_KEY: text, HEADER_HASH_KEY: _digest(text.encode())})


DAMAGED = {  # name -> (how to damage the adapter file, expected message)
    "truncated": (lambda p, d: d.write_bytes(p.read_bytes()[:-7]), "corrupt or truncated"),
    "flipped header byte": (lambda p, d: d.write_bytes(_flip_header_byte(p.read_bytes())), "fails its checksum"),
    "changed tensor": (lambda p, d: d.write_bytes(p.read_bytes()[:-4] + b"\x00\x00\x80\x3f"),
                       r"tensor '.*\.delta' fails its checksum"),
    "random bytes": (lambda p, d: d.write_bytes(os.urandom(4096)), "corrupt or truncated"),
    "not an adapter": (lambda p, d: save_file({"w": torch.zeros(3)}, d), "not a randmask adapter"),
    "newer mask scheme": (lambda p, d: rewrite(p, d, lambda h: _set(h, mask_scheme=randmask.MASK_SCHEME + 1)),
                          "mask_scheme 2, newer than this randmask knows"),
    "newer format": (lambda p, d: rewrite(p, d, lambda h: _set(h, format_version=2)),
                     "format_version 2, newer than this randmask knows"),
    "unparsable header": (lambda p, d: _with_header_text(p, d, '{"format": "randmask-adapter", '), "not valid JSON"),
    "header not a randmask one": (lambda p, d: _with_header_text(p, d, '{"format": "lora"}'),
                                  "format is 'lora', expected 'randmask-adapter'"),
    "bad config": (lambda p, d: rewrite(p, d, lambda h: h["config"].update(density=2.0)), "not a valid RandMaskConfig"),
    "wrong layer key": (lambda p, d: rewrite(p, d, lambda h: h["layers"][0].update(key="12345")),
                        "the mask key of layer .* does not follow from seed 11"),
    "wrong n": (lambda p, d: rewrite(p, d, lambda h: h["layers"][0].update(n=h["layers"][0]["n"] + 1)),
                r"with n=\d+ here"),
    "missing tensor": (lambda p, d: rewrite(p, d, tensors_fn=_drop_one), "tensors do not match the header: missing"),
    "tensor dtype": (lambda p, d: rewrite(p, d, tensors_fn=_as_bf16), r"is torch.bfloat16 .*the header says"),
    "non-finite delta": (lambda p, d: rewrite(p, d, tensors_fn=_set_nan), "non-finite"),
}


@pytest.mark.parametrize("case", list(DAMAGED))
def test_damaged_or_foreign_file_is_refused(case, saved, tmp_path):
    damage, message = DAMAGED[case]
    bad = tmp_path / "bad.safetensors"
    damage(saved["gpt2"][0], bad)
    model = base_model("gpt2")
    before = snapshot(model)
    with pytest.raises(AdapterError, match=message):
        load_adapter(model, bad)
    assert_untouched(model, before)


# ---------------------------------------------------------------------------------------------------- merge, restore
@pytest.mark.parametrize("arch", ARCHS)
def test_merge_gives_plain_modules_with_the_trained_outputs(arch):
    model = trained_model(arch)
    want = logits(model)
    storage = {name: layer.weight.data_ptr() for name, layer in randmask.masked_layers(model)}
    assert merge(model) is model
    assert torch.equal(logits(model), want)
    assert not any(isinstance(m, MaskedLinear) for m in model.modules())
    assert not hasattr(model, "randmask_config")
    fresh = base_model(arch)
    assert list(model.state_dict()) == list(fresh.state_dict())
    assert {k: type(m) for k, m in model.named_modules()} == {k: type(m) for k, m in fresh.named_modules()}
    for name, ptr in storage.items():
        module = model.get_submodule(name)
        assert module.weight.data_ptr() == ptr  # merged in place, no copy
        assert module.weight.shape == fresh.get_submodule(name).weight.shape
        assert isinstance(module, Conv1D if arch == "gpt2" else nn.Linear)
    assert not any(p.requires_grad for p in model.parameters())  # as apply left them (PEFT's habit)


@pytest.mark.parametrize("arch", ARCHS)
def test_restore_gives_the_base_back_bit_exactly(arch):
    model = base_model(arch)
    config = RANDMASK_CONFIGS[arch]
    name, shape, n = randmask.plan(model, config)[0]
    rows, cols = randmask.mask_positions(shape, n, randmask.layer_key(config.seed, name))
    module = model.get_submodule(name)
    with torch.no_grad():  # a -0.0 at a masked position: `base + 0.0` would give it back as +0.0
        (module.weight.t() if arch == "gpt2" else module.weight)[rows[0], cols[0]] = -0.0
    before = snapshot(model)
    types = {k: type(m) for k, m in model.named_modules()}
    randmask.apply(model, config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    model(TOKENS, labels=TOKENS).loss.backward()
    optimizer.step()
    logits(model)  # sync: the -0.0 entry now holds its delta
    assert restore(model) is model
    after = snapshot(model)
    assert after["state"] == before["state"]  # bitwise, -0.0 included
    assert {k: type(m) for k, m in model.named_modules()} == types
    assert not hasattr(model, "randmask_config")


def test_restore_float64_is_exact():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16, dtype=torch.float64))
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(16, 16, dtype=torch.float64))  # not representable in float32
    w0 = model[0].weight.clone()
    randmask.apply(model, randmask.RandMaskConfig(density=0.5, target_modules=("0",)))
    model[0].delta.data.fill_(0.25)
    model[0].sync()
    restore(model)
    assert type(model[0]) is nn.Linear and torch.equal(model[0].weight, w0)


def test_merge_and_restore_refuse_an_unmasked_model():
    for fn in (merge, restore):
        with pytest.raises(AdapterError, match="no masked layers"):
            fn(base_model("gpt2"))


def test_merged_adapter_round_trip_then_restore(saved):
    """load -> merge equals the trained outputs; load -> restore equals the fresh base."""
    path, want, _ = saved["gpt2"]
    merged = merge(load_adapter(base_model("gpt2"), path))
    assert torch.equal(logits(merged), want)
    base = base_model("gpt2")
    restored = restore(load_adapter(base_model("gpt2"), path))
    assert torch.equal(logits(restored), logits(base))
