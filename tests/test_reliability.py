"""Bad inputs and faults, as a new user meets them: each case must raise a clear error (its type, and a message
naming the problem) and leave the model's state_dict and every file bitwise as they were.

Groups: the layer, the config, apply, state_dicts, adapters, the optimizer, the mask functions, merge / restore and
the CLI (exit status 2 and one error line); beside the table, the determinism tests and the faults that need their
own set-up (interrupts, concurrent saves).
A case is one entry in CASES: (group, id, the call, the exception type, a regex its message matches). The call gets
a World: a tiny masked Llama (`masked`), a fresh unmasked one (`fresh`), a saved adapter (`adapter`) and a scratch
directory. Add a case by adding a line; the checks around it are shared.
"""
import contextlib
import dataclasses
import hashlib
import io
import os
import pathlib
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

import randmask
from randmask import AdapterError, MaskedAdamW, MaskedLinear, RandMaskConfig

pytestmark = pytest.mark.usefixtures("torch_backend")


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32))


CONFIG = RandMaskConfig(density=0.05, target_modules="all-linear", seed=1)


@dataclasses.dataclass
class World:
    masked: nn.Module
    fresh: nn.Module
    adapter: pathlib.Path
    scratch: pathlib.Path

    def layer(self) -> MaskedLinear:
        return self.masked.model.layers[0].self_attn.q_proj


@pytest.fixture(scope="module")
def adapter_file(tmp_path_factory):
    model = randmask.apply(tiny_llama(), CONFIG)
    with torch.no_grad():
        for _, layer in randmask.masked_layers(model):
            layer.delta.normal_(std=0.01)
    path = tmp_path_factory.mktemp("adapter") / "adapter.safetensors"
    randmask.save_adapter(model, path)
    return path


@pytest.fixture
def world(adapter_file, tmp_path):
    masked = randmask.apply(tiny_llama(), CONFIG)
    (tmp_path / "existing.safetensors").write_bytes(adapter_file.read_bytes())
    (tmp_path / "text.safetensors").write_text("hello")
    save_file({"w": torch.zeros(2)}, tmp_path / "plain.safetensors")
    for name, targets in (("bad_regex", "q_proj("), ("number_targets", [1, 2]), ("no_targets", None)):
        _with_config(adapter_file, tmp_path / f"{name}.safetensors", target_modules=targets)
    return World(masked, tiny_llama(), adapter_file, tmp_path)


def _with_config(src, dst, **config):
    """A copy of an adapter whose header's config has these fields (the header's checksum made to match)."""
    import json

    from safetensors import safe_open

    from randmask.adapter import HEADER_HASH_KEY, HEADER_KEY, _digest

    with safe_open(src, framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    header = json.loads(metadata[HEADER_KEY])
    header["config"].update(config)
    text = json.dumps(header)
    save_file(tensors, dst, metadata={**metadata, HEADER_KEY: text, HEADER_HASH_KEY: _digest(text.encode())})


def snapshot(world: World):
    def state(model):
        return {k: v.clone() for k, v in model.state_dict().items()} | \
            {f"{name}:requires_grad": p.requires_grad for name, p in model.named_parameters()} | \
            {f"{name}:type": type(m).__name__ for name, m in model.named_modules()}
    files = {p: p.read_bytes() for p in sorted(world.scratch.rglob("*")) if p.is_file()}
    return state(world.masked), state(world.fresh), files, world.adapter.read_bytes()


def bits(t: torch.Tensor) -> torch.Tensor:
    """The bit pattern (NaN equals itself, -0.0 differs from +0.0)."""
    if not t.is_floating_point():
        return t
    return t.view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def assert_same(got, want):
    for a, b in zip(got[:2], want[:2]):
        assert a.keys() == b.keys()
        for key in a:
            same = torch.equal(bits(a[key]), bits(b[key])) if isinstance(a[key], torch.Tensor) else a[key] == b[key]
            assert same, key
    assert got[2] == want[2] and got[3] == want[3]


def tokens():
    return torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))


def interrupt_at(target, name, calls=1):
    """Patch target.name to raise KeyboardInterrupt on its `calls`-th call (a Ctrl-C in the middle of the work)."""
    original = getattr(target, name)
    count = [0]

    def patched(*args, **kwargs):
        count[0] += 1
        if count[0] == calls:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    return patched


