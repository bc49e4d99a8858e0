"""MaskedAdamW: AdamW whose step also writes the merged weight entries of every MaskedLinear it trains.

    opt = MaskedAdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    loss.backward(); opt.step(); opt.zero_grad()      # weights are merged: no sync at the next forward

For each parameter with a gradient:
  - the `delta` of a MaskedLinear (found with randmask.layer.layer_of): the AdamW step on delta, exp_avg and
    exp_avg_sq, and the write weight[r_k, c_k] = round(base_k + delta_k):
      CUDA tensors: one fused pass that also computes the positions from the hash (kernels/masked_adamw.py): the
        Triton kernel, launched once for all the group's deltas whose weights share a dtype, or the CUDA C++ one
        per delta with RANDMASK_BACKEND=cuda;
      CPU, native kernels built (the default): torch's fused multi-tensor AdamW kernel for all the group's deltas in
        one call, then each layer's native sparse write;
      otherwise (RANDMASK_BACKEND=torch): the torch twin, with the layer's cached positions;
    then `layer.mark_synced()` records that the layer needs no sync;
  - any other parameter (a bias the user unfroze, say): the same AdamW math (on CPU with the native kernels, in
    the same fused call), no weight write.

The result equals a stock torch.optim.AdamW (amsgrad=False, maximize=False) followed by a sync: bitwise on CPU
(the native path runs AdamW(fused=True)'s kernel, the torch twin runs the default single-tensor step's ops in
torch's order), to fp32 rounding on GPU. The per-parameter state has torch's keys and types (`step`: a float32
scalar tensor on the CPU, `exp_avg`, `exp_avg_sq`), so state_dict() and load_state_dict() round-trip and a resumed
run continues identically.
"""
import numbers

import torch
from torch.autograd.graph import increment_version
from torch.optim import Optimizer

from randmask.backend import kernel_backend
from randmask.functional import sparse_update
from randmask.kernels import masked_adamw as masked_adamw_op
from randmask.kernels import native as native_op
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
            hyper = {"lr": float(group["lr"]), "beta1": float(group["betas"][0]), "beta2": float(group["betas"][1]),
                     "eps": float(group["eps"]), "weight_decay": float(group["weight_decay"])}
            fused_cpu = []  # (layer or None, param, grad, state): the parameters for torch's fused CPU kernel
            fused_triton = {}  # (device, weight dtype) -> [(layer, delta, grad, state)]: one Triton launch each
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = param.grad
                if grad.is_sparse:
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
                backend = kernel_backend(param.device)
                if backend == "native" and not torch.is_complex(param):
                    fused_cpu.append((layer, param, grad, state))
                elif layer is not None and backend == "triton":
                    fused_triton.setdefault((param.device, layer.weight.dtype), []).append((layer, param, grad, state))
                elif layer is not None:
                    self._masked_step(layer, param, grad, state, state["step"].item(), hyper, backend)
                else:
                    self._plain_step(param, grad, state, state["step"].item(), hyper)
            if fused_cpu:
                self._fused_cpu_step(fused_cpu, hyper)
            for batch in fused_triton.values():
                self._fused_triton_step(batch, hyper)
        return loss

    @staticmethod
    def _fused_cpu_step(batch, hyper) -> None:
        """CPU parameters with the native kernels built: torch's fused multi-tensor AdamW kernel (the one
        AdamW(fused=True) runs: one vectorised pass per tensor where the single-tensor ops make several, and one
        call for the whole group) on all of them, then the native sparse write of each masked layer."""
        layers, params, grads, states = zip(*batch)
        torch._fused_adamw_(list(params), list(grads), [s["exp_avg"] for s in states],
                            [s["exp_avg_sq"] for s in states], [], [s["step"] for s in states], amsgrad=False,
                            lr=hyper["lr"], beta1=hyper["beta1"], beta2=hyper["beta2"],
                            weight_decay=hyper["weight_decay"], eps=hyper["eps"], maximize=False)
        for layer, delta in zip(layers, params):
            if layer is not None:
                sparse_update(layer.weight, layer.base, delta, layer.mask)
                layer.mark_synced()

    @staticmethod
    def _fused_triton_step(batch, hyper) -> None:
        """Masked deltas on the Triton backend whose weights share a device and dtype: the fused step of all of
        them in one launch (per matrix, the work masked_adamw_triton does; one launch instead of one each saves
        the per-launch host time, which bounds a GPU step once the model's own kernels are captured)."""
        masked_adamw_op.masked_adamw_multi_triton(
            [(layer.weight, layer.base, delta, grad, state["exp_avg"], state["exp_avg_sq"], layer.key,
              state["step"].item()) for layer, delta, grad, state in batch], **hyper)
        # The kernel writes through pointers; bump the version counters as the in-place torch ops of the CPU path
        # do, so autograd still catches a graph that saved the old weight being backpropagated later.
        increment_version([t for layer, delta, _, state in batch
                           for t in (delta, layer.weight, state["exp_avg"], state["exp_avg_sq"])])
        for layer, *_ in batch:
            layer.mark_synced()

    @staticmethod
    def _masked_step(layer, delta, grad, state, step, hyper, backend) -> None:
        weight = layer.weight
        args = (weight, layer.base, delta, grad, state["exp_avg"], state["exp_avg_sq"], layer.key)
        if backend == "cuda":
            native_op.masked_adamw_cuda(*args, step=step, **hyper)
            # As in _fused_triton_step: the kernel writes through pointers, the version counters are bumped here.
            increment_version((delta, weight, state["exp_avg"], state["exp_avg_sq"]))
        else:
            masked_adamw_op.masked_adamw_torch(*args, step=step, positions=layer.mask.positions(weight.device),
                                               **hyper)
        layer.mark_synced()

    @staticmethod
    def _plain_step(param, grad, state, step, hyper) -> None:
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        if torch.is_complex(param):  # as torch: complex values step as pairs of reals
            param, grad = torch.view_as_real(param), torch.view_as_real(grad)
            exp_avg, exp_avg_sq = torch.view_as_real(exp_avg), torch.view_as_real(exp_avg_sq)
        masked_adamw_op.adamw_torch(param, grad, exp_avg, exp_avg_sq, step=step, **hyper)
