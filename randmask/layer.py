"""The autograd Function and MaskedLinear: a drop-in nn.Linear whose only trainable values are n seed-addressed
entries of its weight (the data path's third step: the masks come from randmask/mask.py, the kernels through
randmask/ops.py).

    forward:  y = x W^T + b                 W already holds W0 + delta at the masked positions (merged in place)
    backward: grad_x     = grad_y W         dense matmul
              grad_delta = masked_grad(x, grad_y)     fp32, length n, no out x in temporary
    step:     any torch optimizer updates delta; a post-step hook writes round(W0_k + delta[k]) into the weight
"""
import math
import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.weak import WeakIdKeyDictionary

from randmask import ops
from randmask.mask import MatrixMask, count_for_density, layer_key, mask_positions

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2), recognised without importing transformers."""
    return type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None and \
        module.weight.dim() == 2 and hasattr(module, "nf")

# ---------------------------------------------------------------------------------------------------- autograd
def _signed(key: int) -> int:
    """torch.library ints are int64: carry the unsigned 64-bit key as its two's-complement value."""
    return key - (1 << 64) if key >= (1 << 63) else key


def _masked_grad_eager(x: torch.Tensor, grad_y: torch.Tensor, n: int, signed_key: int) -> torch.Tensor:
    mask = MatrixMask.live((grad_y.shape[1], x.shape[1]), n, signed_key % (1 << 64))
    return ops.masked_grad(x, grad_y, mask)


@torch.library.custom_op("randmask::masked_grad", mutates_args=())
def _masked_grad_library_op(x: torch.Tensor, grad_y: torch.Tensor, n: int, signed_key: int) -> torch.Tensor:
    """masked_grad as a registered op, opaque to torch.compile (so a compiled model has no graph break here)."""
    return _masked_grad_eager(x, grad_y, n, signed_key)


@_masked_grad_library_op.register_fake
def _(x, grad_y, n, signed_key):
    return x.new_empty(n, dtype=torch.float32)


class MaskedLinearFunction(torch.autograd.Function):
    """y = F.linear(x, weight, bias); delta is an input only so that autograd routes its gradient here.
    The mask travels as (n, signed key) ints so torch.compile can trace through it."""

    @staticmethod
    def forward(ctx, x, weight, bias, delta, n, signed_key):
        ctx.n, ctx.signed_key = n, signed_key
        ctx.save_for_backward(x, weight)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        need_x, need_weight, need_bias, need_delta = ctx.needs_input_grad[:4]
        grad_y2d = grad_y.reshape(-1, grad_y.shape[-1])
        x2d = x.reshape(-1, x.shape[-1])
        grad_x = grad_weight = grad_bias = grad_delta = None
        if need_x:
            grad_x = grad_y.matmul(weight.to(grad_y.dtype)).to(x.dtype)
        if need_delta:
            if torch.compiler.is_compiling():  # the registered op: opaque to the compiler, no graph break
                grad_delta = torch.ops.randmask.masked_grad(x2d, grad_y2d, ctx.n, ctx.signed_key)
            else:  # eager: the same function without the op's dispatch, which costs as much as a small kernel
                grad_delta = _masked_grad_eager(x2d, grad_y2d, ctx.n, ctx.signed_key)
        # The weight and bias are frozen by MaskedLinear; if a user unfreezes them they get their true gradients.
        if need_weight:
            grad_weight = grad_y2d.t().matmul(x2d.to(grad_y.dtype)).to(weight.dtype)
        if need_bias:
            grad_bias = grad_y2d.sum(0).to(grad_y.dtype)
        return grad_x, grad_weight, grad_bias, grad_delta, None, None


def masked_linear(x, weight, bias, delta, mask: MatrixMask):
    return MaskedLinearFunction.apply(x, weight, bias, delta, mask.n, _signed(mask.key))


# ---------------------------------------------------------------------------------------------------- step hook
# After any torch optimizer's step, the layers whose deltas it holds write their merged entries. This cannot be left
# to the forward's version check alone: a fused optimizer (AdamW(fused=True)) does not bump version counters, and a
# compiled forward does no eager checks. An optimizer that writes the merged entries itself
# (randmask.optim.MaskedAdamW) sets `writes_merged_weights` and calls `mark_synced()` instead. The hook is installed
# when the first MaskedLinear is built, so importing randmask changes no optimizer.
@torch.no_grad()
def _sync_after_step(optimizer, args, kwargs):
    if getattr(optimizer, "writes_merged_weights", False):
        return
    layers = [layer for group in optimizer.param_groups for layer in map(layer_of, group["params"])
              if layer is not None]
    ops.sparse_update_many([(layer.weight, layer.base, layer.delta, layer.mask) for layer in layers if layer.n])
    for layer in layers:
        layer.mark_synced()


_step_hook = None


def _install_step_hook() -> None:
    global _step_hook
    if _step_hook is None:
        _step_hook = register_optimizer_step_post_hook(_sync_after_step)


# delta parameter -> weakref to its layer, so an optimizer given only parameters can find a delta's layer.
_LAYER_OF_DELTA = WeakIdKeyDictionary()


def _register(layer) -> None:
    _install_step_hook()
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
            self.register_buffer("base", ops.gather_weight(self.weight, self.mask).clone())
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
            ops.sparse_update(self.weight, self.base, self.delta, self.mask)
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
