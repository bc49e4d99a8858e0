"""Model-level API in PEFT's habits: RandMaskConfig, apply, and what a user reads off a masked model."""
import dataclasses
import re
from collections.abc import Iterator

import torch.nn as nn

from randmask.layer import MaskedLinear, is_conv1d

ALL_LINEAR = "all-linear"


@dataclasses.dataclass(frozen=True)
class RandMaskConfig:
    """Which matrices to mask and how many values to train.

    density:         fraction of each targeted matrix (n = round(density * out * in) per matrix).
    trainable_ratio: fraction of the WHOLE model's parameters (the paper's "ratio"), spread over the targets at one
                     density; the total is exact: round(trainable_ratio * parameters of the model).
    target_modules:  suffixes of module names ("q_proj" matches "model.layers.0.self_attn.q_proj"), a regex
                     (a str, matched in full against the name), or "all-linear" (every linear layer but the head).
    seed:            with each layer's name relative to the model root, picks that layer's mask.
    """
    density: float | None = None
    trainable_ratio: float | None = None
    target_modules: tuple[str, ...] | str = ("q_proj", "v_proj")
    seed: int = 0

    def __post_init__(self):
        if (self.density is None) == (self.trainable_ratio is None):
            raise ValueError("give exactly one of density (per matrix) and trainable_ratio (of the whole model)")
        for field in ("density", "trainable_ratio"):
            value = getattr(self, field)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not 0.0 <= value <= 1.0):
                raise ValueError(f"{field} must be a number in [0, 1], got {value!r}")
        if isinstance(self.target_modules, list):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if not isinstance(self.target_modules, (str, tuple)) or not self.target_modules:
            raise ValueError(f"target_modules must be suffixes, a regex or {ALL_LINEAR!r}, got {self.target_modules!r}")
        if isinstance(self.target_modules, str) and self.target_modules != ALL_LINEAR:
            re.compile(self.target_modules)  # a bad regex fails here, not halfway through apply
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise TypeError(f"seed must be an int, got {type(self.seed).__name__}")

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        if isinstance(self.target_modules, tuple):
            data["target_modules"] = list(self.target_modules)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "RandMaskConfig":
        return cls(**data)


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def _matches(name: str, targets) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == suffix or name.endswith("." + suffix) for suffix in targets)


def _output_head(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return head if head is not None else getattr(model, "lm_head", None)


def find_targets(model: nn.Module, config: RandMaskConfig) -> list[tuple[str, nn.Module]]:
    """(name, module) of every linear layer the config targets, in module order."""
    if config.target_modules == ALL_LINEAR:
        head = _output_head(model)
        return [(name, m) for name, m in model.named_modules() if _is_linear(m) and m is not head]
    return [(name, m) for name, m in model.named_modules() if _is_linear(m) and _matches(name, config.target_modules)]


def _counts(targets, total_params: int, config: RandMaskConfig) -> list[int]:
    """n per target. With trainable_ratio: one density d = total / sum(sizes); n_i = floor(d * size_i), then the
    remainder goes to the largest fractional parts, so the counts add up to the total exactly."""
    sizes = [m.weight.numel() for _, m in targets]
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


def plan(model: nn.Module, config: RandMaskConfig) -> list[tuple[str, tuple[int, int], int]]:
    """(name, (out, in), n) for every layer `apply` would mask, without changing the model (works on "meta")."""
    targets = find_targets(model, config)
    if not targets:
        linear = [name for name, m in model.named_modules() if _is_linear(m)]
        raise ValueError(f"target_modules={config.target_modules!r} matches no linear layer; the model's linear "
                         f"layers include {linear[:6]}")
    total_params = sum(p.numel() for p in model.parameters())
    shapes = [tuple(m.weight.t().shape) if is_conv1d(m) else tuple(m.weight.shape) for _, m in targets]
    return [(name, shape, n) for (name, _), shape, n in zip(targets, shapes, _counts(targets, total_params, config))]


def masked_layers(model: nn.Module) -> Iterator[tuple[str, MaskedLinear]]:
    """(name relative to model, layer) of every masked layer."""
    for name, module in model.named_modules():
        if isinstance(module, MaskedLinear):
            yield name, module


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def apply(model: nn.Module, config: RandMaskConfig) -> nn.Module:
    """Replace the targeted nn.Linear / Conv1D layers in place with MaskedLinear (storage shared, no copy), freeze
    every other parameter, key each layer by its name relative to `model`, and return `model`."""
    if not isinstance(config, RandMaskConfig):
        raise TypeError(f"apply takes a RandMaskConfig, got {type(config).__name__}")
    if next(masked_layers(model), None) is not None:
        raise ValueError("randmask is already applied to this model (it has MaskedLinear layers); "
                         "use randmask.merge or randmask.restore first")
    layers = plan(model, config)
    model.requires_grad_(False)
    for name, _, n in layers:
        _set_submodule(model, name, MaskedLinear.from_linear(model.get_submodule(name), n=n, seed=config.seed,
                                                             name=name))
    model.randmask_config = config
    return model


def count_trainable_parameters(model: nn.Module) -> int:
    """How many values of the model train (for a randmask model: the sum of its layers' n)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def print_trainable_parameters(model: nn.Module) -> str:
    """PEFT's one-line summary; also returned."""
    trainable = count_trainable_parameters(model)
    total = sum(p.numel() for p in model.parameters())
    line = (f"trainable params: {trainable:,} || all params: {total:,} || "
            f"trainable%: {100 * trainable / max(total, 1):.4f}")
    print(line)
    return line
