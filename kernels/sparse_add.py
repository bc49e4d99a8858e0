"""The additive path's product with the sparse matrix S(delta) (out x in, delta[k] at the mask's (r_k, c_k)):

    sparse_add      out[t, r_k] += delta[k] * x[t, c_k]        forward:  y      = base(x) + S(delta) x
    transposed      out[t, c_k] += delta[k] * grad_y[t, r_k]   backward: grad_x = grad_x of the base + S(delta)^T grad_y

in place on `out`, k in [0, n), t over the tokens. Every element of `out` that a slot reaches is written once (the
others keep their bits): out[t, j] = round_to_out_dtype(out[t, j] + acc), acc = the fp32 sum, in increasing slot
order, of the fp32 products delta[k] * src[t, i_k] over the slots k whose destination index is j (fp64 for a float64
`out`). A fixed order and no atomics: the same inputs give bitwise the same output on every run and every thread
count. Cost O(tokens x n); no out x in matrix is built.
"""
import torch

from .mask_addressing import cdiv, kernel_mask_args  # plain Python: raises a clear error when triton is missing
from .positions import mask_positions_triton

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is optional: the torch twin is then the whole path
    triton = None

SLOTS_PER_CHUNK = 1 << 16  # the twin's gathered (T, chunk) products are built a chunk of slots at a time


def sparse_add_torch(out: torch.Tensor, src: torch.Tensor, delta: torch.Tensor, dst_index: torch.Tensor,
                     src_index: torch.Tensor) -> torch.Tensor:
    """out[:, dst_index[k]] += delta[k] * src[:, src_index[k]] for 2-D out (T, *) and src (T, *), in place.
    Forward: (dst, src) = (rows, cols); transposed: (cols, rows)."""
    acc_dtype = torch.promote_types(out.dtype, torch.float32)
    acc = torch.zeros(out.shape, dtype=acc_dtype, device=out.device)
    for begin in range(0, delta.numel(), SLOTS_PER_CHUNK):
        chunk = slice(begin, begin + SLOTS_PER_CHUNK)
        acc.index_add_(1, dst_index[chunk], src[:, src_index[chunk]].to(acc_dtype) * delta[chunk].to(acc_dtype))
    touched = dst_index.unique()  # only the reached columns: out + 0.0 would turn a -0.0 elsewhere into +0.0
    out[:, touched] = (out[:, touched].to(acc_dtype) + acc[:, touched]).to(out.dtype)
    return out


# ---------------------------------------------------------------- Triton kernel (GPU; the tests run it interpreted)
# Positions come from the key (kernels/positions.py's kernel, itself slot_to_flat). The slots are sorted stably by
# destination so that one program owns each destination and adds its slots in increasing slot order: no atomics,
# and the result is bitwise the same whatever the grid or block sizes.

# Destinations per program, tokens per program (at most; fewer tokens use 64 or 32 and fewer warps), slots per
# step: with one token per thread (BLOCK_T // 32 warps) every program gathers a BLOCK_T-long column of src per slot;
# UNROLL independent gathers per step keep several loads in flight per thread.
GROUP, MAX_BLOCK_T, UNROLL = 4, 128, 4

