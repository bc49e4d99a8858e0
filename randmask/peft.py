"""randmask as a PEFT method: peft.get_peft_model, save_pretrained / PeftModel.from_pretrained, several adapters on
one base, disable_adapter, merge_and_unload / unload, and transformers' Trainer or TRL unchanged.

register() adds randmask to the installed PEFT's method tables under the string peft_type "RANDMASK"
(peft.PEFT_TYPE_TO_CONFIG_MAPPING, peft.PEFT_TYPE_TO_TUNER_MAPPING, peft.mapping.PEFT_TYPE_TO_PREFIX_MAPPING: what
peft.utils.register_peft_method fills for PEFT's own methods, which refuses names outside PEFT's PeftType enum).
Importing this module registers; `import randmask` alone imports no PEFT and registers nothing.

Per targeted layer, RandMaskLayer keeps the base module and, per adapter, the mask (from the adapter's seed and the
layer's name, as randmask.apply picks it), `randmask_delta[adapter]` (fp32, n: the only trainable values) and the
original values at the mask (`randmask_base[adapter]`). One adapter is active at a time.
  merged mode (plain weights): the base weight holds round(W0 + delta) of the active adapter at its positions, so the
    forward is a plain linear with randmask's masked-gradient backward. Switching adapters writes W0 back at the old
    adapter's n positions and the new adapter's values at its own (O(n), no dense copy); disabling writes W0 back.
  additive mode (quantized bases): y = base(x) + S(delta) x; switching writes nothing.

Files (save_pretrained): adapter_config.json, the config with, in `randmask_adapter`, the header of randmask's own
adapter format (layer names, keys, shapes, n, base fingerprint, checksums; see randmask/adapter.py), and
adapter_model.safetensors with one `<layer>.randmask_delta` per layer (4n bytes, no index). Loading checks the layers
and the base model before it changes anything, and the tensors' checksums before it keeps them.
"""
import dataclasses
import json
import os
import pathlib
import warnings
import weakref

import peft
import peft.mapping
import torch
import torch.nn as nn
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_adapters_to_merge

from randmask import adapter as adapter_file
from randmask import ops, quantized
from randmask.layer import (
                            _register,
                            dense_view,
                            is_conv1d,
                            keep_base_training,
                            layer_of,
                            masked_linear,
                            resolve_mode,
                            sparse_add,
                            write_base,
)
from randmask.mask import MatrixMask, layer_key, mask_slots
from randmask.model import RandMaskConfig, count_parameters, plan

__all__ = ["PEFT_TYPE", "RandMaskLayer", "RandMaskModel", "RandMaskPeftConfig", "convert", "register"]

PEFT_TYPE = "RANDMASK"
PREFIX = "randmask_"
_PEFT_FIELDS = [field for field in dataclasses.fields(peft.PeftConfig)]


@dataclasses.dataclass(init=False)
class RandMaskPeftConfig(RandMaskConfig, peft.PeftConfig):
    """RandMaskConfig as a peft.PeftConfig (what RandMaskConfig(...) builds once register() has run). Takes
    RandMaskConfig's arguments (positional ones in its order) and PEFT's own by keyword (task_type,
    inference_mode, ...). `randmask_adapter`: the header of the last save_pretrained (or of the loaded adapter),
    which loading checks against the base model."""
    randmask_adapter: dict | None = None

    def __init__(self, *args, randmask_adapter=None, **kwargs):
        for field in _PEFT_FIELDS:
            default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
            setattr(self, field.name, kwargs.pop(field.name, default))
        self.randmask_adapter = randmask_adapter
        RandMaskConfig.__init__(self, *args, **kwargs)  # validates, then runs __post_init__ below

    def __post_init__(self):
        RandMaskConfig.__post_init__(self)
        peft.PeftConfig.__post_init__(self)
        self.peft_type = PEFT_TYPE

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data.update(RandMaskConfig.to_dict(self))
        return data


def register() -> None:
    """Register randmask with the installed PEFT (idempotent), and make RandMaskConfig(...) build the PEFT twin."""
    peft.PEFT_TYPE_TO_CONFIG_MAPPING[PEFT_TYPE] = RandMaskPeftConfig
    peft.PEFT_TYPE_TO_TUNER_MAPPING[PEFT_TYPE] = RandMaskModel
    peft.mapping.PEFT_TYPE_TO_PREFIX_MAPPING[PEFT_TYPE] = PREFIX
    RandMaskConfig._peft_class = RandMaskPeftConfig