CASES = []


def case(group, id, exception, match):
    def register(fn):
        CASES.append(pytest.param(fn, exception, match, id=f"{group}:{id}"))
        return fn
    return register


def cases(group, exception, match, **calls):
    for id, fn in calls.items():
        case(group, id, exception, match)(fn)


# ---------------------------------------------------------------------------------------------------- config
def config_cases(match, exception=ValueError, **kwargs_by_id):
    cases("config", exception, match, **{k: (lambda w, kw=kw: RandMaskConfig(**kw)) for k, kw in kwargs_by_id.items()})


config_cases("exactly one of", none={}, both={"density": 0.1, "trainable_ratio": 0.1})
config_cases(r"density must be a number in \(0, 1\]", zero={"density": 0}, above={"density": 1.5},
             negative={"density": -0.1}, nan={"density": float("nan")}, string={"density": "0.1"},
             boolean={"density": True}, inf={"density": float("inf")})
config_cases(r"trainable_ratio must be a number in \(0, 1\]", ratio_zero={"trainable_ratio": 0.0},
             ratio_above={"trainable_ratio": 2}, ratio_list={"trainable_ratio": [0.1]})
config_cases("not a valid regex", bad_regex={"density": 0.1, "target_modules": "q_proj("})
config_cases("non-empty strings", TypeError, target_int={"density": 0.1, "target_modules": ("q_proj", 3)},
             target_empty={"density": 0.1, "target_modules": ("",)},
             target_none={"density": 0.1, "target_modules": (None,)})
config_cases("target_modules must be", empty_targets={"density": 0.1, "target_modules": ()},
             dict_targets={"density": 0.1, "target_modules": {"q_proj": 1}})
config_cases("seed must be an int", TypeError, seed_float={"density": 0.1, "seed": 1.5},
             seed_str={"density": 0.1, "seed": "1"}, seed_bool={"density": 0.1, "seed": True})
config_cases("mode must be one of", mode_typo={"density": 0.1, "mode": "merge"},
             mode_none={"density": 0.1, "mode": None})


def test_numpy_scalars_are_numbers():
    config = RandMaskConfig(density=np.float32(0.25), seed=np.int64(3))
    assert config.density == 0.25 and type(config.density) is float and config.seed == 3 and type(config.seed) is int
    assert randmask.mask_positions((4, 4), np.int64(3), np.uint64(randmask.layer_key(0, "a")))[0].numel() == 3


# ---------------------------------------------------------------------------------------------------- apply
cases("apply", ValueError, "already applied", twice=lambda w: randmask.apply(w.masked, CONFIG))
cases("apply", TypeError, "takes a RandMaskConfig", not_a_config=lambda w: randmask.apply(w.fresh, {"density": 0.1}))
cases("apply", ValueError, "matches no linear layer",
      no_match=lambda w: randmask.apply(w.fresh, RandMaskConfig(density=0.1, target_modules=("nope",))))
cases("apply", ValueError, "not linear layers",
      norm_next_to_linear=lambda w: randmask.apply(
          w.fresh, RandMaskConfig(density=0.1, target_modules=("q_proj", "input_layernorm"))),
      container=lambda w: randmask.apply(w.fresh, RandMaskConfig(density=0.1, target_modules=("mlp",))))
cases("apply", ValueError, "rounds to no trainable value",
      density_rounds_to_zero=lambda w: randmask.apply(w.fresh, RandMaskConfig(density=1e-9)),
      ratio_rounds_to_zero=lambda w: randmask.apply(w.fresh, RandMaskConfig(trainable_ratio=1e-9)))
cases("apply", ValueError, "asks for .* but the targeted matrices hold only",
      ratio_too_large=lambda w: randmask.apply(
          w.fresh, RandMaskConfig(trainable_ratio=0.9, target_modules=("q_proj",))))


@case("apply", "bare_linear_root", ValueError, "this model is itself a Linear.*MaskedLinear.from_linear")
def _(w):
    randmask.apply(nn.Linear(4, 4), CONFIG)


