"""Enumerating mask positions with Triton: slots -> (row, col) and (row, col) -> slot, mask scheme 1.

    positions: (rows[k], cols[k]) = divmod(sigma(k), in)            k in [0, n)
    slots:     slot[i] = sigma^-1(rows[i] * in + cols[i]) if < n else -1

The math lives in kernels/mask_addressing.py (its device functions are bit-identical to the torch twin, which is
the CPU path; randmask/ops.py chooses between them). Importable without triton: the launchers then raise.
"""
import torch

from .mask_addressing import cdiv, kernel_mask_args

try:
    import triton
    import triton.language as tl

    from .mask_addressing import flat_to_slot, slot_to_flat
except ImportError:  # triton is optional
    triton = None

BLOCK = 1024  # slots (or positions) per program


if triton is not None:

    @triton.jit(do_not_specialize=["k0", "k1"])
    def mask_positions_kernel(rows_ptr, cols_ptr, n, in_features, numel, a_radix, b_radix, k0, k1,
                              BLOCK: tl.constexpr):
        # rows[k], cols[k] = divmod(sigma(k), in_features) for k in [0, n); one program per BLOCK = 1024 slots.
        k = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        live = k < n
        p = slot_to_flat(tl.where(live, k, 0), numel, a_radix, b_radix, k0, k1)
        tl.store(rows_ptr + k, p // in_features, mask=live)
        tl.store(cols_ptr + k, p % in_features, mask=live)

    @triton.jit(do_not_specialize=["k0", "k1"])
    def mask_slots_kernel(rows_ptr, cols_ptr, slots_ptr, count, n, in_features, numel, a_radix, b_radix, k0, k1,
                          BLOCK: tl.constexpr):
        # slots[i] = sigma^-1(rows[i] * in + cols[i]), or -1 where that slot is >= n; BLOCK = 1024 entries a program.
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        live = i < count
        p = tl.load(rows_ptr + i, mask=live, other=0) * in_features + tl.load(cols_ptr + i, mask=live, other=0)
        slot = flat_to_slot(p, numel, a_radix, b_radix, k0, k1)
        tl.store(slots_ptr + i, tl.where(slot < n, slot, -1), mask=live)


def mask_positions_triton(out_features: int, in_features: int, n: int, key: int, device):
    """(rows, cols): int64 tensors of length n on `device`, slot k at (rows[k], cols[k])."""
    device = torch.device(device)
    mask = kernel_mask_args(out_features * in_features, n, key)
    rows = torch.empty(n, dtype=torch.int64, device=device)
    cols = torch.empty(n, dtype=torch.int64, device=device)
    if n > 0:
        mask_positions_kernel[(cdiv(n, BLOCK),)](rows, cols, n, in_features, *mask, BLOCK=BLOCK)
    return rows, cols


def mask_slots_triton(rows: torch.Tensor, cols: torch.Tensor, out_features: int, in_features: int, n: int,
                      key: int) -> torch.Tensor:
    """Slot of each (rows[i], cols[i]) (int64 tensors of one shape, inside the matrix), -1 where not trainable."""
    mask = kernel_mask_args(out_features * in_features, n, key)
    flat_rows = rows.reshape(-1).to(torch.int64).contiguous()
    flat_cols = cols.reshape(-1).to(torch.int64).contiguous()
    slots = torch.full_like(flat_rows, -1)
    if n > 0 and slots.numel() > 0:
        mask_slots_kernel[(cdiv(slots.numel(), BLOCK),)](flat_rows, flat_cols, slots, slots.numel(), n,
                                                         in_features, *mask, BLOCK=BLOCK)
    return slots.view(rows.shape)
