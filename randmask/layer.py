"""MaskedLinear: a drop-in nn.Linear whose only trainable values are n seed-addressed entries of its weight."""
import math
import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.weak import WeakIdKeyDictionary

from randmask.addressing import MatrixMask, count_for_density, layer_key, mask_positions
from randmask.functional import gather_weight, masked_linear, sparse_update, sparse_update_many

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2), recognised without importing transformers."""
    return type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None and \
        module.weight.dim() == 2 and hasattr(module, "nf")

# After any torch optimizer's step, the layers whose deltas it holds write their merged entries. This cannot be left
# to the forward's version check alone: a fused optimizer (AdamW(fused=True)) does not bump version counters, and a
# compiled forward does no eager checks. An optimizer that writes the merged entries itself
# (randmask.optim.MaskedAdamW) sets `writes_merged_weights` and calls `mark_synced()` instead.
# The layers' writes go together (sparse_update_many: one launch per device and dtype on the Triton backend).
@torch.no_grad()
def _sync_after_step(optimizer, args, kwargs):
    if getattr(optimizer, "writes_merged_weights", False):
        return
    layers = [layer for group in optimizer.param_groups for layer in map(layer_of, group["params"])
              if layer is not None]
    sparse_update_many([(layer.weight, layer.base, layer.delta, layer.mask) for layer in layers if layer.n])
    for layer in layers:
        layer.mark_synced()


register_optimizer_step_post_hook(_sync_after_step)

# delta parameter -> weakref to its layer, so an optimizer given only parameters can find a delta's layer.
_LAYER_OF_DELTA = WeakIdKeyDictionary()


def _register(layer) -> None:
    _LAYER_OF_DELTA[layer.delta] = weakref.ref(layer)


def layer_of(delta: torch.Tensor):
    """The MaskedLinear whose `delta` this is, or None."""
    ref = _LAYER_OF_DELTA.get(delta)
    layer = ref() if ref is not None else None
    return layer if layer is not None and layer.delta is delta else None


def _resolve_count(shape, density, n) -> int:
    if (density is None) == (n is None):
        raise ValueError("give exactly one of density (fraction of the matrix) and n (number of trainable values)")
    return count_for_density(shape, density) if n is None else n


class MaskedLinear(nn.Module):
    """y = x W^T + b where W = W0 + delta at n fixed positions chosen by (seed, name); everything else frozen.

    `weight` holds the merged values: W0 outside the mask (bitwise untouched) and round(W0_k + delta[k]) at the mask,
    so the forward pass is a plain F.linear. `delta` (fp32, starts at 0) is the only trainable parameter; `base`
    keeps the n original values W0_k in the weight's dtype. After any torch optimizer's step the merged entries are
    written at once; other in-place changes of `delta` are caught by the next eager forward through its version
    counter. A change made through `delta.data` bypasses that counter: call `sync()` after one.
    """

    def __init__(self, in_features, out_features, bias=True, *, density=None, n=None, seed=0, name="",
                 device=None, dtype=None):
        super().__init__()
        self.transposed = False  # True when wrapping a Conv1D: weight is a transposed view of its (in, out) storage
        factory = {"device": device, "dtype": dtype}
        weight = torch.empty(out_features, in_features, **factory)
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))  # nn.Linear's initialisation
        bias_param = None
        if bias:
            bias_param = torch.empty(out_features, **factory)
            bound = 1 / math.sqrt(in_features) if in_features > 0 else 0
            nn.init.uniform_(bias_param, -bound, bound)
        self._attach(weight, bias_param, density=density, n=n, seed=seed, name=name)

    @classmethod
    def from_linear(cls, linear: nn.Module, *, density=None, n=None, seed=0, name="") -> "MaskedLinear":
        """Wrap an existing nn.Linear, or a transformers Conv1D (GPT-2's transposed (in, out) layout), reusing its
        weight and bias storage (no copy of the dense weight).

        The original module's parameters are frozen and, since the storage is shared, see the merged weights too.
        For a Conv1D the mask addresses the logical (out, in) matrix, a transposed view of its weight."""
        if isinstance(linear, nn.Linear):
            weight, transposed = linear.weight, False
        elif is_conv1d(linear):
            weight, transposed = linear.weight.detach().t(), True
        else:
            raise TypeError(f"from_linear takes an nn.Linear or a transformers Conv1D, got {type(linear).__name__}")
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.transposed = transposed
        layer._attach(weight, linear.bias, density=density, n=n, seed=seed, name=name)
        return layer

    def _attach(self, weight, bias, *, density, n, seed, name):
        if weight.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"MaskedLinear needs a floating-point weight, got {weight.dtype}")
        self.out_features, self.in_features = weight.shape
        self.seed, self.name = seed, name
        self.mask = MatrixMask(tuple(weight.shape), _resolve_count(tuple(weight.shape), density, n),
                               layer_key(seed, name))
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight)
        self.weight.requires_grad_(False)
        if bias is not None:
            self.bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias)
            self.bias.requires_grad_(False)
        else:
            self.register_parameter("bias", None)
        with torch.no_grad():
            self.register_buffer("base", gather_weight(self.weight, self.mask).clone())
        self.delta = nn.Parameter(torch.zeros(self.mask.n, dtype=torch.float32, device=weight.device))
        _register(self)
        self.mark_synced()

    def __setstate__(self, state):
        super().__setstate__(state)  # copy.deepcopy and unpickling: register the copy's own delta
        _register(self)

    def _apply(self, fn, recurse=True):
        # model.to(torch.bfloat16) / .half() must not round the trainable values: delta stays fp32, follows the device.
        delta = self.delta.data
        super()._apply(fn, recurse)
        if self.delta.dtype != torch.float32:
            self.delta.data = delta.to(self.delta.device)
        return self

    # ------------------------------------------------------------------ what a user reads
    @property
    def n(self) -> int:
        return self.mask.n

    @property
    def density(self) -> float:
        return self.mask.density

    @property
    def key(self) -> int:
        return self.mask.key

    def positions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, cols) of the trainable values in slot order: delta[k] belongs to weight[rows[k], cols[k]]."""
        return mask_positions(self.mask.shape, self.n, self.key, self.weight.device)

    # ------------------------------------------------------------------ training
    @torch.no_grad()
    def sync(self) -> None:
        """Write round(W0_k + delta[k]) into the weight's masked entries."""
        if self.n:
            sparse_update(self.weight, self.base, self.delta, self.mask)
        self.mark_synced()

    def mark_synced(self) -> None:
        """Record that `weight` holds round(base + delta) for the current delta (after sync, or after an optimizer
        that wrote the merged entries itself)."""
        self._synced_version = self.delta._version

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1:] != (self.in_features,):
            raise ValueError(f"input's last dimension is {tuple(x.shape[-1:])}, MaskedLinear expects "
                             f"{self.in_features} (input shape {tuple(x.shape)})")
        if x.device != self.weight.device:
            raise ValueError(f"input is on {x.device}, MaskedLinear's weight is on {self.weight.device}")
        if not torch.compiler.is_compiling() and self.delta._version != self._synced_version:
            self.sync()  # delta changed in place outside an optimizer step (load_state_dict, a no_grad edit)
        if not (self.delta.requires_grad and torch.is_grad_enabled()):
            return F.linear(x, self.weight, self.bias)  # inference: nothing to route back
        return masked_linear(x, self.weight, self.bias, self.delta, self.mask)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"n={self.n}, density={self.density:.3g}, seed={self.seed}, name={self.name!r}")
