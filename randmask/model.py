"""Model-level API in PEFT's habits: RandMaskConfig, apply, and what a user reads off a masked model."""
import dataclasses
import numbers
import re
from collections.abc import Iterator
from typing import ClassVar

import torch.nn as nn

from randmask import quantized
from randmask.layer import MODES, MaskedLinear, is_conv1d, resolve_mode

ALL_LINEAR = "all-linear"


@dataclasses.dataclass
class RandMaskConfig:
    """Which matrices to mask and how many values to train.

    density:         fraction of each targeted matrix (n = round(density * out * in) per matrix).
    trainable_ratio: fraction of the WHOLE model's parameters (the paper's "ratio"), spread over the targets at one
                     density; the total is exact: round(trainable_ratio * parameters of the model).
    target_modules:  suffixes of module names ("q_proj" matches "model.layers.0.self_attn.q_proj"), a regex
                     (a str, matched in full against the name), or "all-linear" (every linear layer but the head).
    seed:            with each layer's name relative to the model root, picks that layer's mask.
    mode:            "merged" (W0 + delta written into the weight: no inference overhead), "additive"
                     (y = base(x) + S(delta) x: the base is never written), or "auto": merged for plain
                     floating-point weights, additive for quantized ones (bitsandbytes 4-bit and 8-bit).

    Once randmask.peft.register() has run, RandMaskConfig(...) builds its PEFT twin (a subclass that is also a
    peft.PeftConfig), so the same line configures peft.get_peft_model.
    """
    _peft_class: ClassVar[type | None] = None  # set by randmask.peft.register()

    density: float | None = None
    trainable_ratio: float | None = None
    target_modules: tuple[str, ...] | str = ("q_proj", "v_proj")
    seed: int = 0
    mode: str = "auto"

    def __new__(cls, *args, **kwargs):
        if cls is RandMaskConfig and RandMaskConfig._peft_class is not None and (args or kwargs):
            cls = RandMaskConfig._peft_class  # not for copy/pickle, which call __new__ without arguments
        return super().__new__(cls)

    def __post_init__(self):
        if (self.density is None) == (self.trainable_ratio is None):
            raise ValueError("give exactly one of density (per matrix) and trainable_ratio (of the whole model)")
        for field in ("density", "trainable_ratio"):
            value = getattr(self, field)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 < value <= 1.0:
                raise ValueError(f"{field} must be a number in (0, 1] (a share of the weights to train), got "
                                 f"{value!r}")
            setattr(self, field, float(value))  # numpy scalars included
        if isinstance(self.target_modules, list):
            self.target_modules = tuple(self.target_modules)
        if not isinstance(self.target_modules, (str, tuple)) or not self.target_modules:
            raise ValueError(f"target_modules must be suffixes, a regex or {ALL_LINEAR!r}, got {self.target_modules!r}")
        if isinstance(self.target_modules, tuple) and not all(isinstance(t, str) and t for t in self.target_modules):
            raise TypeError(f"target_modules must be module-name suffixes (non-empty strings), got "
                            f"{self.target_modules!r}")
        if isinstance(self.target_modules, str) and self.target_modules != ALL_LINEAR:
            try:
                re.compile(self.target_modules)  # a bad regex fails here, not halfway through apply
            except re.error as exc:
                raise ValueError(f"target_modules {self.target_modules!r} is not a valid regex: {exc}") from None
        if isinstance(self.seed, numbers.Integral) and not isinstance(self.seed, bool):
            self.seed = int(self.seed)
        else:
            raise TypeError(f"seed must be an int, got {type(self.seed).__name__}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")

    def to_dict(self) -> dict:
        """The randmask fields (a PEFT twin adds PEFT's own in its to_dict; RandMaskConfig.to_dict(c) gives these)."""
        data = {field.name: getattr(self, field.name) for field in dataclasses.fields(RandMaskConfig)}
        if isinstance(self.target_modules, tuple):
            data["target_modules"] = list(self.target_modules)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "RandMaskConfig":
        return cls(**data)

    def __eq__(self, other):
        # by the randmask fields, so that a config equals its PEFT twin (whose own __eq__ defers here for a plain one)
        return self.same_masks(other) if isinstance(other, RandMaskConfig) else NotImplemented

    __hash__ = None  # mutable, as PeftConfig

    def same_masks(self, other: "RandMaskConfig", ignore_mode: bool = False) -> bool:
        """Whether two configs pick the same masks (and, unless ignore_mode, the same mode), PEFT twins included."""
        mine, theirs = RandMaskConfig.to_dict(self), RandMaskConfig.to_dict(other)
        if ignore_mode:
            mine.pop("mode"), theirs.pop("mode")
        return mine == theirs


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def _matrix_shape(module: nn.Module) -> tuple[int, int]:
    """(out, in) of a linear layer's matrix (a 4-bit weight's own shape is its packed storage's)."""
    if quantized.quantization_of(module) is not None:
        return module.out_features, module.in_features
    return tuple(module.weight.t().shape) if is_conv1d(module) else tuple(module.weight.shape)


