"""Masked gradient (an SDDMM): the gradient of the trainable values of one masked matrix.

    g[k] = sum_t grad_y[t, r_k] * x[t, c_k]        k in [0, n), (r_k, c_k) = position of slot k, fp32 accumulation

x is (T, in), grad_y is (T, out), both of the layer's dtype; g is fp32 of length n. Two ways to compute it:
  gather: one dot product over tokens per slot, O(n*T) work; wins at tiny density. On GPU also run on token-major
          copies of x and grad_y (contiguous loads per slot), which wins in between; and a candidate, the rows
          kernel, that serves every slot from each block of token rows.
  dense:  tiles of grad_y^T x (tensor cores on GPU, BLAS on CPU) of which only the masked entries are kept,
          O(out*in*T) work at full matmul speed; wins at higher density. The out x in gradient is never stored whole.

Torch twins (the CPU path and the test oracle) use given positions; they hold at most ~TEMP_BYTES of temporaries.
"""
import functools

import torch

# Bound on the torch twins' temporaries, whatever the layer and token count.
TEMP_BYTES = 64 << 20
# CPU crossover between the two torch twins (used only when the native kernels are not built): the dense twin wins
# above this density. Measured with benchmarks/bench_masked_grad.py on the 2-core CI machine, 512 tokens, fp32 and
# bf16, SmolLM2-135M shapes: 0.003 (576x576), 0.01 (1536x576, 576x1536), 0.023 (192x576).
DENSE_DENSITY_CPU = 0.01