@case("apply", "integer_weight_later", TypeError, "floating-point weight.*int32")
def _(w):
    w.fresh.model.layers[1].mlp.down_proj.weight = nn.Parameter(torch.zeros(32, 64, dtype=torch.int32),
                                                                requires_grad=False)
    try:
        randmask.apply(w.fresh, CONFIG)
    finally:
        w.fresh.model.layers[1].mlp.down_proj.weight = nn.Parameter(tiny_llama().model.layers[1].mlp.down_proj.weight)


def _interrupting_from_linear(calls):
    """MaskedLinear.from_linear that raises KeyboardInterrupt on its `calls`-th call."""
    original = MaskedLinear.from_linear.__func__
    count = [0]

    def patched(cls, *args, **kwargs):
        count[0] += 1
        if count[0] == calls:
            raise KeyboardInterrupt
        return original(cls, *args, **kwargs)
    return classmethod(patched)


@case("apply", "interrupted", KeyboardInterrupt, "^$")
def _(w, monkeypatch):
    monkeypatch.setattr(MaskedLinear, "from_linear", _interrupting_from_linear(5))
    randmask.apply(w.fresh, CONFIG)


def test_an_interrupted_apply_gives_back_the_very_modules(monkeypatch):
    model = tiny_llama()
    modules = dict(model.named_modules())
    monkeypatch.setattr(MaskedLinear, "from_linear", _interrupting_from_linear(4))
    with pytest.raises(KeyboardInterrupt):
        randmask.apply(model, CONFIG)
    assert dict(model.named_modules()) == modules and all(p.requires_grad for p in model.parameters())
    assert not hasattr(model, "randmask_config")


# ---------------------------------------------------------------------------------------------------- the layer
cases("layer", ValueError, "give exactly one of density",
      no_count=lambda w: MaskedLinear(4, 4), both_counts=lambda w: MaskedLinear(4, 4, density=0.1, n=2))
cases("layer", ValueError, r"n must be in \[0, 16\]", n_too_big=lambda w: MaskedLinear(4, 4, n=17),
      n_negative=lambda w: MaskedLinear(4, 4, n=-1))
cases("layer", TypeError, "n must be an int", n_float=lambda w: MaskedLinear(4, 4, n=2.0))
cases("layer", ValueError, "density must be a number", layer_density=lambda w: MaskedLinear(4, 4, density=2.0))
cases("layer", TypeError, "from_linear takes an nn.Linear",
      conv=lambda w: MaskedLinear.from_linear(nn.Conv2d(2, 2, 1), n=1),
      embedding=lambda w: MaskedLinear.from_linear(nn.Embedding(4, 4), n=1))
cases("layer", ValueError, "mode must be one of", layer_mode=lambda w: MaskedLinear(4, 4, n=1, mode="fast"))
cases("layer", ValueError, "last dimension",
      wrong_width=lambda w: w.layer()(torch.randn(2, 31)), scalar_input=lambda w: w.layer()(torch.randn(())))
cases("layer", ValueError, "input is on meta", wrong_device=lambda w: w.layer()(torch.randn(2, 32, device="meta")))


@case("layer", "replace_delta_wrong_shape", TypeError, r"delta must be an fp32 nn.Parameter of shape")
def _(w):
    w.layer().delta = nn.Parameter(torch.zeros(3))


@case("layer", "replace_delta_wrong_dtype", TypeError, r"delta must be an fp32 nn.Parameter")
def _(w):
    w.layer().delta = nn.Parameter(torch.zeros(w.layer().n, dtype=torch.float64))


@case("layer", "replace_delta_by_tensor", TypeError, r"delta must be an fp32 nn.Parameter")
def _(w):
    w.layer().delta = torch.zeros(w.layer().n)


def test_a_replaced_delta_is_used_by_the_next_forward():
    model = randmask.apply(tiny_llama(), CONFIG)
    layer = model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, 32)
    with torch.no_grad():
        before = layer(x)
        layer.delta = nn.Parameter(torch.full((layer.n,), 0.5))
        after = layer(x)
    assert not torch.equal(before, after)
    rows, cols = layer.positions()
    assert torch.equal(layer.weight[rows, cols], (layer.base.float() + 0.5).to(layer.weight.dtype))
    assert randmask.layer.layer_of(layer.delta) is layer


