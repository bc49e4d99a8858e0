"""The autograd Functions and MaskedLinear: a drop-in nn.Linear whose only trainable values are n seed-addressed
entries of its weight (the data path's third step: the masks come from randmask/mask.py, the kernels through
randmask/ops.py). Two modes apply the values:

  merged (plain floating-point weights; zero inference overhead)
    forward:  y = x W^T + b                 W already holds W0 + delta at the masked positions (written in place)
    backward: grad_x     = grad_y W         dense matmul
              grad_delta = masked_grad(x, grad_y)     fp32, length n, no out x in temporary
    step:     any torch optimizer updates delta; a post-step hook writes round(W0_k + delta[k]) into the weight

  additive (any base, quantized ones included; the base is never written)
    forward:  y = base(x) + S(delta) x      S(delta): out x in, delta[k] at (r_k, c_k); sparse_add, O(T n)
    backward: grad_x     = grad_x of the base + S(delta)^T grad_y       sparse_add_t, O(T n)
              grad_delta = masked_grad(x, grad_y)
"""
import math
import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.weak import WeakIdKeyDictionary

from randmask import ops, quantized
from randmask.mask import MASK_SCHEME, MatrixMask, count_for_density, layer_key, mask_positions

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
MODES = ("auto", "merged", "additive")


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


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(T.., d) as (T, d); with d = 0 too (reshape(-1, 0) cannot infer T)."""
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


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
        grad_y2d, x2d = _rows(grad_y), _rows(x)
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


class SparseAddFunction(torch.autograd.Function):
    """y + S(delta) x, written into y (the base's fresh output, which its own backward does not read): the
    additive mode's sparse path. Backward: grad_y passes through, grad_x = S(delta)^T grad_y (autograd adds the
    base's), grad_delta = masked_grad(x, grad_y)."""

    @staticmethod
    def forward(ctx, y, x, delta, n, signed_key):
        ctx.n, ctx.signed_key = n, signed_key
        mask = MatrixMask.live((y.shape[-1], x.shape[-1]), n, signed_key % (1 << 64))
        ops.sparse_add(_rows(y), _rows(x), delta, mask)
        ctx.mark_dirty(y)
        ctx.save_for_backward(x, delta)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, delta = ctx.saved_tensors
        grad_x = grad_delta = None
        grad_y2d = _rows(grad_y)
        if ctx.needs_input_grad[1]:
            grad_x = _sparse_add_t_eager(grad_y, delta, ctx.n, ctx.signed_key, x.shape[-1], x.dtype)
        if ctx.needs_input_grad[2]:
            grad_delta = _masked_grad_eager(_rows(x), grad_y2d, ctx.n, ctx.signed_key)
        return grad_y, grad_x, grad_delta, None, None


def _sparse_add_t_eager(grad_y: torch.Tensor, delta: torch.Tensor, n: int, signed_key: int, in_features: int,
                        dtype: torch.dtype) -> torch.Tensor:
    grad_x = grad_y.new_zeros((*grad_y.shape[:-1], in_features), dtype=dtype)
    mask = MatrixMask.live((grad_y.shape[-1], in_features), n, signed_key % (1 << 64))
    ops.sparse_add_t(_rows(grad_x), _rows(grad_y), delta, mask)
    return grad_x


# Under torch.compile the sparse path runs as registered ops, opaque to the compiler (no graph break); eager runs the
# in-place Function above, without the ops' dispatch cost and without a copy of y.
@torch.library.custom_op("randmask::sparse_add", mutates_args=())
def _sparse_add_library_op(y: torch.Tensor, x: torch.Tensor, delta: torch.Tensor, n: int,
                           signed_key: int) -> torch.Tensor:
    out = y.clone(memory_format=torch.contiguous_format)
    mask = MatrixMask.live((y.shape[-1], x.shape[-1]), n, signed_key % (1 << 64))
    ops.sparse_add(_rows(out), _rows(x), delta, mask)
    return out


@_sparse_add_library_op.register_fake
def _(y, x, delta, n, signed_key):
    return torch.empty_like(y, memory_format=torch.contiguous_format)


@torch.library.custom_op("randmask::sparse_add_t", mutates_args=())
def _sparse_add_t_library_op(grad_y: torch.Tensor, delta: torch.Tensor, n: int, signed_key: int, in_features: int,
                             dtype: torch.dtype) -> torch.Tensor:
    return _sparse_add_t_eager(grad_y, delta, n, signed_key, in_features, dtype)


@_sparse_add_t_library_op.register_fake
def _(grad_y, delta, n, signed_key, in_features, dtype):
    return grad_y.new_empty((*grad_y.shape[:-1], in_features), dtype=dtype)


def _sparse_add_setup(ctx, inputs, output):
    _, x, delta, ctx.n, ctx.signed_key = inputs
    ctx.save_for_backward(x, delta)


def _sparse_add_backward(ctx, grad_out):
    x, delta = ctx.saved_tensors
    grad_x = torch.ops.randmask.sparse_add_t(grad_out, delta, ctx.n, ctx.signed_key, x.shape[-1], x.dtype)
    grad_delta = torch.ops.randmask.masked_grad(_rows(x), _rows(grad_out), ctx.n, ctx.signed_key)
    return grad_out, grad_x, grad_delta, None, None


_sparse_add_library_op.register_autograd(_sparse_add_backward, setup_context=_sparse_add_setup)


def sparse_add(y, x, delta, mask: MatrixMask):
    """y + S(delta) x for the base's output y (T.., out) and input x (T.., in), differentiable in x and delta."""
    if torch.compiler.is_compiling():
        return torch.ops.randmask.sparse_add(y, x, delta, mask.n, _signed(mask.key))
    if not y.is_contiguous() or y._is_view():  # autograd forbids writing into a view a custom Function returned
        y = y.clone(memory_format=torch.contiguous_format)
    if torch.is_grad_enabled() and (delta.requires_grad or x.requires_grad or y.requires_grad):
        return SparseAddFunction.apply(y, x, delta, mask.n, _signed(mask.key))
    ops.sparse_add(_rows(y), _rows(x), delta, mask)
    return y


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
    ops.sparse_update_many([(layer.weight, layer.base, layer.delta, layer.mask) for layer in layers
                            if layer.n and layer.mode == "merged"])
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


def resolve_mode(module: nn.Module, mode: str, name: str = "") -> str:
    """"merged" or "additive": what `mode` ("auto", "merged", "additive") means for wrapping `module`; raises
    (naming the layer) where it cannot be done, before anything changes."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if module.weight.device.type == "meta":
        raise ValueError(f"layer {name!r} has its weight on the meta device (no values yet): load the weights first "
                         "(randmask.plan works on a meta model)")
    quantization = quantized.quantization_of(module)
    if quantization is not None:
        quantized.check_quantized(module, name)
        if mode == "merged":
            raise ValueError(f"layer {name!r} has a {quantized.describe(quantization)}, whose weight cannot hold the "
                             "merged values W0 + delta; use mode='additive' (or 'auto', which picks it)")
        return "additive"
    if module.weight.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"MaskedLinear needs a floating-point weight (or a bitsandbytes-quantized one), layer "
                        f"{name!r} has {module.weight.dtype}")
    return "additive" if mode == "additive" else "merged"


def dense_view(linear: nn.Module) -> torch.Tensor:
    """The (out, in) matrix a linear layer computes with: its weight (a Conv1D's as a transposed view of the same
    storage, so writes reach the layer), or for a quantized one a transient dequantized copy."""
    if quantized.quantization_of(linear) is not None:
        return quantized.dequantize(linear)
    return linear.weight.detach().t() if is_conv1d(linear) else linear.weight


@torch.no_grad()
def write_base(weight: torch.Tensor, base: torch.Tensor, mask: MatrixMask) -> None:
    """Write the original values `base` back at the mask's positions of `weight`, bit-exactly."""
    if not mask.n:
        return
    if weight.dtype == torch.float64:  # the sparse-update kernels add in fp32 and would round float64
        rows, cols = mask.positions(weight.device)
        weight[rows, cols] = base
    else:  # base + (-0.0) is exact for every value, -0.0 included (+0.0 would turn -0.0 into +0.0)
        ops.sparse_update(weight, base, torch.full((mask.n,), -0.0, device=base.device), mask)


def keep_base_training(base_layer: nn.Module | None) -> None:
    """Keep a quantized base layer in training mode whatever its wrapper's mode: bitsandbytes repacks a 4-bit weight
    for its CPU inference kernels the first time an eval-mode layer runs without gradients (rounding the block
    scales to bf16), and the base must stay as it was masked."""
    if base_layer is not None and quantized.quantization_of(base_layer) is not None:
        base_layer.training = True


class MaskedLinear(nn.Module):
    """y = x W^T + b where W = W0 + delta at n fixed positions chosen by (seed, name); everything else frozen.
    `delta` (fp32, starts at 0) is the only trainable parameter; `base` keeps the n original values W0_k (for a
    quantized base: dequantized, in the dtype it was quantized from).

    mode "merged": `weight` holds the merged values, W0 outside the mask (bitwise untouched) and round(W0_k + delta[k])
    at the mask, so the forward pass is a plain F.linear. After any torch optimizer's step the merged entries are
    written at once; other in-place changes of `delta` are caught by the next eager forward through its version
    counter. A change made through `delta.data` bypasses that counter: call `sync()` after one.

    mode "additive": the wrapped module is kept as `base_layer` and never written (a bitsandbytes 4-bit or 8-bit
    layer's storage stays bitwise as it was); y = base_layer(x) + S(delta) x. `weight` and `bias` read the base
    layer's. "auto" picks merged for a plain floating-point weight, additive for a quantized one.
    """

    def __init__(self, in_features, out_features, bias=True, *, density=None, n=None, seed=0, name="", mode="auto",
                 device=None, dtype=None):
        super().__init__()
        linear = nn.Linear(in_features, out_features, bias, device=device, dtype=dtype)
        self._wrap(linear, resolve_mode(linear, mode, name), density=density, n=n, seed=seed, name=name)

    @classmethod
    def from_linear(cls, linear: nn.Module, *, density=None, n=None, seed=0, name="", mode="auto") -> "MaskedLinear":
        """Wrap an existing nn.Linear, a transformers Conv1D (GPT-2's transposed (in, out) layout), or a
        bitsandbytes Linear4bit / Linear8bitLt, reusing its storage (no copy of the dense weight).

        Merged mode shares the weight: the original module's parameters are frozen and see the merged weights too.
        For a Conv1D the mask addresses the logical (out, in) matrix, a transposed view of its weight."""
        if not isinstance(linear, nn.Linear) and not is_conv1d(linear):
            raise TypeError(f"from_linear takes an nn.Linear (bitsandbytes' quantized ones included) or a "
                            f"transformers Conv1D, got {type(linear).__name__}")
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._wrap(linear, resolve_mode(linear, mode, name), density=density, n=n, seed=seed, name=name)
        return layer

    def _wrap(self, linear, mode, *, density, n, seed, name):
        self.mode, self.seed, self.name = mode, seed, name
        self.transposed = is_conv1d(linear)  # the weight is then a transposed view of its (in, out) storage
        self.quantization = quantized.quantization_of(linear)
        dense = dense_view(linear)  # for a quantized base transient: only the n values at the mask are kept
        self.out_features, self.in_features = dense.shape
        self.mask = MatrixMask(tuple(dense.shape), _resolve_count(tuple(dense.shape), density, n),
                               layer_key(seed, name))
        with torch.no_grad():
            self.register_buffer("base", ops.gather_weight(dense, self.mask).clone())
        linear.requires_grad_(False)
        if mode == "additive":
            self.base_layer = linear
            self.train(linear.training)
        else:
            self.weight = dense if isinstance(dense, nn.Parameter) else nn.Parameter(dense, requires_grad=False)
            if linear.bias is not None:
                self.bias = linear.bias
            else:
                self.register_parameter("bias", None)
        self.delta = nn.Parameter(torch.zeros(self.mask.n, dtype=torch.float32, device=self.base.device))
        _register(self)
        self.mark_synced()

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("weight", "bias") and "base_layer" in self._modules:  # additive: the base layer's (PEFT's way)
                return getattr(self._modules["base_layer"], name)
            raise

    # ------------------------------------------------------------------ state_dict: the mask's identity travels along
    def mask_identity(self) -> torch.Tensor:
        """(mask scheme, key, n, out, in, transposed) as int64: saved in the state_dict as `_extra_state`, so a state
        of another mask (another seed, name, shape or count) is refused instead of loaded at the wrong positions."""
        return torch.tensor([MASK_SCHEME, _signed(self.key), self.n, self.out_features, self.in_features,
                             int(self.transposed)], dtype=torch.int64)

    def check_identity(self, identity, where: str = "") -> None:
        """Raise ValueError unless `identity` (a mask_identity tensor) is this layer's mask."""
        if not isinstance(identity, torch.Tensor) or tuple(identity.shape) != (6,):
            raise ValueError(f"layer {where or self.name!r}: the state's mask identity {identity!r} is not one "
                             "randmask wrote")
        scheme, key, n, out_features, in_features, transposed = identity.tolist()
        mine = self.mask_identity().tolist()
        if [scheme, key, n, out_features, in_features, transposed] != mine:
            raise ValueError(
                f"layer {where or self.name!r}: the state was saved from another mask (mask scheme {scheme}, key "
                f"{key % (1 << 64):#018x}, n={n}, {out_features}x{in_features}{', transposed' if transposed else ''}) "
                f"than this layer's (scheme {mine[0]}, key {self.key:#018x}, n={self.n}, {self.out_features}x"
                f"{self.in_features}{', transposed' if self.transposed else ''}): load it into a model masked with the "
                "same RandMaskConfig (seed, targets, density or trainable_ratio)")

    def get_extra_state(self):
        return self.mask_identity()

    def set_extra_state(self, state) -> None:
        self.check_identity(state)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        identity = state_dict.get(prefix + "_extra_state")
        if identity is not None:  # checked before any of this layer's tensors is loaded
            self.check_identity(identity, prefix.rstrip("."))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._synced_version = -1  # delta may have been loaded: the next forward syncs the merged weight

    def __setattr__(self, name, value):
        if name == "delta" and "delta" in self._parameters:  # a new delta Parameter replacing the old one
            if not isinstance(value, nn.Parameter) or value.dtype != torch.float32 or value.shape != (self.n,) \
                    or value.device != self.delta.device:
                raise TypeError(f"layer {self.name!r}: delta must be an fp32 nn.Parameter of shape ({self.n},) on "
                                f"{self.delta.device}, got {type(value).__name__} "
                                f"{getattr(value, 'dtype', '')} {tuple(getattr(value, 'shape', ()))}")
            super().__setattr__(name, value)
            _register(self)
            self._synced_version = -1  # the merged weight holds the old delta's values: the next forward syncs
            return
        super().__setattr__(name, value)

    def __setstate__(self, state):
        super().__setstate__(state)  # copy.deepcopy and unpickling: register the copy's own delta
        _register(self)

    def _apply(self, fn, recurse=True):
        # model.to(torch.bfloat16) / .half() must not round the trainable values: delta stays fp32, follows the device.
        if self.quantization is not None:
            moved = fn(torch.empty(0, device=self.delta.device)).device
            if moved != self.delta.device:  # refused before anything moves: bitsandbytes may requantize on a move
                raise RuntimeError(f"layer {self.name!r} has a {quantized.describe(self.quantization)} and randmask "
                                   f"was applied on {self.delta.device}; moving it to {moved} is not supported. "
                                   "Load and quantize the model on its device, then apply randmask there")
        delta = self.delta.data
        super()._apply(fn, recurse)
        if self.delta.dtype != torch.float32:
            self.delta.data = delta.to(self.delta.device)
        return self

    def train(self, mode: bool = True):
        super().train(mode)
        keep_base_training(self.base_layer if self.quantization is not None else None)
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
        return mask_positions(self.mask.shape, self.n, self.key, self.delta.device)

    # ------------------------------------------------------------------ training
    @torch.no_grad()
    def sync(self) -> None:
        """Merged mode: write round(W0_k + delta[k]) into the weight's masked entries (additive mode writes nothing)."""
        if self.n and self.mode == "merged":
            ops.sparse_update(self.weight, self.base, self.delta, self.mask)
        self.mark_synced()

    @torch.no_grad()
    def restore_base(self) -> None:
        """Merged mode: write the original values W0 back at the masked positions, bit-exactly (additive mode never
        wrote them). The weight then holds the base model; delta is kept."""
        if self.mode != "merged":
            return
        write_base(self.weight, self.base, self.mask)
        self._synced_version = -1  # the weight no longer holds base + delta: the next forward syncs

    def mark_synced(self) -> None:
        """Record that `weight` holds round(base + delta) for the current delta (after sync, or after an optimizer
        that wrote the merged entries itself)."""
        self._synced_version = self.delta._version

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1:] != (self.in_features,):
            raise ValueError(f"input's last dimension is {tuple(x.shape[-1:])}, MaskedLinear expects "
                             f"{self.in_features} (input shape {tuple(x.shape)})")
        if x.device != self.delta.device:
            raise ValueError(f"input is on {x.device}, MaskedLinear's weights are on {self.delta.device}")
        if self.mode == "additive":
            y = self.base_layer(x)
            return sparse_add(y, x, self.delta, self.mask) if self.n else y
        if not torch.compiler.is_compiling() and self.delta._version != self._synced_version:
            self.sync()  # delta changed in place outside an optimizer step (load_state_dict, a no_grad edit)
        if not (self.delta.requires_grad and torch.is_grad_enabled()):
            return F.linear(x, self.weight, self.bias)  # inference: nothing to route back
        return masked_linear(x, self.weight, self.bias, self.delta, self.mask)

    def extra_repr(self) -> str:
        base = f", base={self.quantization}" if self.quantization else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"n={self.n}, density={self.density:.3g}, seed={self.seed}, name={self.name!r}, mode={self.mode}"
                f"{base}")