# ---------------------------------------------------------------------------------------------------- the layer
class _Slot:
    """One adapter of a RandMaskLayer as randmask's optimizer step hook and MaskedAdamW see a MaskedLinear: after a
    step they write the merged entries of the adapter the weight holds, and nothing for another adapter."""

    def __init__(self, layer: "RandMaskLayer", adapter: str):
        self.layer, self.adapter = layer, adapter

    @property
    def mode(self) -> str:
        layer = self.layer
        return "merged" if layer.mode == "merged" and layer._written == self.adapter else "not-written"

    @property
    def weight(self):
        return dense_view(self.layer.base_layer)

    @property
    def base(self):
        return self.layer.randmask_base[self.adapter]

    @property
    def delta(self):
        return self.layer.randmask_delta[self.adapter]

    @property
    def mask(self):
        return self.layer.randmask_mask[self.adapter]

    @property
    def n(self):
        return self.mask.n

    @property
    def key(self):
        return self.mask.key

    @property
    def transposed(self):
        return self.layer.transposed

    @property
    def quantization(self):
        return self.layer.quantization

    def mark_synced(self) -> None:
        if self.layer._written == self.adapter:
            self.layer._written_version = self.delta._version


class RandMaskLayer(nn.Module, BaseTunerLayer):
    """A linear layer (nn.Linear, transformers Conv1D, bitsandbytes Linear4bit / Linear8bitLt) with randmask
    adapters. Shares the base module's storage; `name` (relative to the model root) keys each adapter's mask."""
    adapter_layer_names = ("randmask_delta",)
    other_param_names = ("randmask_base", "randmask_mask", "randmask_slot")

    def __init__(self, base_layer: nn.Module, name: str, active_adapters: list[str]):
        super().__init__()
        self.base_layer, self.name = base_layer, name
        self.randmask_delta = nn.ParameterDict()
        self.randmask_base = BufferDict(persistent=False)  # W0 at each adapter's mask; derived from the base model
        self.randmask_mask, self.randmask_slot = {}, {}
        self.mode = None
        self.quantization = quantized.quantization_of(base_layer)
        self.transposed = is_conv1d(base_layer)
        self.out_features, self.in_features = (base_layer.out_features, base_layer.in_features) \
            if self.quantization is not None else tuple(dense_view(base_layer).shape)
        # merged mode: the adapter whose values the base weight holds, (a weak reference to) its delta and its version
        self._written, self._written_delta, self._written_version = None, None, None
        self._disable_adapters = False
        self.merged_adapters = []
        self._active_adapter = list(active_adapters)
        keep_base_training(base_layer)

    def update_layer(self, adapter: str, n: int, seed: int, mode: str, inference_mode: bool = False) -> None:
        mode = resolve_mode(self.base_layer, mode, self.name)
        if self.mode is not None and mode != self.mode:
            raise ValueError(f"layer {self.name!r} runs its adapters in {self.mode} mode; adapter {adapter!r} asks "
                             f"for {mode}: give every adapter of a model the same mode")
        mask = MatrixMask((self.out_features, self.in_features), n, layer_key(seed, self.name))
        with torch.no_grad():
            base = self.original_values(mask)
        self.mode = mode
        self.randmask_mask[adapter] = mask
        self.randmask_base[adapter] = base
        self.randmask_delta[adapter] = nn.Parameter(torch.zeros(n, dtype=torch.float32, device=base.device))
        self.randmask_slot[adapter] = _Slot(self, adapter)
        _register(self.randmask_slot[adapter])
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def original_values(self, mask: MatrixMask) -> torch.Tensor:
        """The base model's values W0 at `mask`'s positions (a new tensor), whichever adapter the weight holds."""
        values = ops.gather_weight(dense_view(self.base_layer), mask).clone()
        if self._written is not None and mask.n:
            written = self.randmask_mask[self._written]
            rows, cols = mask.positions(values.device)
            slots = mask_slots(rows, cols, written.shape, written.n, written.key)
            hit = slots >= 0
            values[hit] = self.randmask_base[self._written][slots[hit]]
        return values

    @torch.no_grad()
    def _place(self, adapter: str | None) -> None:
        """Merged mode: make the base weight hold W0 + delta of `adapter` (None: W0), touching only the masked
        entries of the adapter it held and of `adapter`."""
        if self.mode != "merged":
            return
        delta = self.randmask_delta[adapter] if adapter is not None else None
        if delta is not None and delta.is_meta:  # PEFT's low_cpu_mem_usage: the values come with the load
            return
        if self._written == adapter and (delta is None or (self._written_delta() is delta
                                                           and delta._version == self._written_version)):
            return
        weight = dense_view(self.base_layer)
        if self._written is not None and self._written != adapter:
            write_base(weight, self.randmask_base[self._written], self.randmask_mask[self._written])
            self._written = None
        if delta is not None:
            if delta.numel():
                ops.sparse_update(weight, self.randmask_base[adapter], delta, self.randmask_mask[adapter])
            self._written, self._written_delta, self._written_version = adapter, weakref.ref(delta), delta._version
            if layer_of(delta) is not self.randmask_slot[adapter]:  # a new delta Parameter (a load with assign=True)
                _register(self.randmask_slot[adapter])

    def _active(self) -> str | None:
        active = [a for a in self.active_adapters if a in self.randmask_delta]
        return active[0] if active else None

    # ------------------------------------------------------------------ PEFT's adapter management
    def set_adapter(self, adapter_names, inference_mode: bool = False) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        if len(names) > 1:
            raise ValueError(f"randmask runs one adapter at a time, got {names}: activate one, or merge them "
                             "into the base one after another")
        super().set_adapter(names, inference_mode=inference_mode)
        if not self.disable_adapters:
            self._place(self._active())

    def enable_adapters(self, enabled: bool) -> None:
        super().enable_adapters(enabled)
        self._place(self._active() if enabled else None)

    def delete_adapter(self, adapter_name: str) -> None:
        if self._written == adapter_name:
            self._place(None)
        super().delete_adapter(adapter_name)
        if not self.randmask_delta:
            self.mode = None

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device=None) -> None:
        """The device only: delta stays fp32, the base values keep the weight's dtype."""
        device = device if device is not None else self.randmask_base[adapter_name].device
        self.to(device)

    def train(self, mode: bool = True):
        super().train(mode)
        keep_base_training(self.base_layer)
        return self

    def _apply(self, fn, recurse=True):
        # model.to(torch.bfloat16) / .half() must not round the trainable values (as in MaskedLinear)
        deltas = {name: p.data for name, p in self.randmask_delta.items()}
        super()._apply(fn, recurse)
        for name, p in self.randmask_delta.items():
            if p.dtype != torch.float32:
                p.data = deltas[name].to(p.device)
        return self

    # ------------------------------------------------------------------ merge / unload
    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        if len(adapter_names) + len(self.merged_adapters) > 1:
            raise ValueError("randmask merges one adapter into a base layer; unmerge the other first")
        adapter = adapter_names[0]
        if adapter not in self.randmask_delta:
            return
        if safe_merge and not bool(torch.isfinite(self.randmask_delta[adapter]).all()):
            raise ValueError(f"adapter {adapter!r} has non-finite values in layer {self.name!r}; not merged")
        if self.quantization is not None:
            raise ValueError(f"layer {self.name!r} has a {quantized.describe(self.quantization)}, which cannot hold "
                             "W0 + delta; merge_and_unload gives dense layers instead, or keep the adapter active")
        if self.mode == "merged":
            self._place(adapter)
        else:
            with torch.no_grad():
                ops.sparse_update(dense_view(self.base_layer), self.randmask_base[adapter],
                                  self.randmask_delta[adapter], self.randmask_mask[adapter])
        self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        adapter = self.merged_adapters.pop()
        if self.mode == "additive":  # merged mode keeps the values the weight holds; the forward places what is due
            write_base(dense_view(self.base_layer), self.randmask_base[adapter], self.randmask_mask[adapter])

    def unload_and_optionally_merge_module(self, merge: bool, safe_merge: bool, adapter_names) -> nn.Module:
        """What PEFT's merge_and_unload / unload put in this layer's place: the base module with the adapter's
        values merged in (a quantized one as a new dense nn.Linear in its compute dtype), or with W0 bit-exactly."""
        if merge and self.quantization is not None:
            adapter = (check_adapters_to_merge(self, adapter_names) or [None])[0]
            if adapter is None or adapter not in self.randmask_delta:
                return self.base_layer
            return adapter_file.dense_of_quantized(self.base_layer, self.randmask_base[adapter],
                                                   self.randmask_delta[adapter], self.randmask_mask[adapter],
                                                   quantized.dense_dtype(self.base_layer))
        if merge:
            self.merge(safe_merge=safe_merge, adapter_names=adapter_names)
        else:
            while self.merged:
                self.unmerge()
            self._place(None)
        return self.base_layer

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disable_adapters:
            while self.merged:
                self.unmerge()
            self._place(None)
            return self.base_layer(x, *args, **kwargs)
        adapter = self._active()
        if adapter is None or self.merged:
            return self.base_layer(x, *args, **kwargs)
        delta, mask = self.randmask_delta[adapter], self.randmask_mask[adapter]
        if self.mode == "additive":
            y = self.base_layer(x, *args, **kwargs)
            return sparse_add(y, x, delta, mask) if mask.n else y
        if not torch.compiler.is_compiling():
            self._place(adapter)  # after a switch, or delta changed in place outside an optimizer step
        weight, bias = dense_view(self.base_layer), self.base_layer.bias
        if not (delta.requires_grad and torch.is_grad_enabled()):
            return F.linear(x, weight, bias)
        return masked_linear(x, weight, bias, delta, mask)

    def __repr__(self) -> str:
        return "randmask." + super().__repr__()

    def extra_repr(self) -> str:
        adapters = ", ".join(f"{a}: n={m.n}" for a, m in self.randmask_mask.items())
        return f"name={self.name!r}, mode={self.mode}, adapters=({adapters})"


