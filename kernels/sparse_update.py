"""Sparse weight access at the masked positions: read the base values, write the merged values.

    gather:  base[k] = weight[r_k, c_k]                                   (once, when a layer is masked)
    update:  weight[r_k, c_k] = round_to_weight_dtype(float32(base[k]) + delta[k])     k in [0, n)

Only the n masked entries are touched; every other entry of weight stays bitwise as it was. The gather also reads a
block of a matrix's rows (gather_rows_triton): the masked gradient's matmul way keeps its masked entries that way.
"""
import torch

from .mask_addressing import cdiv, kernel_mask_args  # plain Python: raises a clear error when triton is missing
from .matrix_table import WEIGHT_DTYPES, launch_over_table, table_row

try:
    import triton
    import triton.language as tl

    from .mask_addressing import slot_to_flat
    from .matrix_table import TL_DTYPES, find_row, int_fields, pointer_field
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

    @triton.jit
    def store_merged(weight_ptr, base_ptr, k, delta, live, p, in_features, stride_r, stride_c):
        # weight[r_k, c_k] = weight dtype(fp32(base[k]) + delta_k) for the live slots k, (r_k, c_k) = divmod(p_k, in)
        merged = tl.load(base_ptr + k, mask=live).to(tl.float32) + delta
        w = weight_ptr + (p // in_features) * stride_r + (p % in_features) * stride_c
        tl.store(w, merged.to(weight_ptr.dtype.element_ty), mask=live)

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
        if UPDATE:  # row_begin = 0: the whole weight
            store_merged(weight_ptr, base_ptr, k, tl.load(delta_ptr + k, mask=live).to(tl.float32), live, p,
                         in_features, stride_r, stride_c)
        else:
            w = weight_ptr + r * stride_r + (p % in_features) * stride_c
            tl.store(base_ptr + k, tl.load(w, mask=live).to(base_ptr.dtype.element_ty), mask=live)

    @triton.jit
    def sparse_update_multi_kernel(table_ptr, matrices, WEIGHT_DTYPE: tl.constexpr, BLOCK: tl.constexpr,
                                   SEARCH_STEPS: tl.constexpr):
        # Program i: the update above on the BLOCK = 1024 slots k of block i - first_j of matrix j
        # (kernels/matrix_table.py: the row search and the table's fields):
        #   weight_j[r_k, c_k] = weight dtype(fp32(base_k) + fp32(delta_k)),  (r_k, c_k) = divmod(sigma_j(k), in_j)
        block = tl.program_id(0).to(tl.int64)
        _, row = find_row(table_ptr, block, matrices, SEARCH_STEPS)
        n, in_features, numel, a_radix, b_radix, k0, k1, stride_r, stride_c, first_block = int_fields(row)
        k = (block - first_block) * BLOCK + tl.arange(0, BLOCK)
        live = k < n
        p = slot_to_flat(tl.where(live, k, 0), numel, a_radix, b_radix, k0, k1)
        delta = tl.load(pointer_field(row, 2, tl.float32) + k, mask=live)
        store_merged(pointer_field(row, 0, WEIGHT_DTYPE), pointer_field(row, 1, WEIGHT_DTYPE), k, delta, live, p,
                     in_features, stride_r, stride_c)


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


def sparse_update_multi_triton(batch):
    """sparse_update_triton for every (weight, base, delta, key) of batch in one launch: the weights share one dtype
    and device; delta is fp32 (what MaskedLinear trains). Bitwise what one launch per matrix writes."""
    if triton is None:
        raise RuntimeError("the Triton kernels need triton, which is not installed")
    live = []
    for weight, base, delta, key in batch:
        if weight.dim() != 2 or base.shape != delta.shape or base.dim() != 1:
            raise ValueError(f"a 2-D weight and 1-D base and delta of one length, got {tuple(weight.shape)}, "
                             f"{tuple(base.shape)}, {tuple(delta.shape)}")
        if weight.dtype not in WEIGHT_DTYPES:
            raise ValueError(f"weights must be one of {sorted(map(str, WEIGHT_DTYPES))}, got {weight.dtype}")
        if (weight.dtype, weight.device) != (batch[0][0].dtype, batch[0][0].device) or delta.dtype != torch.float32:
            raise ValueError(f"one launch updates weights of one dtype and device from fp32 deltas: got "
                             f"{weight.dtype} on {weight.device} with {delta.dtype} deltas in a batch of "
                             f"{batch[0][0].dtype} on {batch[0][0].device}")
        if base.numel():
            live.append((weight, base.contiguous(), delta.contiguous(), key))
    if len(live) == 1:  # one matrix: its own launch needs no table
        sparse_update_triton(*live[0])
    elif live:
        rows = [table_row(w, b, d, b.numel(), kernel_mask_args(w.numel(), b.numel(), key)) for w, b, d, key in live]
        launch_over_table(sparse_update_multi_kernel, rows, [b.numel() for _, b, _, _ in live], BLOCK,
                          live[0][0].device, WEIGHT_DTYPE=TL_DTYPES[live[0][0].dtype], BLOCK=BLOCK)