if triton is not None:

    @triton.jit
    def sparse_add_kernel(out_ptr, src_ptr, first_ptr, src_index_ptr, delta_ptr, T, stride_ot, stride_oj,
                          stride_st, stride_si, ACC: tl.constexpr, GROUP: tl.constexpr, BLOCK_T: tl.constexpr,
                          UNROLL: tl.constexpr):
        # For the GROUP destinations j of this program and its BLOCK_T tokens t, over the sorted slots
        # s in [first[j], first[j + 1]) (that destination's slots, in increasing slot order):
        #   out[t, j] = out dtype(out[t, j] + sum_s delta[s] * src[t, src_index[s]])    (ACC: fp32, fp64 for fp64)
        # each product rounded to ACC, then added in order (launched with enable_fp_fusion=False: no fma, as the
        # contract and the twin round); destinations without slots are not touched.
        # Block sizes: GROUP = 4 destinations, BLOCK_T = 128 tokens (4 warps; 64 or 32 for fewer tokens), UNROLL = 4
        # slots a step; grid: (cdiv(destinations, GROUP), cdiv(T, BLOCK_T)).
        j_begin = tl.program_id(0).to(tl.int64) * GROUP
        t = tl.program_id(1).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
        tokens = t < T
        src_rows = src_ptr + t * stride_st
        end = tl.load(first_ptr + j_begin)
        for j in range(j_begin, j_begin + GROUP):  # first[] is padded to the grid, so j + 1 is always in it
            begin = end
            end = tl.load(first_ptr + j + 1)
            if begin < end:
                acc = tl.zeros((BLOCK_T,), dtype=ACC)
                for s0 in range(begin, end, UNROLL):
                    for u in tl.static_range(UNROLL):
                        # a lane past the range adds 0 * 0 = +0, which leaves acc as it is (acc is never -0)
                        s = s0 + u
                        slot = s < end
                        i = tl.load(src_index_ptr + s, mask=slot, other=0)
                        d = tl.load(delta_ptr + s, mask=slot, other=0.0).to(ACC)
                        live = tl.where(slot, tokens, False)  # not tokens & slot: the interpreter makes that int32
                        acc += d * tl.load(src_rows + i * stride_si, mask=live, other=0.0).to(ACC)
                o = out_ptr + t * stride_ot + j * stride_oj
                tl.store(o, (tl.load(o, mask=tokens).to(ACC) + acc).to(out_ptr.dtype.element_ty), mask=tokens)


def sparse_add_triton(out: torch.Tensor, src: torch.Tensor, delta: torch.Tensor, n: int, key: int, shape,
                      transpose: bool) -> None:
    """In place, for the shape = (out_features, in_features) mask of n slots under `key`:
    out[t, r_k] += delta[k] * src[t, c_k] (out (T, out_features), src (T, in_features)), or with `transpose`
    out[t, c_k] += delta[k] * src[t, r_k] (out (T, in_features), src (T, out_features)); the module docstring's
    order and rounding. out and src are 2-D of any strides; no host sync (capturable in a CUDA graph)."""
    out_features, in_features = shape
    kernel_mask_args(out_features * in_features, n, key)  # the mask's own checks, before any work
    dsts, srcs = (in_features, out_features) if transpose else (out_features, in_features)
    if out.dim() != 2 or src.dim() != 2 or out.shape[0] != src.shape[0] or (out.shape[1], src.shape[1]) != (dsts, srcs):
        raise ValueError(f"out (T, {dsts}) and src (T, {srcs}) for a {tuple(shape)} mask{' transposed' * transpose}, "
                         f"got {tuple(out.shape)} and {tuple(src.shape)}")
    if delta.shape != (n,):
        raise ValueError(f"delta must be of shape ({n},), got {tuple(delta.shape)}")
    T = out.shape[0]
    if n == 0 or T == 0:
        return
    rows, cols = mask_positions_triton(out_features, in_features, n, key, out.device)
    dst_index, src_index = (cols, rows) if transpose else (rows, cols)
    dst_sorted, order = torch.sort(dst_index, stable=True)  # equal destinations keep increasing slot order
    groups = cdiv(dsts, GROUP)
    # first[j] = the first sorted slot of destination j, padded with n up to the grid's last destination + 1; by
    # searchsorted, not bincount + cumsum: CUDA bincount reads its input's max on the host (a sync)
    first = torch.searchsorted(dst_sorted, torch.arange(groups * GROUP + 1, dtype=dst_sorted.dtype, device=out.device))
    block_t = min(MAX_BLOCK_T, max(32, triton.next_power_of_2(T)))
    acc = tl.float64 if out.dtype == torch.float64 else tl.float32
    sparse_add_kernel[(groups, cdiv(T, block_t))](out, src, first, src_index.index_select(0, order),
                                                   delta.index_select(0, order), T, *out.stride(), *src.stride(),
                                                   ACC=acc, GROUP=GROUP, BLOCK_T=block_t, UNROLL=UNROLL,
                                                   num_warps=block_t // 32, enable_fp_fusion=False)