# ---------------------------------------------------------------------------------------------------- the tuner
def _layers(model: nn.Module):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, RandMaskLayer)]


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


class RandMaskModel(BaseTuner):
    """PEFT's tuner for randmask (what get_peft_model builds under the PeftModel). Targets, masks and counts are
    randmask.apply's, computed on the base model (other adapters' layers seen as their base layers)."""
    prefix = PREFIX
    tuner_layer_cls = RandMaskLayer
    target_module_mapping = {}

    def _prepare_adapter_config(self, peft_config, model_config):
        return peft_config

    def _create_and_replace(self, *args, **kwargs):
        raise NotImplementedError("randmask injects its layers in inject_adapter")

    def _replace_module(self, parent, child_name, new_module, child) -> None:
        # unload puts back the base module itself (or a new dense one): nothing to copy over, unlike PEFT's default
        setattr(parent, child_name, new_module)

    def _plan(self, model: nn.Module, config: RandMaskConfig):
        adapter_values = sum(p.numel() for _, layer in _layers(model) for p in layer.randmask_delta.values())
        return plan(model, config, total_params=count_parameters(model) - adapter_values)

    def inject_adapter(self, model: nn.Module, adapter_name: str, autocast_adapter_dtype: bool = True,
                       low_cpu_mem_usage: bool = False, state_dict=None) -> None:
        config = self.peft_config[adapter_name]
        if not isinstance(config, RandMaskPeftConfig):
            raise TypeError(f"randmask's PEFT tuner takes a RandMaskConfig, got {type(config).__name__}")
        planned = self._plan(model, config)  # everything is checked before the model changes
        for name, _, _ in planned:
            module = model.get_submodule(name)
            resolve_mode(module.get_base_layer() if isinstance(module, RandMaskLayer) else module, config.mode, name)
        if config.randmask_adapter is not None:
            _check_saved_adapter(model, config, planned)
        if not hasattr(self, "_flags_before"):
            self._flags_before = [(p, p.requires_grad) for p in model.parameters()]
        try:
            for name, _, n in planned:
                module = model.get_submodule(name)
                if not isinstance(module, RandMaskLayer):
                    module = RandMaskLayer(module, name, self.active_adapters)
                    _set_submodule(model, name, module)
                module.update_layer(adapter_name, n, config.seed, config.mode, inference_mode=config.inference_mode)
                if name not in self.targeted_module_names:
                    self.targeted_module_names.append(name)
            self._mark_only_adapters_as_trainable(model)
        except BaseException:
            self.remove_adapter_layers(adapter_name)
            raise

    def remove_adapter_layers(self, adapter_name: str) -> None:
        """Undo inject_adapter: the adapter's values out of the base, layers left with no adapter unwrapped (the very
        base modules back in place), and the parameters' requires_grad as before the first adapter."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for name, layer in _layers(self.model):
                if adapter_name in layer.randmask_delta:
                    layer.delete_adapter(adapter_name)
                if not layer.randmask_delta:
                    layer._place(None)
                    _set_submodule(self.model, name, layer.base_layer)
                    self.targeted_module_names = [t for t in self.targeted_module_names if t != name]
        if not _layers(self.model):
            for param, flag in getattr(self, "_flags_before", ()):
                param.requires_grad_(flag)

    def set_adapter(self, adapter_name, inference_mode: bool = False) -> None:
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        if len(names) != 1:
            raise ValueError(f"randmask runs one adapter at a time, got {names}")
        super().set_adapter(adapter_name, inference_mode=inference_mode)

    # ------------------------------------------------------------------ files
    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        to_return = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        config.randmask_adapter = _header(model, config, adapter_name)  # written into adapter_config.json next
        return to_return

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        try:
            _check_loaded_tensors(model, config, adapter_name, remapped)
        except adapter_file.AdapterError:
            _tuner_of(model).remove_adapter_layers(adapter_name)
            peft_model = model if hasattr(model, "base_model") else None
            if peft_model is not None and len(peft_model.peft_config) > 1:
                del peft_model.peft_config[adapter_name]
            elif "peft_config" in vars(_tuner_of(model).model):
                del _tuner_of(model).model.peft_config
            raise
        return remapped


def _tuner_of(model: nn.Module) -> RandMaskModel:
    return model if isinstance(model, RandMaskModel) else model.base_model


def _adapter_layers(model: nn.Module, adapter_name: str):
    """(name relative to the base model, layer, slot) of every layer holding the adapter."""
    tuner = _tuner_of(model)
    return [(name, layer, layer.randmask_slot[adapter_name]) for name, layer in _layers(tuner.model)
            if adapter_name in layer.randmask_delta]


def _header(model: nn.Module, config: RandMaskPeftConfig, adapter_name: str) -> dict:
    """randmask's adapter header for one adapter of a PEFT model (without "config": adapter_config.json is it)."""
    layers = [(name, slot) for name, _, slot in _adapter_layers(model, adapter_name)]
    header = adapter_file.header_of(RandMaskConfig.to_dict(config), layers, torch.float32)
    del header["config"]
    return header


