"""Masked gradient (an SDDMM): the gradient of the trainable values of one masked matrix.

    g[k] = sum_t grad_y[t, r_k] * x[t, c_k]        k in [0, n), (r_k, c_k) = position of slot k, fp32 accumulation

x is (T, in), grad_y is (T, out), both of the layer's dtype; g is fp32 of length n. Two ways to compute it:
  gather: one dot product over tokens per slot, O(n*T) work; wins at tiny density.
  dense:  blocks of output rows of grad_y^T x (cuBLAS on GPU, BLAS on CPU) of which only the masked entries are
          kept, O(out*in*T) work at full matmul speed. The out x in gradient is never stored whole: a block holds
          at most ~TEMP_BYTES.
Each way exists as a torch twin (given positions; the CPU fallback and the test oracle) and as a Triton launcher
(positions from the key). Which one runs is randmask.ops's choice.
"""
import functools

import torch

from .mask_addressing import cdiv, kernel_mask_args  # plain Python: raises a clear error when triton is missing
from .sparse_update import gather_rows_triton

# Bound on the temporaries of one call (the twins' copies, the matmul way's block), whatever the layer and tokens.
TEMP_BYTES = 64 << 20


def _token_chunk(width: int) -> int:
    """Tokens per chunk so that an fp32 (width x tokens) copy stays within a quarter of the budget."""
    return max(1, (TEMP_BYTES // 4) // (4 * max(width, 1)))


# fp16/bf16 operands with an fp32 product straight from cuBLAS (fp32 accumulation, no rounding to the inputs' dtype),
# where this torch has that overload (aten::mm.dtype, CUDA only)
_MM_FP32_OUT = "dtype" in torch.ops.aten.mm.overloads()


def _mm_direct(a, b) -> bool:
    """Whether a @ b can take a and b as they are for an fp32 result (half precision on a GPU): no upcast copies."""
    return a.is_cuda and _MM_FP32_OUT and a.dtype == b.dtype and a.dtype in (torch.float16, torch.bfloat16)


def _mm_fp32(a, b):
    """a @ b as fp32: half-precision operands on a GPU as they are (cuBLAS, fp32 accumulation and result), any other
    case upcast first (exact products, fp32 sums)."""
    return torch.mm(a, b, out_dtype=torch.float32) if _mm_direct(a, b) else torch.mm(a.float(), b.float())


def masked_grad_gather_torch(x, grad_y, rows, cols):
    """Gather twin: per token chunk, fp32 transposed copies of x and grad_y; per slot chunk, a row-gathered dot."""
    n = rows.numel()
    grad = torch.zeros(n, dtype=torch.float32, device=x.device)
    if n == 0 or x.shape[0] == 0:
        return grad
    tokens = _token_chunk(max(x.shape[1], grad_y.shape[1]))
    for t0 in range(0, x.shape[0], tokens):
        x_t = x[t0:t0 + tokens].t().float().contiguous()        # (in, Tc): rows are contiguous token vectors
        gy_t = grad_y[t0:t0 + tokens].t().float().contiguous()  # (out, Tc)
        slots = max(1, (TEMP_BYTES // 4) // (4 * x_t.shape[1]))
        for k0 in range(0, n, slots):
            r, c = rows[k0:k0 + slots], cols[k0:k0 + slots]
            grad[k0:k0 + slots] += (gy_t.index_select(0, r) * x_t.index_select(0, c)).sum(1)
    return grad


# Devices where the dense twin picks a block's slots without nonzero(), which waits for the device (a host sync per
# block) and cannot run inside a CUDA graph (torch.compile's reduce-overhead mode with the CUDA or torch backend).
SYNC_FREE_DEVICES = ("cuda",)


def masked_grad_dense_torch(x, grad_y, rows, cols):
    """Dense twin: blocks of output rows of grad_y^T x, keeping only the masked entries of each block. Half-precision
    operands on a GPU go to cuBLAS as they are (fp32 result); otherwise fp32 upcasts of token chunks."""
    n = rows.numel()
    grad = torch.zeros(n, dtype=torch.float32, device=x.device)
    if n == 0 or x.shape[0] == 0:
        return grad
    out_features, in_features = grad_y.shape[1], x.shape[1]
    block_rows = max(1, (TEMP_BYTES // 2) // (4 * in_features))
    tokens = _token_chunk(max(in_features, block_rows))
    for r0 in range(0, out_features, block_rows):
        r1 = min(r0 + block_rows, out_features)
        if _mm_direct(grad_y, x):
            block = _mm_fp32(grad_y[:, r0:r1].t(), x)
        else:
            block = torch.zeros(r1 - r0, in_features, dtype=torch.float32, device=x.device)
            for t0 in range(0, x.shape[0], tokens):
                block.addmm_(grad_y[t0:t0 + tokens, r0:r1].t().float(), x[t0:t0 + tokens].float())
        in_block = (rows >= r0) & (rows < r1)
        if x.device.type in SYNC_FREE_DEVICES:  # every slot, the others masked out: O(n) work a block, no sync
            grad = torch.where(in_block, block[torch.where(in_block, rows - r0, 0), cols], grad)
        else:  # this block's slots only: on a CPU, reading all n in every block took 1.3-1.6x longer (4096^2, d 0.5)
            picked = in_block.nonzero().flatten()
            grad[picked] = block[rows[picked] - r0, cols[picked]]
    return grad


# ---------------------------------------------------------------- Triton kernel (GPU; the tests run it interpreted)
# Positions are computed inline from the key (kernels/mask_addressing.py); no index tensor is read.
# x and grad_y are loaded in their own dtype (fp32/fp16/bf16, any strides), cast to fp32, and multiplied and summed
# in fp32.
try:
    import triton
    import triton.language as tl

    from .mask_addressing import slot_to_flat
except ImportError:  # triton is optional: the torch twins then do the work
    triton = None

GATHER_BLOCK_K, GATHER_BLOCK_T, GATHER_NUM_WARPS = 128, 32, 4  # slots and tokens per step, warps per program

if triton is not None:

    @triton.jit(do_not_specialize=["k0", "k1"])
    def masked_grad_gather_kernel(x_ptr, gy_ptr, g_ptr, T, tokens_per_split, n, in_features, numel, a_radix, b_radix,
                                  k0, k1, stride_xt, stride_xc, stride_gt, stride_gc,
                                  BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr):
        # g[s, k] = sum_{t in split s} grad_y[t, r_k] * x[t, c_k] (fp32) for the BLOCK_K slots k of this program;
        # (r_k, c_k) from the key; the split's tokens in chunks of BLOCK_T, each a gathered (BLOCK_T, BLOCK_K) tile
        # of grad_y and of x. Split s covers tokens [s * tokens_per_split, (s + 1) * tokens_per_split).
        # Block sizes: BLOCK_K = 128 slots, BLOCK_T = 32 tokens, 4 warps (GATHER_*); grid: (cdiv(n, BLOCK_K), splits).
        k = tl.program_id(0).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
        split = tl.program_id(1)
        live = k < n
        p = slot_to_flat(tl.where(live, k, 0), numel, a_radix, b_radix, k0, k1)
        gy_cols = gy_ptr + (p // in_features)[None, :] * stride_gc
        x_cols = x_ptr + (p % in_features)[None, :] * stride_xc
        t_begin = split * tokens_per_split
        t_end = tl.minimum(t_begin + tokens_per_split, T)
        acc = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
        for t0 in range(t_begin, t_end, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T).to(tl.int64)
            m = (t < t_end)[:, None] & live[None, :]
            gy = tl.load(gy_cols + t[:, None] * stride_gt, mask=m, other=0.0).to(tl.float32)
            xv = tl.load(x_cols + t[:, None] * stride_xt, mask=m, other=0.0).to(tl.float32)
            acc += gy * xv
        tl.store(g_ptr + split.to(tl.int64) * n + k, tl.sum(acc, axis=0), mask=live)


GATHER_PROGRAMS_PER_SM = 4  # the gather kernel splits the tokens until it has this many programs per multiprocessor


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    # On the CPU (the Triton interpreter, tests only) a nominal 2, so that small tests take the split path too.
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2


def _tokens_per_split(blocks: int, T: int, device: torch.device) -> int:
    """Tokens per program of the gather kernel (a multiple of its BLOCK_T). Each program walks its tokens serially,
    so a few slot blocks over many tokens would leave most multiprocessors idle (1678 slots over 8192 tokens make 14
    programs for a 132-SM chip); splitting the tokens fills the chip, and the (splits, n) partial sums
    are added in a fixed order afterwards. Splits stay >= 4 chunks of BLOCK_T deep so the partials stay small."""
    chunks = cdiv(T, GATHER_BLOCK_T)
    wanted = cdiv(GATHER_PROGRAMS_PER_SM * _multiprocessors(device), max(blocks, 1))
    splits = max(1, min(wanted, chunks // 4))
    return cdiv(chunks, splits) * GATHER_BLOCK_T


def _activation_shapes(x, grad_y):
    """((T, in), out) of x (T, in) and grad_y (T, out); a clear error for anything else."""
    if x.dim() != 2 or grad_y.dim() != 2 or x.shape[0] != grad_y.shape[0]:
        raise ValueError(f"x (T, in) and grad_y (T, out) must share T, got {tuple(x.shape)}, {tuple(grad_y.shape)}")
    return x.shape, grad_y.shape[1]


def masked_grad_gather_triton(x, grad_y, n, key):
    """g (fp32, length n) by one gathered dot product over tokens per slot: for tiny density."""
    (T, in_features), out_features = _activation_shapes(x, grad_y)
    mask = kernel_mask_args(out_features * in_features, n, key)
    if n == 0 or T == 0:
        return torch.zeros(n, dtype=torch.float32, device=x.device)
    blocks = cdiv(n, GATHER_BLOCK_K)
    tokens_per_split = _tokens_per_split(blocks, T, x.device)
    splits = cdiv(T, tokens_per_split)
    partial = torch.empty(splits * n, dtype=torch.float32, device=x.device)  # (splits, n) partial sums
    masked_grad_gather_kernel[(blocks, splits)](x, grad_y, partial, T, tokens_per_split, n, in_features, *mask,
                                                *x.stride(), *grad_y.stride(), BLOCK_K=GATHER_BLOCK_K,
                                                BLOCK_T=GATHER_BLOCK_T, num_warps=GATHER_NUM_WARPS)
    return partial if splits == 1 else partial.view(splits, n).sum(0)  # fixed order: deterministic, no atomics


def masked_grad_matmul_triton(x, grad_y, n, key):
    """g (fp32, length n) from blocks of output rows of grad_y^T x (cuBLAS, fp32 result, <= ~TEMP_BYTES each), from
    each of which a Triton gather keeps the masked entries whose row it holds: for all but tiny density."""
    (T, in_features), out_features = _activation_shapes(x, grad_y)
    kernel_mask_args(out_features * in_features, n, key)  # the mask's own checks, before any work
    if n == 0 or T == 0:
        return torch.zeros(n, dtype=torch.float32, device=x.device)
    g = torch.empty(n, dtype=torch.float32, device=x.device)  # each slot is written by the one block holding its row
    block_rows = max(1, TEMP_BYTES // (4 * in_features))
    for row_begin in range(0, out_features, block_rows):
        block = _mm_fp32(grad_y[:, row_begin:row_begin + block_rows].t(), x)  # (rows, in) of grad_y^T x
        gather_rows_triton(block, g, n, key, (out_features, in_features), row_begin)
    return g
