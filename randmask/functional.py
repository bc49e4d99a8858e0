"""The autograd layer: dispatch each op to its Triton kernel or torch twin, and the masked linear Function.

    forward:  y = x W^T + b                 W already holds W0 + delta at the masked positions (merged in place)
    backward: grad_x     = grad_y W         dense matmul
              grad_delta = masked_grad(x, grad_y)     fp32, length n, no out x in temporary at low density
"""
import torch
import torch.nn.functional as F

from randmask.addressing import MatrixMask
from randmask.backend import use_triton
from randmask.kernels import masked_grad as masked_grad_op
from randmask.kernels import sparse_update as sparse_update_op


def masked_grad(x: torch.Tensor, grad_y: torch.Tensor, mask: MatrixMask) -> torch.Tensor:
    """g[k] = sum_t grad_y[t, r_k] x[t, c_k] for 2-D x (T, in) and grad_y (T, out); fp32 of length n."""
    if use_triton(x.device):
        return masked_grad_op.masked_grad_triton(x, grad_y, mask.n, mask.key)
    return masked_grad_op.masked_grad_torch(x, grad_y, *mask.positions(x.device))


def gather_weight(weight: torch.Tensor, mask: MatrixMask) -> torch.Tensor:
    """The n values weight[r_k, c_k], in the weight's dtype."""
    if use_triton(weight.device):
        return sparse_update_op.gather_weight_triton(weight, mask.n, mask.key)
    return sparse_update_op.gather_weight_torch(weight, *mask.positions(weight.device))


def sparse_update(weight: torch.Tensor, base: torch.Tensor, delta: torch.Tensor, mask: MatrixMask) -> None:
    """weight[r_k, c_k] = round_to_weight_dtype(base[k] + delta[k]), in place; nothing else is touched."""
    if use_triton(weight.device):
        sparse_update_op.sparse_update_triton(weight, base, delta, mask.key)
    else:
        sparse_update_op.sparse_update_torch(weight, base, delta, *mask.positions(weight.device))


class MaskedLinearFunction(torch.autograd.Function):
    """y = F.linear(x, weight, bias); delta is an input only so that autograd routes its gradient here."""

    @staticmethod
    def forward(ctx, x, weight, bias, delta, mask):
        ctx.mask = mask
        ctx.save_for_backward(x, weight)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        mask = ctx.mask
        need_x, need_weight, need_bias, need_delta, _ = ctx.needs_input_grad
        grad_y2d = grad_y.reshape(-1, grad_y.shape[-1])
        x2d = x.reshape(-1, x.shape[-1])
        grad_x = grad_weight = grad_bias = grad_delta = None
        if need_x:
            grad_x = grad_y.matmul(weight.to(grad_y.dtype)).to(x.dtype)
        if need_delta:
            grad_delta = masked_grad(x2d, grad_y2d, mask)
        # The weight and bias are frozen by MaskedLinear; if a user unfreezes them they get their true gradients.
        if need_weight:
            grad_weight = grad_y2d.t().matmul(x2d.to(grad_y.dtype)).to(weight.dtype)
        if need_bias:
            grad_bias = grad_y2d.sum(0).to(grad_y.dtype)
        return grad_x, grad_weight, grad_bias, grad_delta, None


def masked_linear(x, weight, bias, delta, mask: MatrixMask):
    return MaskedLinearFunction.apply(x, weight, bias, delta, mask)