def _check_saved_adapter(model: nn.Module, config: RandMaskPeftConfig, planned) -> None:
    """Before injecting a saved adapter: its layers are the ones this config masks here, on the same base."""
    where = f"the adapter of {config.base_model_name_or_path or 'another model'}"
    header = {**config.randmask_adapter, "config": RandMaskConfig.to_dict(config)}
    adapter_file.check_header(header, where)
    entries = adapter_file.layer_entries(header, where)
    adapter_file.compare_layers([(name, shape, n, is_conv1d(_base_of(model, name))) for name, shape, n in planned],
                                entries, config, where)
    adapter_file.check_base(model, entries, header, where)


def _base_of(model: nn.Module, name: str) -> nn.Module:
    module = model.get_submodule(name)
    return module.get_base_layer() if isinstance(module, RandMaskLayer) else module


def _check_loaded_tensors(model, config: RandMaskPeftConfig, adapter_name: str, state_dict: dict) -> None:
    """The loaded deltas: exactly one per layer, fp32 of length n, matching the header's checksums, finite."""
    where = f"adapter {adapter_name!r}"
    header = config.randmask_adapter
    if header is None:
        raise adapter_file.AdapterError(f"{where}: adapter_config.json has no randmask_adapter header (it was not "
                                        "written by randmask's save_pretrained)")
    prefix = "base_model.model." if hasattr(model, "base_model") else ""
    layers = _adapter_layers(model, adapter_name)
    tensors = {f"{name}.delta": state_dict[key] for name, _, _ in layers
               if (key := f"{prefix}{name}.randmask_delta.{adapter_name}") in state_dict}
    extra = sorted(k for k in state_dict if PREFIX in k and not k.endswith(f".randmask_delta.{adapter_name}"))
    if extra:
        raise adapter_file.AdapterError(f"{where}: unexpected tensors {extra[:5]}")
    adapter_file.check_tensors(tensors, adapter_file.layer_entries(header, where), torch.float32, where)


