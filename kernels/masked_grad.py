"""Masked gradient (an SDDMM): the gradient of the trainable values of one masked matrix.

    g[k] = sum_t grad_y[t, r_k] * x[t, c_k]        k in [0, n), (r_k, c_k) = position of slot k, fp32 accumulation

x is (T, in), grad_y is (T, out), both of the layer's dtype; g is fp32 of length n. Two ways to compute it:
  gather: one dot product over tokens per slot, O(n*T) work; wins at tiny density.
  dense:  tiles of grad_y^T x (tensor cores on GPU, BLAS on CPU) of which only the masked entries are kept,
          O(out*in*T) work at full matmul speed; wins at higher density. The out x in gradient is never stored whole.

Torch twins (the CPU path and the test oracle) use given positions; they hold at most ~TEMP_BYTES of temporaries.
"""
import torch

# Bound on the torch twins' temporaries, whatever the layer and token count.
TEMP_BYTES = 64 << 20
# CPU crossover: the dense twin wins above this density (measured by benchmarks/bench_masked_grad.py).
DENSE_DENSITY_CPU = 0.02


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