# ---------------------------------------------------------------------------------------------------- state_dict
def _state_of(seed=1, **overrides):
    model = randmask.apply(tiny_llama(), dataclasses.replace(CONFIG, seed=seed, **overrides))
    return model.state_dict()


cases("state_dict", ValueError, "saved from another mask.*same RandMaskConfig",
      other_seed=lambda w: w.masked.load_state_dict(_state_of(seed=2)),
      other_seed_nonstrict=lambda w: w.masked.load_state_dict(_state_of(seed=2), strict=False),
      other_seed_one_layer=lambda w: w.layer().load_state_dict(
          {k.removeprefix("model.layers.0.self_attn.q_proj."): v for k, v in _state_of(seed=2).items()
           if k.startswith("model.layers.0.self_attn.q_proj.")}))
cases("state_dict", ValueError, r"saved from another mask.*n=102.*n=51",
      other_density=lambda w: w.masked.load_state_dict(_state_of(density=0.1)))


def test_a_state_dict_of_the_same_mask_loads_and_restores_the_base():
    source = randmask.apply(tiny_llama(), CONFIG)
    with torch.no_grad():
        for _, layer in randmask.masked_layers(source):
            layer.delta.normal_()
    target = randmask.apply(tiny_llama(), CONFIG)
    target.load_state_dict(source.state_dict())
    x = tokens()
    with torch.no_grad():
        assert torch.equal(target(input_ids=x).logits, source(input_ids=x).logits)
    restored = randmask.restore(target)
    assert all(torch.equal(a, b) for a, b in zip(restored.state_dict().values(), tiny_llama().state_dict().values()))


# ---------------------------------------------------------------------------------------------------- adapters
cases("adapter", AdapterError, "no adapter file",
      missing_file=lambda w: randmask.load_adapter(w.fresh, w.scratch / "x"))
cases("adapter", AdapterError, "not a readable safetensors",
      text_file=lambda w: randmask.load_adapter(w.fresh, w.scratch / "text.safetensors"))
cases("adapter", AdapterError, "is a directory", save_to_dir=lambda w: randmask.save_adapter(w.masked, w.scratch))
cases("adapter", AdapterError, "does not exist",
      save_to_missing_dir=lambda w: randmask.save_adapter(w.masked, w.scratch / "no" / "a.safetensors"))
cases("adapter", AdapterError, "has no masked layers",
      save_unmasked=lambda w: randmask.save_adapter(w.fresh, w.scratch / "a.safetensors"))
cases("adapter", AdapterError, "stores its deltas as",
      save_int_dtype=lambda w: randmask.save_adapter(w.masked, w.scratch / "a.safetensors", dtype=torch.int8),
      save_str_dtype=lambda w: randmask.save_adapter(w.masked, w.scratch / "a.safetensors", dtype="fp8"))
cases("adapter", AdapterError, "another base model",
      other_init=lambda w: randmask.load_adapter(tiny_llama(seed=5), w.adapter))
cases("adapter", AdapterError, "already masked with a different config",
      other_config=lambda w: randmask.load_adapter(
          randmask.apply(tiny_llama(), RandMaskConfig(density=0.05, target_modules="all-linear", seed=9)), w.adapter))
cases("adapter", AdapterError, "float32 base.*bfloat16|bfloat16.*float32",
      other_dtype=lambda w: randmask.load_adapter(tiny_llama().to(torch.bfloat16), w.adapter))
cases("adapter", AdapterError, "header's config is not a valid RandMaskConfig.*not a valid regex",
      stored_bad_regex=lambda w: randmask.load_adapter(w.fresh, w.scratch / "bad_regex.safetensors"))
cases("adapter", AdapterError, "header's config is not a valid RandMaskConfig.*non-empty strings",
      stored_number_targets=lambda w: randmask.load_adapter(w.fresh, w.scratch / "number_targets.safetensors"))
cases("adapter", AdapterError, "header's config is not a valid RandMaskConfig.*target_modules must be",
      stored_no_targets=lambda w: randmask.load_adapter(w.fresh, w.scratch / "no_targets.safetensors"))
