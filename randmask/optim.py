"""MaskedAdamW: AdamW whose step also writes the merged weight entries of every MaskedLinear it trains.

    opt = MaskedAdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    loss.backward(); opt.step(); opt.zero_grad()      # weights are merged: no sync at the next forward

Each step hands every parameter with a gradient to randmask.ops.adamw, which runs, per backend: on CUDA tensors one
Triton launch for all the deltas of a group whose weights share a dtype (AdamW and the merged write fused, positions
from the hash); on CPU tensors with the native library torch's fused multi-tensor AdamW kernel for the whole group in
one call, then each layer's native sparse write; otherwise torch's single-tensor AdamW ops and the write at the
layer's cached positions. Parameters that are no delta (a bias the user unfroze) get the same AdamW math without a
write. The layers are then marked synced.

The result equals a stock torch.optim.AdamW (amsgrad=False, maximize=False) followed by a sync: bitwise on CPU
(the native path runs AdamW(fused=True)'s kernel, the torch twin runs the default single-tensor step's ops in
torch's order), to fp32 rounding on GPU. The per-parameter state has torch's keys and types (`step`: a float32
scalar tensor on the CPU, `exp_avg`, `exp_avg_sq`), so state_dict() and load_state_dict() round-trip and a resumed
run continues identically.
"""
import numbers

import torch
from torch.optim import Optimizer

from randmask import ops
from randmask.layer import layer_of

__all__ = ["MaskedAdamW"]

# torch.optim.AdamW options this optimizer does not implement: refused, never silently ignored.
UNSUPPORTED = ("amsgrad", "maximize", "foreach", "fused", "capturable", "differentiable")


def _scalar(name, value):
    """A hyperparameter as a number: a real number, or a 1-element tensor (torch accepts those for lr and betas)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"Tensor {name} must be 1-element")
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    return value


def _check_group(group: dict) -> None:
    """torch.optim.AdamW's range checks, with its messages, plus type checks."""
    refused = sorted(set(UNSUPPORTED) & set(group))
    if refused:
        raise TypeError(f"MaskedAdamW does not support {', '.join(refused)}: it implements AdamW with "
                        "amsgrad=False and maximize=False in its own fused kernel")
    lr = _scalar("lr", group["lr"])
    eps = _scalar("eps", group["eps"])
    weight_decay = _scalar("weight_decay", group["weight_decay"])
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    beta1, beta2 = (_scalar(f"betas[{i}]", b) for i, b in enumerate(betas))
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}")
    if not 0.0 <= eps:
        raise ValueError(f"Invalid epsilon value: {eps}")
    if not 0.0 <= beta1 < 1.0:
        raise ValueError(f"Invalid beta parameter at index 0: {beta1}")
    if not 0.0 <= beta2 < 1.0:
        raise ValueError(f"Invalid beta parameter at index 1: {beta2}")
    if not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")


def _scalar_dtype() -> torch.dtype:
    """The dtype torch gives AdamW's `step` (torch.optim.optimizer._get_scalar_dtype)."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


class MaskedAdamW(Optimizer):
    """AdamW (decoupled weight decay) that writes the merged weights of the MaskedLinear layers it steps.

    Args: params (an iterable of parameters, e.g. `model.parameters()`, or of param-group dicts; parameters without
    a gradient are skipped, as torch optimizers do), lr, betas, eps, weight_decay: as torch.optim.AdamW.
    amsgrad, maximize, foreach, fused, capturable and differentiable are not accepted (TypeError)."""

    # randmask.layer's global step hook skips this optimizer: its step writes the merged entries itself.
    writes_merged_weights = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, **unsupported):
        if unsupported:  # AdamW options it does not implement, or misspellings: refused, never ignored
            unknown = sorted(set(unsupported) - set(UNSUPPORTED))
            if unknown:
                raise TypeError(f"MaskedAdamW got unexpected keyword arguments: {', '.join(unknown)}")
            _check_group(unsupported)  # only refused AdamW options are left: raises its TypeError
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        _check_group(defaults)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        _check_group({**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}})
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure=None):
        """One AdamW step on every parameter with a gradient; merged weights are written for masked deltas."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, layers = [], []
            for param in group["params"]:
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    raise RuntimeError("MaskedAdamW does not support sparse gradients")
                state = self.state[param]
                if not state:
                    state["step"] = torch.tensor(0.0, dtype=_scalar_dtype())
                    state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                elif not torch.is_tensor(state["step"]):  # a state saved with a plain number
                    state["step"] = torch.tensor(float(state["step"]), dtype=_scalar_dtype())
                state["step"] += 1
                layer = layer_of(param)
                merged = layer is not None and layer.mode == "merged"  # additive layers have no weight to write
                fused_write = merged and ops.row_shard(layer.weight) is None  # a sharded weight: written after
                params.append(ops.AdamWParam(param, param.grad, state["exp_avg"], state["exp_avg_sq"], state["step"],
                                             (layer.weight, layer.base, layer.mask) if fused_write else None))
                if layer is not None:
                    layers.append((layer, merged and not fused_write))
            beta1, beta2 = group["betas"]
            ops.adamw(params, lr=float(group["lr"]), beta1=float(beta1), beta2=float(beta2), eps=float(group["eps"]),
                      weight_decay=float(group["weight_decay"]))
            ops.sparse_update_many([(layer.weight, layer.base, layer.delta, layer.mask) for layer, write in layers
                                    if write])
            for layer, _ in layers:
                layer.mark_synced()
        return loss