def convert(path, directory) -> None:
    """Write the adapter file `path` (randmask.save_adapter's) as a PEFT directory that PeftModel.from_pretrained
    and randmask.load_adapter read: adapter_config.json and adapter_model.safetensors."""
    header, tensors = adapter_file.read(path)
    if header["delta_dtype"] != "float32":
        raise adapter_file.AdapterError(f"{os.fspath(path)!r} stores {header['delta_dtype']} deltas; a PEFT "
                                        "directory holds float32 ones: save the adapter with dtype=torch.float32")
    config = RandMaskPeftConfig(**header["config"])
    config.randmask_adapter = {k: v for k, v in header.items() if k != "config"}
    os.makedirs(directory, exist_ok=True)
    renamed = {f"{adapter_file.PEFT_KEY_PREFIX}{name.removesuffix('.delta')}.randmask_delta": tensor
               for name, tensor in tensors.items()}
    adapter_file.write_atomically(os.path.join(directory, adapter_file.PEFT_WEIGHTS_NAME),
                                  lambda tmp: pathlib.Path(tmp).write_bytes(
                                      adapter_file.safetensors_bytes(renamed, {"format": "pt"})))
    text = json.dumps(config.to_dict(), indent=2, sort_keys=True)
    adapter_file.write_atomically(os.path.join(directory, adapter_file.PEFT_CONFIG_NAME),
                                  lambda tmp: pathlib.Path(tmp).write_text(text))


register()