def _matches(name: str, targets) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == suffix or name.endswith("." + suffix) for suffix in targets)


def _output_head(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return head if head is not None else getattr(model, "lm_head", None)


def linear_candidates(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) of every module, with a wrapper that has a base layer (a PEFT tuner layer, randmask's own
    included) seen as that base layer and its insides skipped: a model with adapters plans as its base model."""
    inside = None
    for name, module in model.named_modules():
        if inside is not None and name.startswith(inside):
            continue
        get_base_layer = getattr(module, "get_base_layer", None)
        if name and callable(get_base_layer):
            inside = name + "."
            yield name, get_base_layer()
        else:
            yield name, module


def find_targets(model: nn.Module, config: RandMaskConfig) -> list[tuple[str, nn.Module]]:
    """(name, module) of every linear layer the config targets, in module order."""
    if _is_linear(model) or isinstance(model, MaskedLinear):
        raise ValueError(f"apply wraps the linear layers inside a model, and this model is itself a "
                         f"{type(model).__name__}; for one layer use randmask.MaskedLinear.from_linear")
    if config.target_modules == ALL_LINEAR:
        head = _output_head(model)
        return [(name, m) for name, m in linear_candidates(model) if _is_linear(m) and m is not head]
    matched = [(name, m) for name, m in linear_candidates(model) if name and _matches(name, config.target_modules)]
    other = [f"{name} ({type(m).__name__})" for name, m in matched if not _is_linear(m)]
    if other:  # as PEFT: a target that cannot be masked is an error, not silently skipped
        raise ValueError(f"target_modules={config.target_modules!r} matches modules that are not linear layers: "
                         f"{other[:4]}{' and more' if len(other) > 4 else ''}; name only nn.Linear / Conv1D layers")
    return matched


def _counts(targets, total_params: int, config: RandMaskConfig) -> list[int]:
    """n per target. With trainable_ratio: one density d = total / sum(sizes); n_i = floor(d * size_i), then the
    remainder goes to the largest fractional parts, so the counts add up to the total exactly."""
    sizes = [quantized.values_in(m.weight) for _, m in targets]
    if config.density is not None:
        return [round(config.density * size) for size in sizes]
    total = round(config.trainable_ratio * total_params)
    if total > sum(sizes):
        raise ValueError(f"trainable_ratio {config.trainable_ratio} asks for {total:,} values, but the targeted "
                         f"matrices hold only {sum(sizes):,}")
    exact = [total * size / sum(sizes) for size in sizes]
    counts = [int(e) for e in exact]
    by_remainder = sorted(range(len(sizes)), key=lambda i: exact[i] - counts[i], reverse=True)
    for i in by_remainder[:total - sum(counts)]:
        counts[i] += 1
    return counts


def plan(model: nn.Module, config: RandMaskConfig,
         total_params: int | None = None) -> list[tuple[str, tuple[int, int], int]]:
    """(name, (out, in), n) for every layer `apply` would mask, without changing the model (works on "meta").
    `total_params`: what trainable_ratio is a share of (default: count_parameters(model))."""
    targets = find_targets(model, config)
    if not targets:
        linear = [name for name, m in linear_candidates(model) if _is_linear(m)]
        raise ValueError(f"target_modules={config.target_modules!r} matches no linear layer; the model's linear "
                         f"layers include {linear[:6]}")
    total_params = count_parameters(model) if total_params is None else total_params
    shapes = [_matrix_shape(m) for _, m in targets]
    counts = _counts(targets, total_params, config)
    if not sum(counts):
        what = f"density {config.density}" if config.density is not None else \
            f"trainable_ratio {config.trainable_ratio} of {total_params:,} parameters"
        raise ValueError(f"{what} rounds to no trainable value in the {len(targets)} targeted matrices; raise it")
    return [(name, shape, n) for (name, _), shape, n in zip(targets, shapes, counts)]


def masked_layers(model: nn.Module) -> Iterator[tuple[str, MaskedLinear]]:
    """(name relative to model, layer) of every masked layer."""
    for name, module in model.named_modules():
        if isinstance(module, MaskedLinear):
            yield name, module


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _check_masks_before_loading(model, state_dict, prefix, *args) -> None:
    # every masked layer's identity is checked before any tensor of the model loads (a layer checks its own too,
    # but only when its turn comes): a state from another mask changes nothing
    for name, layer in masked_layers(model):
        identity = state_dict.get(f"{prefix}{name}{'.' if name else ''}_extra_state")
        if identity is not None:
            layer.check_identity(identity, name)


def forget(model: nn.Module) -> None:
    """Remove what apply attached to the model itself (its config and the state_dict check)."""
    if "randmask_config" in vars(model):
        del model.randmask_config
    handle = vars(model).pop("_randmask_load_check", None)
    if handle is not None:
        handle.remove()


def apply(model: nn.Module, config: RandMaskConfig) -> nn.Module:
    """Replace the targeted nn.Linear / Conv1D layers in place with MaskedLinear (storage shared, no copy), freeze
    every other parameter, key each layer by its name relative to `model`, and return `model`. Every target is
    checked first; on any failure (an interrupt included) the model is given back as it came."""
    apply_undoable(model, config)
    return model


def apply_undoable(model: nn.Module, config: RandMaskConfig):
    """randmask.apply, returning a function that undoes it: the original modules (the very objects) back in place,
    their weights' original values back at the masked positions, and every requires_grad flag as it was."""
    if not isinstance(config, RandMaskConfig):
        raise TypeError(f"apply takes a RandMaskConfig, got {type(config).__name__}")
    if next(masked_layers(model), None) is not None:
        raise ValueError("randmask is already applied to this model (it has MaskedLinear layers); "
                         "use randmask.merge or randmask.restore first")
    layers = plan(model, config)
    for name, _, _ in layers:  # every layer can take the mode, or nothing changes
        resolve_mode(model.get_submodule(name), config.mode, name)
    flags = [(p, p.requires_grad) for p in model.parameters()]
    originals = []

    def undo():
        for name, module in reversed(originals):
            layer = model.get_submodule(name)
            if isinstance(layer, MaskedLinear):
                layer.restore_base()
            _set_submodule(model, name, module)
        for param, flag in flags:
            param.requires_grad_(flag)
        forget(model)

    try:
        model.requires_grad_(False)
        for name, _, n in layers:
            module = model.get_submodule(name)
            layer = MaskedLinear.from_linear(module, n=n, seed=config.seed, name=name, mode=config.mode)
            originals.append((name, module))
            _set_submodule(model, name, layer)
        model.randmask_config = RandMaskConfig.from_dict(RandMaskConfig.to_dict(config))  # a copy the user cannot edit
        model._randmask_load_check = model.register_load_state_dict_pre_hook(_check_masks_before_loading)
    except BaseException:
        undo()
        raise
    return undo


def count_parameters(model: nn.Module) -> int:
    """How many values the model computes with (a bitsandbytes 4-bit weight packs two in a byte: counted unpacked,
    as transformers' num_parameters does); the total `trainable_ratio` is a share of."""
    return sum(quantized.values_in(p) for p in model.parameters())


def count_trainable_parameters(model: nn.Module) -> int:
    """How many values of the model train (for a randmask model: the sum of its layers' n)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def print_trainable_parameters(model: nn.Module) -> str:
    """PEFT's one-line summary; also returned."""
    trainable = count_trainable_parameters(model)
    total = count_parameters(model)
    line = (f"trainable params: {trainable:,} || all params: {total:,} || "
            f"trainable%: {100 * trainable / max(total, 1):.4f}")
    print(line)
    return line
