"""AdamW on the n trainable values of one masked matrix, fused with the sparse weight update.

For slots k in [0, n), with (r_k, c_k) = divmod(sigma(k), in) and the step count t (>= 1, after its increment):

    delta_k *= 1 - lr * weight_decay                                      decoupled weight decay
    m_k      = lerp(m_k, g_k, 1 - beta1)                                  first moment  (exp_avg)
    v_k      = beta2 * v_k + (1 - beta2) * g_k * g_k                      second moment (exp_avg_sq)
    delta_k += -(lr / (1 - beta1**t)) * m_k / (sqrt(v_k) / sqrt(1 - beta2**t) + eps)
    weight[r_k, c_k] = weight dtype(fp32(base_k) + delta_k)               the merged entry, as sync writes it

This is torch.optim.AdamW's default single-tensor step (torch.optim.adam._single_tensor_adam with
decoupled_weight_decay, amsgrad=False, maximize=False) followed by kernels/sparse_update.py's update, op for op:
the step-dependent scalars are computed on the host in Python floats exactly as torch computes them
(`adamw_scalars`) and passed as fp32, and the kernel rounds where torch's CPU kernels round: lerp as
fma(w, end - self, self) (w < 0.5; else fma(w - 1, end - self, end)), addcmul as fma(value * t1, t2, self),
addcdiv as self + (value * t1) / t2, with Triton's automatic fp fusion off so nothing else is contracted. Under
the interpreter, m and v then equal torch's (x86 AVX512 build) bitwise; delta can differ by an ulp, because the
kernel's sqrt is IEEE round-to-nearest and torch's CPU sqrt is not correctly rounded for ~20% of inputs.
grad, delta, exp_avg and exp_avg_sq are fp32 of length n; base has the weight's dtype; weight is any-strided 2-D
(a transposed view for GPT-2's Conv1D).

One interface for the single-matrix step of each backend:

    masked_adamw_<backend>(weight, base, delta, grad, exp_avg, exp_avg_sq, key, *,
                           lr, beta1, beta2, eps, weight_decay, step, positions=None) -> None

updates delta, exp_avg, exp_avg_sq and the n merged entries of weight in place; nothing else is written (other
weight entries stay bitwise as they were). `step` is the step count after its increment (int or float, >= 1).
`positions` is an optional (rows, cols) pair of int64 tensors, the layer's cached positions: the torch twin uses
them (computing them from the key when absent), the kernels compute positions inline and ignore it.

    masked_adamw_torch:   the CPU path and the test oracle (torch ops, bitwise equal to AdamW + sync on CPU)
    masked_adamw_triton:  one pass, BLOCK = 1024 slots per program, positions from the hash, no index loads
    masked_adamw_multi_triton: the same for a list of matrices (one weight dtype, own step counts) in one launch
    adamw_torch:          the same step without a weight write, for plain parameters (any shape and dtype)
"""
import torch

from .mask_addressing import cdiv, kernel_mask_args, slot_to_flat_torch  # plain Python: fine without triton
from .matrix_table import WEIGHT_DTYPES, launch_over_table, table_row
from .sparse_update import sparse_update_torch

try:
    import triton
    import triton.language as tl

    from .mask_addressing import slot_to_flat
    from .matrix_table import TL_DTYPES, find_row, int_fields, pointer_field
    from .sparse_update import store_merged
except ImportError:  # triton is optional: the torch twins are the whole CPU path
    triton = None

BLOCK = 1024  # slots per program


def adamw_scalars(*, lr, beta1, beta2, eps, weight_decay, step):
    """The host-side scalars of one AdamW step, computed in Python floats exactly as torch computes them:
    (decay, lerp_weight, beta2, one_minus_beta2, neg_step_size, bias_correction2_sqrt, eps). A kernel receives
    them as fp32 (torch casts them to the tensor's fp32 opmath type the same way)."""
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    step_size = lr / bias_correction1
    decay = 1 - lr * weight_decay if weight_decay != 0 else 1.0
    return decay, 1 - beta1, beta2, 1 - beta2, -step_size, bias_correction2**0.5, eps


