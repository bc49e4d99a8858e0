"""One launch over many masked matrices: a table with a row per matrix, and each program's search for its matrix.

Used by the multi-matrix kernels (masked_adamw.masked_adamw_multi_triton, sparse_update.sparse_update_multi_triton):
one launch instead of one per matrix saves the per-launch host time, which bounds a GPU step once the model's own
kernels are captured or fast. Row j of the table (int64, TABLE_FIELDS values, the arguments a single-matrix kernel
gets; k0 and k1 become uint32 in slot_to_flat as there):

    0 weight  1 base  2 delta  3 grad  4 exp_avg  5 exp_avg_sq      addresses (0 where the op reads none)
    6 n  7 in_features  8 numel  9 a_radix  10 b_radix  11 k0  12 k1 13 stride_r  14 stride_c
    15 first block: matrix j's programs are blocks [first_j, first_j + cdiv(n_j, BLOCK)), rows in block order

Program i finds the last row whose first block is <= i by a binary search (SEARCH_STEPS = bit length of
matrices - 1 steps, a constexpr), so the host work is O(matrices), whatever n.
"""
import contextlib

import torch

from .mask_addressing import cdiv

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is optional: the torch twins are the whole CPU path
    triton = None

TABLE_FIELDS = 16
WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)  # what the multi-matrix kernels take


def table_row(weight, base, delta, n, mask, grad=None, exp_avg=None, exp_avg_sq=None) -> tuple:
    """Fields 0-14 of a matrix's row (the builder adds its first block); mask = kernel_mask_args(...)."""
    addresses = (0 if t is None else t.data_ptr() for t in (weight, base, delta, grad, exp_avg, exp_avg_sq))
    return (*addresses, n, weight.shape[1], *mask, *weight.stride())


def launch_over_table(kernel, rows, counts, block, device, *args, **kwargs) -> None:
    """kernel[(total blocks,)](table, matrices, *args, SEARCH_STEPS=..., **kwargs) over `rows` (from table_row) with
    n = counts[j] values each. The table goes to the device by a non-blocking copy from pinned memory (a pageable
    copy would synchronize the stream and stall the host), and the kernel is launched on the matrices' device: they
    reach it only through the table, so Triton cannot tell it."""
    table, blocks = [], 0
    for row, n in zip(rows, counts):
        table += (*row, blocks)
        blocks += cdiv(n, block)
    on_gpu = device.type == "cuda"
    table = torch.tensor(table, dtype=torch.int64, pin_memory=on_gpu)
    table = table.to(device, non_blocking=True) if on_gpu else table
    with torch.cuda.device(device) if on_gpu else contextlib.nullcontext():
        kernel[(blocks,)](table, len(rows), *args, SEARCH_STEPS=(len(rows) - 1).bit_length(), **kwargs)


if triton is not None:
    _TABLE_FIELDS = tl.constexpr(TABLE_FIELDS)
    TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16,
                 torch.float64: tl.float64}  # WEIGHT_DTYPES as Triton types

    @triton.jit
    def find_row(table_ptr, block, matrices, SEARCH_STEPS: tl.constexpr):
        """(index, pointer) of the row of the matrix that program `block` works on."""
        param = block * 0
        for i in tl.static_range(SEARCH_STEPS):  # binary lifting: the largest j with first_j <= block
            candidate = param + (1 << (SEARCH_STEPS - 1 - i))
            inside = candidate < matrices
            first = tl.load(table_ptr + tl.where(inside, candidate, 0) * _TABLE_FIELDS + 15)
            param = tl.where(inside & (first <= block), candidate, param)
        return param, table_ptr + param * _TABLE_FIELDS

    @triton.jit
    def int_fields(row):
        """A row's integer fields: n, in_features, numel, a_radix, b_radix, k0, k1, stride_r, stride_c, first block."""
        return (tl.load(row + 6), tl.load(row + 7), tl.load(row + 8), tl.load(row + 9), tl.load(row + 10),
                tl.load(row + 11), tl.load(row + 12), tl.load(row + 13), tl.load(row + 14), tl.load(row + 15))

    @triton.jit
    def pointer_field(row, field: tl.constexpr, DTYPE: tl.constexpr):
        """Address `field` of a row as a pointer to DTYPE."""
        return tl.load(row + field).to(tl.pointer_type(DTYPE))
