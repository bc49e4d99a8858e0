"""Sparse weight access at the masked positions: read the base values, write the merged values.

    gather:  base[k] = weight[r_k, c_k]                                   (once, when a layer is masked)
    update:  weight[r_k, c_k] = round_to_weight_dtype(float32(base[k]) + delta[k])     k in [0, n)

Only the n masked entries are touched; every other entry of weight stays bitwise as it was. The gather also reads a
block of a matrix's rows (gather_rows_triton): the masked gradient's matmul way keeps its masked entries that way.
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
                             row_begin, rows, stride_r, stride_c, UPDATE: tl.constexpr, BLOCK: tl.constexpr):
        # For the BLOCK = 1024 slots k of this program, (r_k, c_k) = divmod(sigma(k), in), where weight holds the
        # mask's rows [row_begin, row_begin + rows) (all of them but for the masked gradient's row blocks):
        #   UPDATE=False (gather): base[k] = weight[r_k - row_begin, c_k]      for the slots whose row it holds
        #   UPDATE=True:           weight[r_k, c_k] = weight dtype(fp32(base[k]) + fp32(delta[k]))
        k = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        p = slot_to_flat(tl.where(k < n, k, 0), numel, a_radix, b_radix, k0, k1)
        r = p // in_features - row_begin
        live = (k < n) & (r >= 0) & (r < rows)
        w = weight_ptr + r * stride_r + (p % in_features) * stride_c
        if UPDATE:
            merged = tl.load(base_ptr + k, mask=live).to(tl.float32) + tl.load(delta_ptr + k, mask=live).to(tl.float32)
            tl.store(w, merged.to(weight_ptr.dtype.element_ty), mask=live)
        else:
            tl.store(base_ptr + k, tl.load(w, mask=live).to(base_ptr.dtype.element_ty), mask=live)


def _launch(weight, base, delta, n, key, update: bool, shape=None, row_begin=0):
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D, got shape {tuple(weight.shape)}")
    out_features, in_features = shape or weight.shape
    mask = kernel_mask_args(out_features * in_features, n, key)
    if n > 0:
        sparse_weight_kernel[(cdiv(n, BLOCK),)](weight, base, delta, n, in_features, *mask, row_begin,
                                                weight.shape[0], *weight.stride(), UPDATE=update, BLOCK=BLOCK)


def gather_weight_triton(weight, n, key):
    """base[k] = weight[r_k, c_k] for k in [0, n): the n masked entries, in the weight's dtype."""
    base = torch.empty(n, dtype=weight.dtype, device=weight.device)
    _launch(weight, base, base, n, key, update=False)
    return base


def gather_rows_triton(block, base, n, key, shape, row_begin):
    """base[k] = block[r_k - row_begin, c_k] for the slots k < n of a shape = (out, in) mask whose row r_k is one of
    block's rows [row_begin, row_begin + len(block)); base's other entries stay as they are. base may be of another
    dtype than block (its values are cast on store)."""
    if block.dim() != 2 or block.shape[1] != shape[1] or not 0 <= row_begin <= shape[0] - block.shape[0]:
        raise ValueError(f"block {tuple(block.shape)} at row {row_begin} is not a block of rows of a {shape} matrix")
    if base.shape != (n,) or not base.is_contiguous():
        raise ValueError(f"base must be contiguous of shape ({n},), got {tuple(base.shape)}")
    _launch(block, base, base, n, key, update=False, shape=shape, row_begin=row_begin)
    return base


def sparse_update_triton(weight, base, delta, key):
    """weight[r_k, c_k] = (float(base[k]) + delta[k]).to(weight.dtype) in place, k in [0, len(base))."""
    if base.shape != delta.shape or base.dim() != 1:
        raise ValueError(f"base and delta must be 1-D of one length, got {tuple(base.shape)}, {tuple(delta.shape)}")
    _launch(weight, base.contiguous(), delta.contiguous(), base.numel(), key, update=True)
    return weight