def _check_args(weight, base, delta, grad, exp_avg, exp_avg_sq, step):
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D, got shape {tuple(weight.shape)}")
    n = delta.numel()
    for name, t in (("delta", delta), ("grad", grad), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if t.shape != (n,) or t.dtype != torch.float32:
            raise ValueError(f"{name} must be fp32 of shape ({n},), got {t.dtype} {tuple(t.shape)}")
        if t.device != weight.device:
            raise ValueError(f"{name} is on {t.device}, weight on {weight.device}")
    if base.shape != (n,) or base.dtype != weight.dtype:
        raise ValueError(f"base must be {weight.dtype} of shape ({n},), got {base.dtype} {tuple(base.shape)}")
    if not step >= 1:
        raise ValueError(f"step is the step count after its increment (>= 1), got {step}")


def _kernel_args(weight, base, delta, grad, exp_avg, exp_avg_sq, key, step):
    """Checks one matrix's arguments for the Triton kernels; returns its n and mask arguments. The kernels index
    delta, exp_avg and exp_avg_sq as flat arrays and write them in place, so no copy can stand in for them."""
    _check_args(weight, base, delta, grad, exp_avg, exp_avg_sq, step)
    for name, t in (("delta", delta), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if not t.is_contiguous():
            raise ValueError(f"{name} is updated in place and must be contiguous")
    n = delta.numel()
    return n, kernel_mask_args(weight.numel(), n, key)


# ---------------------------------------------------------------- torch twins (CPU path and test oracle)
@torch.no_grad()
def adamw_torch(param, grad, exp_avg, exp_avg_sq, *, lr, beta1, beta2, eps, weight_decay, step):
    """One AdamW step on param, in place: torch's _single_tensor_adam (decoupled weight decay), op for op."""
    if weight_decay != 0:
        param.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    step_size = lr / bias_correction1
    denom = (exp_avg_sq.sqrt() / bias_correction2**0.5).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-step_size)


@torch.no_grad()
def masked_adamw_torch(weight, base, delta, grad, exp_avg, exp_avg_sq, key, *, lr, beta1, beta2, eps,
                       weight_decay, step, positions=None):
    """AdamW on delta, then weight[r_k, c_k] = weight dtype(fp32(base_k) + delta_k) at the given positions
    (rows, cols), computed from key when None."""
    _check_args(weight, base, delta, grad, exp_avg, exp_avg_sq, step)
    adamw_torch(delta, grad, exp_avg, exp_avg_sq, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                weight_decay=weight_decay, step=step)
    n = delta.numel()
    if n == 0:
        return
    if positions is None:
        if n > weight.numel():
            raise ValueError(f"n must be in [0, {weight.numel()}] for a matrix of {weight.numel()} entries, got {n}")
        flat = slot_to_flat_torch(torch.arange(n, device=weight.device), weight.numel(), key)
        positions = torch.div(flat, weight.shape[1], rounding_mode="floor"), flat % weight.shape[1]
    sparse_update_torch(weight, base, delta, *positions)


# ---------------------------------------------------------------- Triton kernel (GPU; the tests run it interpreted)
# Positions are computed inline from the key (kernels/mask_addressing.py); no index tensor is read or stored.
# tl.sqrt_rn and tl.div_rn are IEEE round-to-nearest (tl.sqrt and tl.fdiv are approximations); the launcher passes
# enable_fp_fusion=False so that only the explicit tl.fma calls fuse, as in torch's CPU kernels.
if triton is not None:

    @triton.jit
    def masked_adamw_slots(k, n, weight_ptr, base_ptr, delta_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr,
                           in_features, numel, a_radix, b_radix, k0, k1, stride_r, stride_c,
                           decay, lerp_weight, beta2, one_minus_beta2, neg_step_size, bias_correction2_sqrt, eps):
        # For the slots k of one matrix (those < n are live; fp32 throughout; the scalars come from adamw_scalars):
        #   delta *= decay;  m = lerp(m, g, lerp_weight);  v = beta2 * v + one_minus_beta2 * g * g
        #   delta += neg_step_size * m / (sqrt(v) / bias_correction2_sqrt + eps)
        #   weight[r_k, c_k] = weight dtype(fp32(base_k) + delta),  (r_k, c_k) = divmod(sigma(k), in)
        live = k < n
        g = tl.load(grad_ptr + k, mask=live, other=0.0)
        delta = tl.load(delta_ptr + k, mask=live, other=0.0)
        m = tl.load(exp_avg_ptr + k, mask=live, other=0.0)
        v = tl.load(exp_avg_sq_ptr + k, mask=live, other=0.0)
        delta = delta * decay
        if lerp_weight < 0.5:  # torch's lerp: anchored at the end the weight is closer to
            m = tl.fma(lerp_weight, g - m, m)
        else:
            m = tl.fma(lerp_weight - 1.0, g - m, g)
        v = tl.fma(one_minus_beta2 * g, g, v * beta2)
        denom = tl.div_rn(tl.sqrt_rn(v), bias_correction2_sqrt) + eps
        delta = delta + tl.div_rn(neg_step_size * m, denom)
        tl.store(delta_ptr + k, delta, mask=live)
        tl.store(exp_avg_ptr + k, m, mask=live)
        tl.store(exp_avg_sq_ptr + k, v, mask=live)
        p = slot_to_flat(tl.where(live, k, 0), numel, a_radix, b_radix, k0, k1)
        store_merged(weight_ptr, base_ptr, k, delta, live, p, in_features, stride_r, stride_c)

    @triton.jit(do_not_specialize=["k0", "k1"])
    def masked_adamw_kernel(weight_ptr, base_ptr, delta_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr,
                            n, in_features, numel, a_radix, b_radix, k0, k1, stride_r, stride_c,
                            decay, lerp_weight, beta2, one_minus_beta2, neg_step_size, bias_correction2_sqrt, eps,
                            BLOCK: tl.constexpr):
        # The step of masked_adamw_slots on the BLOCK = 1024 slots of this program, of one matrix.
        k = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        masked_adamw_slots(k, n, weight_ptr, base_ptr, delta_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr,
                           in_features, numel, a_radix, b_radix, k0, k1, stride_r, stride_c,
                           decay, lerp_weight, beta2, one_minus_beta2, neg_step_size, bias_correction2_sqrt, eps)

    @triton.jit
    def masked_adamw_multi_kernel(table_ptr, matrices, step_scalars_ptr, decay, lerp_weight, beta2, one_minus_beta2,
                                  eps, WEIGHT_DTYPE: tl.constexpr, BLOCK: tl.constexpr, SEARCH_STEPS: tl.constexpr):
        # Program i: the BLOCK = 1024 slots k of block i - first_j of matrix j (kernels/matrix_table.py: the row
        # search and the table's fields), stepped by masked_adamw_slots (fp32 throughout):
        #   delta *= decay;  m = lerp(m, g, lerp_weight);  v = beta2 * v + one_minus_beta2 * g * g
        #   delta += neg_step_size_j * m / (sqrt(v) / bias_correction2_sqrt_j + eps)
        #   weight_j[r_k, c_k] = weight dtype(fp32(base_k) + delta),  (r_k, c_k) = divmod(sigma_j(k), in_j)
        # step_scalars[2j], step_scalars[2j + 1] are matrix j's step-dependent scalars (fp32); the others the group's.
        block = tl.program_id(0).to(tl.int64)
        param, row = find_row(table_ptr, block, matrices, SEARCH_STEPS)
        n, in_features, numel, a_radix, b_radix, k0, k1, stride_r, stride_c, first_block = int_fields(row)
        k = (block - first_block) * BLOCK + tl.arange(0, BLOCK)
        masked_adamw_slots(k, n, pointer_field(row, 0, WEIGHT_DTYPE), pointer_field(row, 1, WEIGHT_DTYPE),
                           pointer_field(row, 2, tl.float32), pointer_field(row, 3, tl.float32),
                           pointer_field(row, 4, tl.float32), pointer_field(row, 5, tl.float32),
                           in_features, numel, a_radix, b_radix, k0, k1, stride_r, stride_c,
                           decay, lerp_weight, beta2, one_minus_beta2, tl.load(step_scalars_ptr + 2 * param),
                           tl.load(step_scalars_ptr + 2 * param + 1), eps)


def masked_adamw_triton(weight, base, delta, grad, exp_avg, exp_avg_sq, key, *, lr, beta1, beta2, eps,
                        weight_decay, step, positions=None):
    """The fused step in one Triton launch of ceil(n / BLOCK) programs; `positions` is ignored (computed inline)."""
    n, mask = _kernel_args(weight, base, delta, grad, exp_avg, exp_avg_sq, key, step)
    if n > 0:
        _launch_one(weight, base, delta, grad, exp_avg, exp_avg_sq, n, mask,
                    adamw_scalars(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, step=step))


def _launch_one(weight, base, delta, grad, exp_avg, exp_avg_sq, n, mask, scalars):
    masked_adamw_kernel[(cdiv(n, BLOCK),)](weight, base.contiguous(), delta, grad.contiguous(), exp_avg,
                                           exp_avg_sq, n, weight.shape[1], *mask, *weight.stride(),
                                           *(float(s) for s in scalars), BLOCK=BLOCK, enable_fp_fusion=False)


def masked_adamw_multi_triton(batch, *, lr, beta1, beta2, eps, weight_decay):
    """The fused step of several matrices in one Triton launch of sum(ceil(n_i / BLOCK)) programs.

    batch: (weight, base, delta, grad, exp_avg, exp_avg_sq, key, step) tuples, as masked_adamw_triton's arguments;
    their weights share one dtype and device, their steps may differ. Each matrix is updated bitwise as
    masked_adamw_triton updates it (the same kernel body, the same scalars); matrices with n = 0 are skipped."""
    if triton is None:
        raise RuntimeError("the Triton kernels need triton, which is not installed")
    if not batch:
        return
    weight_dtype, device = batch[0][0].dtype, batch[0][0].device
    if weight_dtype not in WEIGHT_DTYPES:
        raise ValueError(f"weights must be one of {sorted(map(str, WEIGHT_DTYPES))}, got {weight_dtype}")
    hyper = {"lr": lr, "beta1": beta1, "beta2": beta2, "eps": eps, "weight_decay": weight_decay}
    decay, lerp_weight, _, one_minus_beta2, _, _, _ = adamw_scalars(**hyper, step=1)  # the step-independent ones
    rows, counts, step_scalars, flat_inputs = [], [], [], []
    for weight, base, delta, grad, exp_avg, exp_avg_sq, key, step in batch:
        if weight.dtype != weight_dtype or weight.device != device:
            raise ValueError(f"one launch steps weights of one dtype and device: got {weight.dtype} on "
                             f"{weight.device} in a batch of {weight_dtype} on {device}")
        n, mask = _kernel_args(weight, base, delta, grad, exp_avg, exp_avg_sq, key, step)
        if n == 0:
            continue
        scalars = adamw_scalars(**hyper, step=step)
        last = (weight, base, delta, grad, exp_avg, exp_avg_sq, n, mask, scalars)
        base, grad = base.contiguous(), grad.contiguous()  # read as flat arrays; kept alive until the launch
        flat_inputs.append((base, grad))
        step_scalars += scalars[4:6]  # neg_step_size, bias_correction2_sqrt
        rows.append(table_row(weight, base, delta, n, mask, grad, exp_avg, exp_avg_sq))
        counts.append(n)
    if len(rows) == 1:  # one matrix: the single-matrix kernel needs no table, nor its host-to-device copies
        _launch_one(*last)
    elif rows:
        on_gpu = device.type == "cuda"
        step_scalars = torch.tensor(step_scalars, dtype=torch.float32, pin_memory=on_gpu)
        step_scalars = step_scalars.to(device, non_blocking=True) if on_gpu else step_scalars
        launch_over_table(masked_adamw_multi_kernel, rows, counts, BLOCK, device, step_scalars, float(decay),
                          float(lerp_weight), float(beta2), float(one_minus_beta2), float(eps),
                          WEIGHT_DTYPE=TL_DTYPES[weight_dtype], BLOCK=BLOCK, enable_fp_fusion=False)