cases("adapter", ValueError, "mode must be one of",
      load_bad_mode=lambda w: randmask.load_adapter(w.fresh, w.adapter, mode="both"))


def test_a_nonfinite_delta_is_refused_before_anything_is_written(world):
    with torch.no_grad():
        world.layer().delta[0] = float("nan")
    before = snapshot(world)
    with pytest.raises(AdapterError, match="non-finite values"):
        randmask.save_adapter(world.masked, world.scratch / "existing.safetensors")
    assert_same(snapshot(world), before)  # the weight was not synced with the NaN


@case("adapter", "interrupted_load", KeyboardInterrupt, "^$")
def _(w, monkeypatch):
    monkeypatch.setattr(MaskedLinear, "sync", interrupt_at(MaskedLinear, "sync", calls=3))
    randmask.load_adapter(w.fresh, w.adapter)


@case("adapter", "interrupted_load_into_masked", KeyboardInterrupt, "^$")
def _(w, monkeypatch):
    monkeypatch.setattr(MaskedLinear, "sync", interrupt_at(MaskedLinear, "sync", calls=3))
    randmask.load_adapter(w.masked, w.adapter)


@case("adapter", "interrupted_save", KeyboardInterrupt, "^$")
def _(w, monkeypatch):
    # Ctrl-C while the temporary file is half written: it is removed, the existing file stays as it was
    real = pathlib.Path.write_bytes

    def half_then_interrupt(self, data):
        real(self, data[:len(data) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(pathlib.Path, "write_bytes", half_then_interrupt)
    randmask.save_adapter(w.masked, w.scratch / "existing.safetensors")


@case("adapter", "failed_rename", OSError, "rename failed")
def _(w, monkeypatch):
    def fail(*args):
        raise OSError("rename failed")
    monkeypatch.setattr(os, "replace", fail)
    randmask.save_adapter(w.masked, w.scratch / "existing.safetensors")


def test_an_interrupted_load_gives_back_the_very_modules(adapter_file, monkeypatch):
    model = tiny_llama()
    modules = dict(model.named_modules())
    monkeypatch.setattr(MaskedLinear, "sync", interrupt_at(MaskedLinear, "sync", calls=4))
    with pytest.raises(KeyboardInterrupt):
        randmask.load_adapter(model, adapter_file)
    assert dict(model.named_modules()) == modules and all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_saved_files_have_the_mode_open_gives(tmp_path, umask):
    # readable by the group, as other tools write them (a temporary file is created 0600), and the umask respected
    from randmask.peft import convert  # it writes a PEFT directory the same way

    model = randmask.apply(tiny_llama(), CONFIG)
    previous = os.umask(umask)
    try:
        randmask.save_adapter(model, tmp_path / "adapter.safetensors")
        convert(tmp_path / "adapter.safetensors", tmp_path / "peft")
    finally:
        os.umask(previous)
    want = 0o644 if umask == 0o022 else 0o600
    for path in (tmp_path / "adapter.safetensors", tmp_path / "peft" / "adapter_model.safetensors",
                 tmp_path / "peft" / "adapter_config.json"):
        assert path.stat().st_mode & 0o777 == want, path


def test_concurrent_saves_leave_one_whole_file(tmp_path):
    models = []
    for seed in range(4):
        model = randmask.apply(tiny_llama(), CONFIG)
        with torch.no_grad():
            for _, layer in randmask.masked_layers(model):
                layer.delta.fill_(seed + 1)
        models.append(model)
    path = tmp_path / "shared.safetensors"
    errors = []

    def save(model):
        try:
            for _ in range(5):
                randmask.save_adapter(model, path)
        except Exception as exc:  # noqa: BLE001 (collected, asserted below)
            errors.append(exc)

    threads = [threading.Thread(target=save, args=(m,)) for m in models]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert [p.name for p in tmp_path.iterdir()] == ["shared.safetensors"]  # no temporary left behind
    loaded = randmask.load_adapter(tiny_llama(), path)
    values = {float(layer.delta.detach()[0]) for _, layer in randmask.masked_layers(loaded)}
    assert len(values) == 1 and values <= {1.0, 2.0, 3.0, 4.0}  # one whole save, not a mix


# ---------------------------------------------------------------------------------------------------- optimizer
def opt_cases(match, exception=ValueError, **kwargs_by_id):
    cases("optimizer", exception, match,
          **{k: (lambda w, kw=kw: MaskedAdamW(w.masked.parameters(), **kw)) for k, kw in kwargs_by_id.items()})


opt_cases("Invalid learning rate", lr_negative={"lr": -1.0})
opt_cases("Invalid epsilon", eps_negative={"eps": -1e-8})
opt_cases("Invalid beta parameter at index 0", beta1_one={"betas": (1.0, 0.9)})
opt_cases("Invalid beta parameter at index 1", beta2_negative={"betas": (0.9, -0.1)})
opt_cases("Invalid weight_decay", wd_negative={"weight_decay": -0.1})
opt_cases("betas must be a pair", TypeError, betas_triple={"betas": (0.9, 0.99, 0.999)})
opt_cases("lr must be a real number", TypeError, lr_string={"lr": "1e-3"})
opt_cases("does not support amsgrad", TypeError, amsgrad={"amsgrad": True})
opt_cases("does not support fused", TypeError, fused={"fused": True})
opt_cases("unexpected keyword arguments: momentum", TypeError, typo={"momentum": 0.9})


# ---------------------------------------------------------------------------------------------------- mask functions
cases("mask", TypeError, "key must be an unsigned 64-bit int",
      float_key=lambda w: randmask.mask_positions((4, 4), 2, 1.5),
      str_key=lambda w: randmask.mask_positions((4, 4), 2, "1"),
      slots_float_key=lambda w: randmask.mask_slots(torch.tensor([0]), torch.tensor([0]), (4, 4), 2, 0.5))
cases("mask", ValueError, "key must be an unsigned 64-bit int",
      negative_key=lambda w: randmask.mask_positions((4, 4), 2, -1),
      huge_key=lambda w: randmask.MatrixMask((4, 4), 2, 2**64))
cases("mask", ValueError, "shape must be", bad_shape=lambda w: randmask.mask_positions((4, -1), 1, 0),
      three_d=lambda w: randmask.mask_positions((4, 4, 4), 1, 0))
cases("mask", ValueError, "positions outside",
      slots_outside=lambda w: randmask.mask_slots(torch.tensor([4]), torch.tensor([0]), (4, 4), 2, 0))
cases("mask", TypeError, "seed must be an int", key_seed_float=lambda w: randmask.layer_key(1.0, "a"))
cases("mask", TypeError, "name must be a str", key_name_int=lambda w: randmask.layer_key(1, 3))


# ---------------------------------------------------------------------------------------------------- merge / restore
cases("merge", AdapterError, "no masked layers", merge_unmasked=lambda w: randmask.merge(w.fresh),
      restore_unmasked=lambda w: randmask.restore(w.fresh))
cases("merge", ValueError, "dtype must be a floating-point", merge_int_dtype=lambda w: randmask.merge(
    w.masked, dtype=torch.int8))


cases("merge", ValueError, "dtype must be a floating-point", merge_str_dtype=lambda w: randmask.merge(
    w.masked, dtype="bfloat16"))
cases("apply", ValueError, "meta device.*load the weights first",
      meta_model=lambda w: randmask.apply(LlamaForCausalLM._from_config(w.fresh.config, torch_dtype=torch.float32)
                                          .to("meta"), CONFIG))
cases("adapter", AdapterError, "no randmask_config",
      save_handmade=lambda w: randmask.save_adapter(nn.Sequential(MaskedLinear(4, 4, n=2)), w.scratch / "a"))
cases("adapter", AdapterError, "no adapter file",
      header_missing=lambda w: randmask.read_adapter_header(w.scratch / "a"))
cases("adapter", AdapterError, "directory without a readable adapter_config.json",
      peft_directory_missing=lambda w: randmask.read_adapter_header(w.scratch))
cases("adapter", AdapterError, "not a randmask adapter",
      foreign_safetensors=lambda w: randmask.load_adapter(w.fresh, w.scratch / "plain.safetensors"))
cases("optimizer", ValueError, "empty parameter list", no_params=lambda w: MaskedAdamW([]))
cases("optimizer", ValueError, "Invalid learning rate",
      group_lr=lambda w: MaskedAdamW([w.layer().delta]).add_param_group({"params": [w.fresh.lm_head.weight],
                                                                        "lr": -1}))
cases("mask", ValueError, "density must be a number", count_density=lambda w: randmask.count_for_density((4, 4), 1.5))
cases("mask", ValueError, "same shape", slots_shapes=lambda w: randmask.mask_slots(torch.tensor([0, 1]),
                                                                                   torch.tensor([0]), (4, 4), 2, 0))
cases("mask", TypeError, "integer tensors",
      slots_float=lambda w: randmask.mask_slots(torch.tensor([0.0]), torch.tensor([0.0]), (4, 4), 2, 0))
cases("layer", TypeError, "floating-point weight",
      int_linear=lambda w: MaskedLinear.from_linear(_int_linear(), n=1))


def _int_linear():
    linear = nn.Linear(4, 4)
    linear.weight = nn.Parameter(torch.zeros(4, 4, dtype=torch.int64), requires_grad=False)
    return linear


# ---------------------------------------------------------------------------------------------------- the CLI
class CliError(Exception):
    """`randmask ...` exited with status 2 and one error line."""


def run_cli(*argv):
    from randmask.recipes.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            main([str(a) for a in argv])
        except SystemExit as exc:
            lines = err.getvalue().splitlines()
            if exc.code == 2 and len(lines) == 1 and lines[0].startswith("randmask "):
                raise CliError(lines[0]) from None
            raise AssertionError(f"exit status {exc.code}, stderr {err.getvalue()!r}") from None
    raise AssertionError("the command succeeded")


def cli_cases(match, **argv_by_id):
    """Each argv may name world paths: {scratch}, {adapter}."""
    cases("cli", CliError, match, **{
        k: (lambda w, argv=argv: run_cli(*[a.format(scratch=w.scratch, adapter=w.adapter) for a in argv]))
        for k, argv in argv_by_id.items()})


cli_cases("--threads must be at least 1", threads_negative=["finetune", "--threads", "-1"])
cli_cases("exists and is not a directory",
          output_dir_file=["finetune", "--output-dir", "{scratch}/existing.safetensors"])
cli_cases("unknown method 'ia3'", method_unknown=["finetune", "--method", "ia3"])
cli_cases("a method is listed twice", method_twice=["finetune", "--method", "randmask,randmask"])
cli_cases("--lr must be a number", lr_word=["finetune", "--lr", "fast"])
cli_cases("--lr must be positive", lr_negative=["finetune", "--lr", "-1"])
cli_cases("--density must be in", density_above_one=["finetune", "--density", "2"])
cli_cases("--trainable-ratio must be in", ratio_zero=["finetune", "--trainable-ratio", "0"])
cli_cases("not allowed with", density_and_ratio=["finetune", "--density", "0.1", "--trainable-ratio", "0.1"])
cli_cases("argument --dtype: invalid choice", dtype_unknown=["finetune", "--dtype", "int4"])
cli_cases("invalid choice", quantize_unknown=["finetune", "--quantize", "3bit"])
cli_cases("cannot train a --quantize|trains the weights themselves",
          full_on_4bit=["finetune", "--method", "full", "--quantize", "4bit"])
cli_cases("--clip must be", clip_negative=["finetune", "--clip", "-1"])
cli_cases("model directory .* does not exist", model_missing=["finetune", "--model", "{scratch}/nothing"])
cli_cases("is a file", model_file=["finetune", "--model", "{scratch}/existing.safetensors"])
cli_cases("no config.json", model_empty_dir=["finetune", "--model", "{scratch}"])
cli_cases("apply to --data FILE", column_without_data=["finetune", "--text-column", "sentence"])
cli_cases("expected LABEL=WORD pairs", verbalizers_unpaired=["finetune", "--verbalizers", "spam,ham"])
cli_cases("two or more different labels", verbalizers_one=["finetune", "--verbalizers", "spam=yes"])
cli_cases("--task sft needs", sft_without_data=["finetune", "--task", "sft"])
cli_cases("apply to --task classify",
          sft_with_verbalizers=["finetune", "--task", "sft", "--data", "{scratch}/x.jsonl", "--verbalizers",
                                "a=b,c=d"])
cli_cases("invalid int value", epochs_word=["finetune", "--epochs", "two"])
cli_cases("no adapter file", to_peft_missing=["to-peft", "{scratch}/missing.safetensors", "{scratch}/peft"])
cli_cases("not a readable safetensors", to_peft_corrupt=["to-peft", "{scratch}/text.safetensors", "{scratch}/peft"])
cli_cases("not a randmask adapter", to_peft_foreign=["to-peft", "{scratch}/plain.safetensors", "{scratch}/peft"])
cli_cases("File exists|Not a directory", to_peft_onto_a_file=["to-peft", "{adapter}", "{scratch}/existing.safetensors"])


# ---------------------------------------------------------------------------------------------------- determinism
def _train_deltas(threads: int) -> list[torch.Tensor]:
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model = randmask.apply(tiny_llama(), CONFIG)
        optimizer = MaskedAdamW(model.parameters(), lr=1e-2)
        for step in range(3):
            batch = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(step))
            model(input_ids=batch, labels=batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        return [layer.delta.detach().clone() for _, layer in randmask.masked_layers(model)]
    finally:
        torch.set_num_threads(previous)


def test_training_is_bitwise_repeatable_at_any_thread_count():
    one, again, two = _train_deltas(1), _train_deltas(1), _train_deltas(2)
    assert all(torch.equal(bits(a), bits(b)) for a, b in zip(one, again))
    assert all(torch.equal(bits(a), bits(b)) for a, b in zip(one, two))


def test_masks_are_the_same_in_another_process():
    code = ("import randmask, hashlib; from randmask.mask import mask_positions; "
            "r, c = mask_positions((192, 576), 1000, randmask.layer_key(1, 'model.layers.0.self_attn.q_proj')); "
            "print(hashlib.sha256(r.numpy().tobytes() + c.numpy().tobytes()).hexdigest())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "RANDMASK_BACKEND": "torch"})
    assert out.returncode == 0, out.stderr[-2000:]
    r, c = randmask.mask_positions((192, 576), 1000, randmask.layer_key(1, "model.layers.0.self_attn.q_proj"))
    assert out.stdout.strip().splitlines()[-1] == hashlib.sha256(r.numpy().tobytes() + c.numpy().tobytes()).hexdigest()


# ---------------------------------------------------------------------------------------------------- the runner
@pytest.mark.parametrize("call,exception,match", CASES)
def test_a_bad_input_is_a_clear_error_and_changes_nothing(call, exception, match, world, monkeypatch):
    before = snapshot(world)
    with pytest.raises(exception, match=match):
        call(world, monkeypatch) if "monkeypatch" in call.__code__.co_varnames else call(world)
    monkeypatch.undo()
    assert_same(snapshot(world), before)


def test_there_are_at_least_a_hundred_cases():
    assert len(CASES) >= 100, len(CASES)


# ---------------------------------------------------------------------------------------------------- FSDP2
@pytest.mark.parametrize("kind", ["conv1d", "4bit"])
def test_fsdp2_refuses_layers_it_cannot_shard_before_changing_anything(kind):
    """randmask.distributed.fully_shard on GPT-2's Conv1D (a transposed, non-contiguous weight) or a bitsandbytes
    4-bit base: a clear error naming the layer and DDP as the way, and no module sharded (no process group needed:
    it is refused first)."""
    from torch.distributed.fsdp import FSDPModule

    import randmask.distributed

    if kind == "conv1d":
        from test_model import tiny_gpt2

        model = randmask.apply(tiny_gpt2(), RandMaskConfig(density=0.05, target_modules=("c_attn",)))
        blocks, match = model.transformer.h, "'transformer.h.0.attn.c_attn' is a transformers Conv1D"
    else:
        from test_quantized import quantize_model
        from test_quantized import tiny_llama as tiny_quantizable

        model = randmask.apply(quantize_model(tiny_quantizable(), "nf4"), RandMaskConfig(density=0.05))
        blocks, match = model.model.layers, "'model.layers.0.self_attn.q_proj' is quantized by bitsandbytes"
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match + ".*DDP"):
        randmask.distributed.fully_shard(model, blocks)
    assert not any(isinstance(m, FSDPModule) for m in model.modules())
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