def _token_chunk(width: int) -> int:
    """Tokens per chunk so that an fp32 (width x tokens) copy stays within a quarter of the budget."""
    return max(1, (TEMP_BYTES // 4) // (4 * max(width, 1)))


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


def masked_grad_dense_torch(x, grad_y, rows, cols):
    """Dense twin: blocks of output rows of grad_y^T x, keeping only the masked entries of each block."""
    n = rows.numel()
    grad = torch.zeros(n, dtype=torch.float32, device=x.device)
    if n == 0 or x.shape[0] == 0:
        return grad
    out_features, in_features = grad_y.shape[1], x.shape[1]
    block_rows = max(1, (TEMP_BYTES // 2) // (4 * in_features))
    tokens = _token_chunk(max(in_features, block_rows))
    for r0 in range(0, out_features, block_rows):
        r1 = min(r0 + block_rows, out_features)
        in_block = ((rows >= r0) & (rows < r1)).nonzero().flatten()
        if in_block.numel() == 0:
            continue
        block = torch.zeros(r1 - r0, in_features, dtype=torch.float32, device=x.device)
        for t0 in range(0, x.shape[0], tokens):
            block.addmm_(grad_y[t0:t0 + tokens, r0:r1].t().float(), x[t0:t0 + tokens].float())
        grad[in_block] = block[rows[in_block] - r0, cols[in_block]]
    return grad


def masked_grad_torch(x, grad_y, rows, cols):
    """CPU dispatcher between the two twins, by density."""
    density = rows.numel() / max(1, grad_y.shape[1] * x.shape[1])
    if density > DENSE_DENSITY_CPU:
        return masked_grad_dense_torch(x, grad_y, rows, cols)
    return masked_grad_gather_torch(x, grad_y, rows, cols)


# ---------------------------------------------------------------- Triton kernels (GPU; the tests run them interpreted)
# Positions are computed inline from the key (kernels/mask_addressing.py); no index tensor is read.
# Dtypes: x and grad_y are loaded in their own dtype (fp32/fp16/bf16, any strides) and the products are summed in
# fp32. The gather kernel casts every load to fp32 before multiplying. The dense kernel feeds tl.dot with DOT_DTYPE:
# on a GPU, fp16/bf16 operands go to the tensor cores as they are (their products are exact in fp32 and the
# accumulator is fp32, so this equals the fp32 twin up to summation order), and fp32 operands use tf32x3 (three
# tf32 passes: fp32-level accuracy, still on tensor cores; plain tf32 would lose ~3 decimal digits, which torch
# does not do by default). Under TRITON_INTERPRET=1 (CPU tensors) DOT_DTYPE is fp32, because the interpreter's
# bf16 arithmetic and bf16 tl.dot give garbage; a constexpr, so the GPU build carries no cast.
from .mask_addressing import cdiv, kernel_mask_args  # plain Python: raises a clear error when triton is missing

try:
    import triton
    import triton.language as tl

    from .mask_addressing import flat_to_slot, slot_to_flat
except ImportError:  # triton is optional: masked_grad_torch is the whole CPU path
    triton = None

# GPU dispatch: a cost model of the three ways (seconds), fitted to bf16 tables of benchmarks/bench_masked_grad.py on
# an H100 (benchmarks/results/masked_grad_cuda_bfloat16*.md: 4096x4096 and 4096x14336, 512 and 8192 tokens; the
# H200's gather and dense costs were within 15% of these):
#   gather                n*T*GATHER_S: each load takes a 32-byte sector for one 2-byte value, since consecutive
#                         tokens of one column are in-features apart (bound by sectors, not flops)
#   gather, token-major   TOKEN_MAJOR_FIXED_S + T*(in + out)*TOKEN_MAJOR_COPY_S + n*T*TOKEN_MAJOR_GATHER_S: x and
#                         grad_y first copied token-major in their own dtype (transient: as big as x and grad_y, freed
#                         before returning; the fixed part is the copies' launches), then the same gather kernel,
#                         whose loads along tokens are now contiguous per slot (~25x cheaper per slot x token)
#   dense                 out*in*(T + DENSE_FLOOR_TOKENS)*DENSE_S: tensor-core tiles; the tile loop has a floor worth
#                         ~840 tokens
# The dispatcher takes the cheapest. Against every row of those tables it picks the fastest way or one within 10%
# of it (tests/test_triton_kernels.py checks this against the stored tables): the gather at density <= 1e-4, the
# token-major gather around 1e-3-1e-2 (up to 3.4x faster than the better of the other two at 8192 tokens), dense
# above ~3e-2.
GATHER_S = 1.5e-11
TOKEN_MAJOR_FIXED_S, TOKEN_MAJOR_COPY_S, TOKEN_MAJOR_GATHER_S = 5e-5, 8.4e-12, 6e-13
DENSE_S, DENSE_FLOOR_TOKENS = 1.05e-14, 843
GATHER_BLOCK_K, GATHER_BLOCK_T = 128, 32
# Candidate (a bench column, not dispatched until a GPU has timed it): the rows kernel below. Its token block is sized
# so that the rows in use take at most ROWS_BYTES (several resident programs' worth fit one SM's L1); a program serves
# at most ROWS_SLOTS slots (its partial sums stay cached), and the (token splits, n) partial sums at most
# ROWS_PARTIAL_BYTES.
ROWS_BLOCK_K, ROWS_BYTES, ROWS_MAX_BLOCK_T, ROWS_SLOTS, ROWS_PARTIAL_BYTES = 128, 16 << 10, 16, 4096, 64 << 20
DENSE_BLOCK_M, DENSE_BLOCK_N, DENSE_BLOCK_T, DENSE_GROUP_M = 64, 64, 32, 8

if triton is not None:

    @triton.jit(do_not_specialize=["k0", "k1"])
    def masked_grad_gather_kernel(x_ptr, gy_ptr, g_ptr, T, tokens_per_split, n, in_features, numel, a_radix, b_radix,
                                  k0, k1, stride_xt, stride_xc, stride_gt, stride_gc,
                                  BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr):
        # g[s, k] = sum_{t in split s} grad_y[t, r_k] * x[t, c_k] (fp32) for the BLOCK_K slots k of this program;
        # (r_k, c_k) from the key; the split's tokens in chunks of BLOCK_T, each a gathered (BLOCK_T, BLOCK_K) tile
        # of grad_y and of x. Split s covers tokens [s * tokens_per_split, (s + 1) * tokens_per_split).
        # Block sizes: BLOCK_K = 128 slots, BLOCK_T = 32 tokens (GATHER_BLOCK_*); grid: (cdiv(n, BLOCK_K), splits).
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

    @triton.jit(do_not_specialize=["k0", "k1"])
    def masked_grad_dense_kernel(x_ptr, gy_ptr, g_ptr, T, n, out_features, in_features, numel, a_radix, b_radix,
                                 k0, k1, stride_xt, stride_xc, stride_gt, stride_gc,
                                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
                                 GROUP_M: tl.constexpr, DOT_DTYPE: tl.constexpr):
        # acc = (grad_y^T x)[r0:r0+BLOCK_M, c0:c0+BLOCK_N] = sum_t grad_y[t, r] * x[t, c] via tl.dot over BLOCK_T
        # token chunks (fp32 accumulator); epilogue: g[sigma^-1(r*in + c)] = acc[r, c] where that slot is < n.
        # sigma is a bijection, so every slot is written by exactly one program: no atomics, no zero-init.
        # Tiles are visited in groups of GROUP_M tile-rows so the x columns they share stay in L2.
        # Block sizes: BLOCK_M x BLOCK_N = 64 x 64 entries, BLOCK_T = 32 tokens, GROUP_M = 8 (DENSE_BLOCK_*);
        # grid: one program per tile (1-D, so any width fits).
        pid = tl.program_id(0)
        tiles_m = tl.cdiv(out_features, BLOCK_M)
        tiles_n = tl.cdiv(in_features, BLOCK_N)
        group_first = (pid // (GROUP_M * tiles_n)) * GROUP_M
        group_size = tl.minimum(tiles_m - group_first, GROUP_M)
        in_group = pid % (GROUP_M * tiles_n)
        r = (group_first + in_group % group_size).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        c = (in_group // group_size).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        r_in, c_in = r < out_features, c < in_features
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for t0 in range(0, T, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T).to(tl.int64)
            gy_t = tl.load(gy_ptr + r[:, None] * stride_gc + t[None, :] * stride_gt,
                           mask=r_in[:, None] & (t < T)[None, :], other=0.0)
            xv = tl.load(x_ptr + t[:, None] * stride_xt + c[None, :] * stride_xc,
                         mask=(t < T)[:, None] & c_in[None, :], other=0.0)
            acc = tl.dot(gy_t.to(DOT_DTYPE), xv.to(DOT_DTYPE), acc, input_precision="tf32x3")
        inside = r_in[:, None] & c_in[None, :]
        p = r[:, None] * in_features + c[None, :]
        slot = flat_to_slot(tl.where(inside, p, 0), numel, a_radix, b_radix, k0, k1)
        tl.store(g_ptr + slot, acc, mask=inside & (slot < n))

    @triton.jit(do_not_specialize=["k0", "k1"])
    def masked_grad_rows_kernel(x_ptr, gy_ptr, g_ptr, T, tokens_per_split, n, slots_per_split, in_features, numel,
                                a_radix, b_radix, k0, k1, stride_xt, stride_xc, stride_gt, stride_gc,
                                BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr):
        # partial[s, k] = sum_{t in token split s} grad_y[t, r_k] * x[t, c_k] (fp32) for the slots k of this
        # program's slot split (partial zeroed by the launcher). Token-outer: for each BLOCK_T rows of x and grad_y,
        # every slot of the split, BLOCK_K at a time, adds its sum over those rows to partial[s, k] (this program's
        # own entries: a plain read-modify-write). Why: the gather kernel reads each (token, slot) value as its own
        # 32-byte sector from L2 (0.88 GB per call for 1678 slots x 8192 tokens); here the BLOCK_T rows in use
        # (<= ROWS_BYTES) are shared by all slots, so after the first touch they come from L1, and L2/DRAM see each
        # row about once.
        # Block sizes: BLOCK_T = ROWS_BYTES / (row bytes of x + grad_y), a power of two in [1, 16]; BLOCK_K = 128
        # slots per step; grid: (token splits, slot splits).
        split = tl.program_id(0)
        t_begin = split * tokens_per_split
        t_end = tl.minimum(t_begin + tokens_per_split, T)
        first = tl.program_id(1) * slots_per_split
        last = tl.minimum(first + slots_per_split, n)
        partial_row = g_ptr + split.to(tl.int64) * n
        for t_start in range(t_begin, t_end, BLOCK_T):
            t = t_start + tl.arange(0, BLOCK_T).to(tl.int64)
            t_live = t < t_end
            for k_start in range(first, last, BLOCK_K):
                k = k_start + tl.arange(0, BLOCK_K).to(tl.int64)
                live = k < last
                p = slot_to_flat(tl.where(live, k, 0), numel, a_radix, b_radix, k0, k1)
                m = t_live[:, None] & live[None, :]
                gy = tl.load(gy_ptr + t[:, None] * stride_gt + (p // in_features)[None, :] * stride_gc, mask=m,
                             other=0.0)
                xv = tl.load(x_ptr + t[:, None] * stride_xt + (p % in_features)[None, :] * stride_xc, mask=m,
                             other=0.0)
                total = tl.sum(gy.to(tl.float32) * xv.to(tl.float32), axis=0)
                tl.store(partial_row + k, tl.load(partial_row + k, mask=live) + total, mask=live)


GATHER_PROGRAMS_PER_SM = 4  # the gather kernel splits the tokens until it has this many programs per multiprocessor


@functools.lru_cache(maxsize=None)
def _multiprocessors(device: torch.device) -> int:
    # On the CPU (the Triton interpreter, tests only) a nominal 2, so that small tests take the split path too.
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2


def _tokens_per_split(blocks: int, T: int, device: torch.device) -> int:
    """Tokens per program of the gather kernel (a multiple of its BLOCK_T). Each program walks its tokens serially,
    so a few slot blocks over many tokens would leave most multiprocessors idle (measured on an H200: 1678 slots x
    8192 tokens took 1.14 ms in 14 programs); splitting the tokens fills the chip, and the (splits, n) partial sums
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


def _launch_masked_grad(x, grad_y, n, key, dense: bool):
    (T, in_features), out_features = _activation_shapes(x, grad_y)
    common = (*kernel_mask_args(out_features * in_features, n, key), *x.stride(), *grad_y.stride())
    if n == 0 or T == 0:
        return torch.zeros(n, dtype=torch.float32, device=x.device)
    if not dense:
        blocks = cdiv(n, GATHER_BLOCK_K)
        tokens_per_split = _tokens_per_split(blocks, T, x.device)
        splits = cdiv(T, tokens_per_split)
        partial = torch.empty(splits * n, dtype=torch.float32, device=x.device)  # (splits, n) partial sums
        masked_grad_gather_kernel[(blocks, splits)](x, grad_y, partial, T, tokens_per_split, n, in_features, *common,
                                                    BLOCK_K=GATHER_BLOCK_K, BLOCK_T=GATHER_BLOCK_T)
        return partial if splits == 1 else partial.view(splits, n).sum(0)  # fixed order: deterministic, no atomics
    g = torch.empty(n, dtype=torch.float32, device=x.device)
    half = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
    dot_dtype = half.get(x.dtype, tl.float32) if x.is_cuda and x.dtype == grad_y.dtype else tl.float32
    grid = (cdiv(out_features, DENSE_BLOCK_M) * cdiv(in_features, DENSE_BLOCK_N),)
    masked_grad_dense_kernel[grid](x, grad_y, g, T, n, out_features, in_features, *common, BLOCK_M=DENSE_BLOCK_M,
                                   BLOCK_N=DENSE_BLOCK_N, BLOCK_T=DENSE_BLOCK_T, GROUP_M=DENSE_GROUP_M,
                                   DOT_DTYPE=dot_dtype)
    return g


def masked_grad_rows_triton(x, grad_y, n, key):
    """g (fp32, length n) by the rows kernel: each block of token rows serves every slot (a candidate). Splits the
    tokens to fill the chip within ROWS_PARTIAL_BYTES of partial sums, added in a fixed order (deterministic)."""
    (T, in_features), out_features = _activation_shapes(x, grad_y)
    mask = kernel_mask_args(out_features * in_features, n, key)
    if n == 0 or T == 0:
        return torch.zeros(n, dtype=torch.float32, device=x.device)
    row_bytes = in_features * x.element_size() + out_features * grad_y.element_size()
    block_t = min(ROWS_MAX_BLOCK_T, 1 << max(0, (ROWS_BYTES // row_bytes).bit_length() - 1))  # a power of two
    slot_splits = cdiv(n, ROWS_SLOTS)
    slots_per_split = cdiv(cdiv(n, slot_splits), ROWS_BLOCK_K) * ROWS_BLOCK_K
    token_blocks = cdiv(T, block_t)
    wanted = cdiv(GATHER_PROGRAMS_PER_SM * _multiprocessors(x.device), slot_splits)
    token_splits = max(1, min(wanted, token_blocks, ROWS_PARTIAL_BYTES // (4 * n)))
    tokens_per_split = cdiv(token_blocks, token_splits) * block_t
    token_splits = cdiv(T, tokens_per_split)
    partial = torch.zeros(token_splits * n, dtype=torch.float32, device=x.device)
    masked_grad_rows_kernel[(token_splits, cdiv(n, slots_per_split))](
        x, grad_y, partial, T, tokens_per_split, n, slots_per_split, in_features, *mask, *x.stride(),
        *grad_y.stride(), BLOCK_K=ROWS_BLOCK_K, BLOCK_T=block_t)
    return partial if token_splits == 1 else partial.view(token_splits, n).sum(0)


def masked_grad_gather_triton(x, grad_y, n, key):
    """g (fp32, length n) by one gathered dot product over tokens per slot: for tiny density."""
    return _launch_masked_grad(x, grad_y, n, key, dense=False)


def masked_grad_dense_triton(x, grad_y, n, key):
    """g (fp32, length n) from tiles of grad_y^T x that keep only their masked entries: for higher density."""
    return _launch_masked_grad(x, grad_y, n, key, dense=True)


def masked_grad_way_gpu(n: int, tokens: int, out_features: int, in_features: int) -> str:
    """'gather', 'token-major' or 'dense': the cheapest way by the cost model above."""
    costs = {"gather": n * tokens * GATHER_S,
             "token-major": (TOKEN_MAJOR_FIXED_S + tokens * (in_features + out_features) * TOKEN_MAJOR_COPY_S
                             + n * tokens * TOKEN_MAJOR_GATHER_S),
             "dense": out_features * in_features * (tokens + DENSE_FLOOR_TOKENS) * DENSE_S}
    return min(costs, key=costs.get)


def token_major(t: torch.Tensor) -> torch.Tensor:
    """The same (T, features) values laid out with consecutive tokens adjacent (stride (1, T)), in t's dtype."""
    return t if t.stride(0) == 1 else t.t().contiguous().t()


def masked_grad_triton(x, grad_y, n, key):
    """GPU dispatcher between the gather kernel (on the inputs or on token-major copies) and the dense kernel."""
    way = masked_grad_way_gpu(n, x.shape[0], grad_y.shape[-1], x.shape[-1])
    if way == "token-major":
        x, grad_y = token_major(x), token_major(grad_y)
    return _launch_masked_grad(x, grad_y, n, key, dense=way == "dense")
