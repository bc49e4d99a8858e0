"""Sparse weight access at the masked positions: read the base values, write the merged values.

    gather:  base[k] = weight[r_k, c_k]                                   (once, when a layer is masked)
    update:  weight[r_k, c_k] = round_to_weight_dtype(float32(base[k]) + delta[k])     k in [0, n)

Only the n masked entries are touched; every other entry of weight stays bitwise as it was.
"""
import torch

from .mask_addressing import cdiv, kernel_mask_args  # plain Python: raises a clear error when triton is missing

try:
    import triton
    import triton.language as tl

    from .mask_addressing import slot_to_flat
except ImportError:  # triton is optional: the torch twins are the whole CPU path
    triton = None

BLOCK = 1024  # slots per program


def gather_weight_torch(weight, rows, cols):
    return weight[rows, cols]


def sparse_update_torch(weight, base, delta, rows, cols):
    acc = torch.promote_types(base.dtype, torch.float32)  # fp32, or fp64 for a float64 weight: never rounds base
    weight[rows, cols] = (base.to(acc) + delta.to(acc)).to(weight.dtype)
    return weight


# ---------------------------------------------------------------- Triton kernels (GPU; the tests run them interpreted)
# Positions are computed inline from the key (kernels/mask_addressing.py); no index tensor is read or stored.
if triton is not None:

    @triton.jit(do_not_specialize=["k0", "k1"])
    def sparse_weight_kernel(weight_ptr, base_ptr, delta_ptr, n, in_features, numel, a_radix, b_radix, k0, k1,
                             stride_r, stride_c, UPDATE: tl.constexpr, BLOCK: tl.constexpr):
        # For the BLOCK = 1024 slots k of this program, (r_k, c_k) = divmod(sigma(k), in):
        #   UPDATE=False (gather): base[k] = weight[r_k, c_k]
        #   UPDATE=True:           weight[r_k, c_k] = weight dtype(fp32(base[k]) + fp32(delta[k]))
        k = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        live = k < n
        p = slot_to_flat(tl.where(live, k, 0), numel, a_radix, b_radix, k0, k1)
        w = weight_ptr + (p // in_features) * stride_r + (p % in_features) * stride_c
        if UPDATE:
            merged = tl.load(base_ptr + k, mask=live).to(tl.float32) + tl.load(delta_ptr + k, mask=live).to(tl.float32)
            tl.store(w, merged.to(weight_ptr.dtype.element_ty), mask=live)
        else:
            tl.store(base_ptr + k, tl.load(w, mask=live), mask=live)


def _launch(weight, base, delta, n, key, update: bool):
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D, got shape {tuple(weight.shape)}")
    mask = kernel_mask_args(weight.numel(), n, key)
    if n > 0:
        sparse_weight_kernel[(cdiv(n, BLOCK),)](weight, base, delta, n, weight.shape[1], *mask,
                                                *weight.stride(), UPDATE=update, BLOCK=BLOCK)


def gather_weight_triton(weight, n, key):
    """base[k] = weight[r_k, c_k] for k in [0, n): the n masked entries, in the weight's dtype."""
    base = torch.empty(n, dtype=weight.dtype, device=weight.device)
    _launch(weight, base, base, n, key, update=False)
    return base


def sparse_update_triton(weight, base, delta, key):
    """weight[r_k, c_k] = (float(base[k]) + delta[k]).to(weight.dtype) in place, k in [0, len(base))."""
    if base.shape != delta.shape or base.dim() != 1:
        raise ValueError(f"base and delta must be 1-D of one length, got {tuple(base.shape)}, {tuple(delta.shape)}")
    _launch(weight, base.contiguous(), delta.contiguous(), base.numel(), key, update=True)
    return weight
