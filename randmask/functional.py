"""The autograd layer: dispatch each op to its Triton kernel or torch twin, and the masked linear Function.

    forward:  y = x W^T + b                 W already holds W0 + delta at the masked positions (merged in place)
    backward: grad_x     = grad_y W         dense matmul
              grad_delta = masked_grad(x, grad_y)     fp32, length n, no out x in temporary at low density
"""
import torch
import torch.nn.functional as F

from randmask.addressing import MatrixMask
from randmask.backend import kernel_backend
from randmask.kernels import masked_grad as masked_grad_op
from randmask.kernels import native as native_op
from randmask.kernels import sparse_update as sparse_update_op


def masked_grad(x: torch.Tensor, grad_y: torch.Tensor, mask: MatrixMask) -> torch.Tensor:
    """g[k] = sum_t grad_y[t, r_k] x[t, c_k] for 2-D x (T, in) and grad_y (T, out); fp32 of length n."""
    backend = kernel_backend(x.device)
    if backend == "triton":
        return masked_grad_op.masked_grad_triton(x, grad_y, mask.n, mask.key)
    if backend in ("native", "cuda") and native_op.supports(x, grad_y):
        # The native kernels are gathers; above the measured crossover the dense twin (BLAS / cuBLAS) wins.
        if (mask.density > native_op.DENSE_DENSITY_NATIVE if backend == "native"
                else native_op.cuda_prefers_dense(mask.n, mask.shape[0] * mask.shape[1], x.shape[0])):
            return masked_grad_op.masked_grad_dense_torch(x, grad_y, *mask.positions(x.device))
        launch = native_op.masked_grad_native if backend == "native" else native_op.masked_grad_cuda
        return launch(x, grad_y, mask.n, mask.key)
    return masked_grad_op.masked_grad_torch(x, grad_y, *mask.positions(x.device))


def gather_weight(weight: torch.Tensor, mask: MatrixMask) -> torch.Tensor:
    """The n values weight[r_k, c_k], in the weight's dtype."""
    backend = kernel_backend(weight.device)
    if backend == "triton":
        return sparse_update_op.gather_weight_triton(weight, mask.n, mask.key)
    if backend in ("native", "cuda") and native_op.supports(weight):
        launch = native_op.gather_weight_native if backend == "native" else native_op.gather_weight_cuda
        return launch(weight, mask.n, mask.key)
    return sparse_update_op.gather_weight_torch(weight, *mask.positions(weight.device))


def sparse_update(weight: torch.Tensor, base: torch.Tensor, delta: torch.Tensor, mask: MatrixMask) -> None:
    """weight[r_k, c_k] = round_to_weight_dtype(base[k] + delta[k]), in place; nothing else is touched."""
    backend = kernel_backend(weight.device)
    if backend == "triton":
        sparse_update_op.sparse_update_triton(weight, base, delta, mask.key)
    elif backend in ("native", "cuda") and native_op.supports(weight, base, delta):
        launch = native_op.sparse_update_native if backend == "native" else native_op.sparse_update_cuda
        launch(weight, base, delta, mask.key)
    else:
        sparse_update_op.sparse_update_torch(weight, base, delta, *mask.positions(weight.device))


def sparse_update_many(updates) -> None:
    """sparse_update for every (weight, base, delta, mask) of updates; on the Triton backend, those whose weights
    share a device and dtype in one launch (one launch per layer would cost its host time each)."""
    batches = {}
    for weight, base, delta, mask in updates:
        if kernel_backend(weight.device) == "triton" and delta.dtype == torch.float32:
            batches.setdefault((weight.device, weight.dtype), []).append((weight, base, delta, mask.key))
        else:
            sparse_update(weight, base, delta, mask)
    for batch in batches.values():
        sparse_update_op.sparse_update_multi_triton(batch)


def _signed(key: int) -> int:
    """torch.library ints are int64: carry the unsigned 64-bit key as its two's-complement value."""
    return key - (1 << 64) if key >= (1 << 63) else key


def _masked_grad_eager(x: torch.Tensor, grad_y: torch.Tensor, n: int, signed_key: int) -> torch.Tensor:
    mask = MatrixMask.live((grad_y.shape[1], x.shape[1]), n, signed_key % (1 << 64))
    return masked_grad(x, grad_y, mask)


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
            else:  # eager: the same function without the op's dispatch (~35 us per call, as much as a small kernel)
                grad_delta = _masked_grad_eager(x2d, grad_y2d, ctx.n, ctx.signed_key)
        # The weight and bias are frozen by MaskedLinear; if a user unfreezes them they get their true gradients.
        if need_weight:
            grad_weight = grad_y2d.t().matmul(x2d.to(grad_y.dtype)).to(weight.dtype)
        if need_bias:
            grad_bias = grad_y2d.sum(0).to(grad_y.dtype)
        return grad_x, grad_weight, grad_bias, grad_delta, None, None


def masked_linear(x, weight, bias, delta, mask: MatrixMask):
    return MaskedLinearFunction.apply(x, weight, bias, delta, mask.n, _signed(mask.key))
