// native_cuda.cu: the CUDA backend of randmask (RANDMASK_BACKEND=cuda), behind the C ABI of randmask_native.h.
//
// Same ops and semantics as the Triton kernels (kernels/masked_grad.py, kernels/sparse_update.py) and the CPU
// library (native_cpu.cpp), plus the fused AdamW + weight update. Positions are computed inline from the key with
// randmask_mask.h; no index array is read. Inputs are fp32, fp16 or bf16 with any strides (x and grad_y of one
// dtype, base fp32 or the weight's: kernels/native.py converts anything else, exactly); every sum and every
// optimizer quantity is fp32; narrowing to the weight's dtype rounds to nearest even (randmask_dtype.h).
//
// Built by CMakeLists.txt for sm_80 and sm_90 when nvcc is found (CPU CI compiles it; a GPU machine runs it:
// benchmarks/gpu_check.sh).
#include <stdint.h>

#include <cuda_runtime.h>

#include "randmask_dtype.h"
#include "randmask_mask.h"
#include "randmask_native.h"

namespace {

constexpr int kSlots = 32;   // masked_grad: slots per block (one per lane of a warp)
constexpr int kLanesT = 8;   // masked_grad: token lanes per block (one warp each)
constexpr int kThreads = 256;  // elementwise kernels: threads per block

template <int D>
__device__ __forceinline__ float load_f32(const void* base, int64_t i) {
    if constexpr (D == RANDMASK_F32) {
        return __ldg(static_cast<const float*>(base) + i);
    } else {
        const unsigned short h = __ldg(static_cast<const unsigned short*>(base) + i);
        if constexpr (D == RANDMASK_F16) return randmask_f16_to_f32(h);
        else return randmask_bf16_to_f32(h);
    }
}

template <int D>
__device__ __forceinline__ void store_rounded(void* base, int64_t i, float v) {
    if constexpr (D == RANDMASK_F32) static_cast<float*>(base)[i] = v;
    else if constexpr (D == RANDMASK_F16) static_cast<uint16_t*>(base)[i] = randmask_f32_to_f16(v);
    else static_cast<uint16_t*>(base)[i] = randmask_f32_to_bf16(v);
}

bool valid_dtype(int d) { return d == RANDMASK_F32 || d == RANDMASK_F16 || d == RANDMASK_BF16; }

// The mask, or numel == 0 when (out, in, n) is invalid.
randmask_mask_t make_mask(int64_t out, int64_t in, int64_t n, uint64_t key) {
    randmask_mask_t m;
    m.numel = 0;
    if (out <= 0 || in <= 0 || out * in > (int64_t)RANDMASK_MAX_ENTRIES || n < 0 || n > out * in) return m;
    return randmask_mask_init((uint32_t)out, (uint32_t)in, key);
}

int launch_status() { return cudaGetLastError() == cudaSuccess ? RANDMASK_OK : RANDMASK_ECUDA; }

unsigned grid_for(int64_t n) {
    int64_t blocks = (n + kThreads - 1) / kThreads;
    return (unsigned)(blocks < 65535 * 32 ? blocks : 65535 * 32);
}

// Masked gradient, gather-dot over slots:
//   out[k] = sum_{t in this block's token range} grad_y[t, r_k] * x[t, c_k]        (fp32)
// Layout: block = (kSlots = 32, kLanesT = 8) threads; blockIdx.x picks 32 consecutive slots, lane x = slot, warp
// y = token lane (t = t0 + y, t0 + y + 8, ...); blockIdx.y picks one of `splits` contiguous token ranges. Warp y's
// 32 lanes read one token row of x and of grad_y at their 32 columns. The 8 token lanes are summed in a fixed
// order through shared memory (deterministic); with splits > 1 the block writes partial[split * n + k] and
// reduce_splits_kernel adds the splits in order, otherwise it writes g[k] directly.
template <int D>
__global__ void __launch_bounds__(kSlots * kLanesT)
    masked_grad_kernel(const void* __restrict__ x, int64_t x_st, int64_t x_sc, const void* __restrict__ gy,
                       int64_t gy_st, int64_t gy_sc, int64_t tokens, int64_t n, randmask_mask_t mask,
                       float* __restrict__ dst, int64_t t_per_split) {
    __shared__ uint32_t s_row[kSlots], s_col[kSlots];
    __shared__ float s_sum[kLanesT][kSlots + 1];
    const int lane = threadIdx.x, tl = threadIdx.y;
    const int64_t k = (int64_t)blockIdx.x * kSlots + lane;
    const bool live = k < n;
    if (tl == 0) {  // one warp hashes the block's 32 positions
        uint32_t r = 0, c = 0;
        if (live) randmask_position(&mask, (uint32_t)k, &r, &c);
        s_row[lane] = r;
        s_col[lane] = c;
    }
    __syncthreads();
    const int64_t t_begin = (int64_t)blockIdx.y * t_per_split;
    const int64_t t_end = min(tokens, t_begin + t_per_split);
    const int64_t xo = (int64_t)s_col[lane] * x_sc, go = (int64_t)s_row[lane] * gy_sc;
    float acc0 = 0.f, acc1 = 0.f;
    if (live) {
        int64_t t = t_begin + tl;
        for (; t + kLanesT < t_end; t += 2 * kLanesT) {  // two tokens per trip: two loads in flight per operand
            acc0 += load_f32<D>(gy, t * gy_st + go) * load_f32<D>(x, t * x_st + xo);
            acc1 += load_f32<D>(gy, (t + kLanesT) * gy_st + go) * load_f32<D>(x, (t + kLanesT) * x_st + xo);
        }
        if (t < t_end) acc0 += load_f32<D>(gy, t * gy_st + go) * load_f32<D>(x, t * x_st + xo);
    }
    s_sum[tl][lane] = acc0 + acc1;
    __syncthreads();
    if (tl == 0 && live) {
        float s = 0.f;
#pragma unroll
        for (int j = 0; j < kLanesT; ++j) s += s_sum[j][lane];
        dst[(int64_t)blockIdx.y * n + k] = s;
    }
}

// g[k] = sum_{s < splits} partial[s * n + k], in split order. One thread per slot, grid-stride.
__global__ void reduce_splits_kernel(const float* __restrict__ partial, int64_t splits, int64_t n,
                                     float* __restrict__ g) {
    for (int64_t k = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; k < n; k += (int64_t)gridDim.x * blockDim.x) {
        float s = 0.f;
        for (int64_t j = 0; j < splits; ++j) s += partial[j * n + k];
        g[k] = s;
    }
}

// Gather: base[k] = weight[r_k, c_k] (bit copy). One thread per slot, grid-stride, 256 threads per block.
template <typename E>
__global__ void gather_kernel(const E* __restrict__ w, int64_t sr, int64_t sc, int64_t n, randmask_mask_t mask,
                              E* __restrict__ base) {
    for (int64_t k = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; k < n; k += (int64_t)gridDim.x * blockDim.x) {
        uint32_t r, c;
        randmask_position(&mask, (uint32_t)k, &r, &c);
        base[k] = w[(int64_t)r * sr + (int64_t)c * sc];
    }
}

// Sparse update: weight[r_k, c_k] = round_WD(float(base[k]) + delta[k]). One thread per slot, grid-stride,
// 256 threads per block; sigma is a bijection, so no two threads write one entry.
template <int WD, int BD>
__global__ void update_kernel(void* __restrict__ w, int64_t sr, int64_t sc, const void* __restrict__ base,
                              const float* __restrict__ delta, int64_t n, randmask_mask_t mask) {
    for (int64_t k = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; k < n; k += (int64_t)gridDim.x * blockDim.x) {
        uint32_t r, c;
        randmask_position(&mask, (uint32_t)k, &r, &c);
        store_rounded<WD>(w, (int64_t)r * sr + (int64_t)c * sc, load_f32<BD>(base, k) + delta[k]);
    }
}

// Fused AdamW + weight update, one thread per slot (grid-stride, 256 threads per block), fp32 throughout, with
// the roundings of kernels/masked_adamw.py (torch's CPU AdamW op for op): every operation is an explicit
// round-to-nearest intrinsic, so nvcc contracts nothing except the three fmas written out:
//   p = delta[k] * decay
//   m = lerp(m, g, lerp_w):  fma(lerp_w, g - m, m) if lerp_w < 0.5, else fma(lerp_w - 1, g - m, g)
//   v = fma(one_minus_beta2 * g, g, v * beta2)
//   p = p + (neg_step_size * m) / (sqrt(v) / bc2_sqrt + eps)
//   weight[r_k, c_k] = round_WD(float(base[k]) + p)
struct AdamWScalars {
    float decay, lerp_w, beta2, one_minus_beta2, neg_step_size, bc2_sqrt, eps;
};

template <int WD, int BD>
__global__ void adamw_update_kernel(void* __restrict__ w, int64_t sr, int64_t sc, const void* __restrict__ base,
                                    float* __restrict__ delta, const float* __restrict__ grad,
                                    float* __restrict__ exp_avg, float* __restrict__ exp_avg_sq, int64_t n,
                                    randmask_mask_t mask, AdamWScalars s) {
    for (int64_t k = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; k < n; k += (int64_t)gridDim.x * blockDim.x) {
        const float g = grad[k];
        float p = __fmul_rn(delta[k], s.decay);
        float m = exp_avg[k];
        const float diff = __fsub_rn(g, m);
        m = s.lerp_w < 0.5f ? __fmaf_rn(s.lerp_w, diff, m) : __fmaf_rn(__fsub_rn(s.lerp_w, 1.f), diff, g);
        const float v = __fmaf_rn(__fmul_rn(s.one_minus_beta2, g), g, __fmul_rn(exp_avg_sq[k], s.beta2));
        const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(v), s.bc2_sqrt), s.eps);
        p = __fadd_rn(p, __fdiv_rn(__fmul_rn(s.neg_step_size, m), denom));
        delta[k] = p;
        exp_avg[k] = m;
        exp_avg_sq[k] = v;
        uint32_t r, c;
        randmask_position(&mask, (uint32_t)k, &r, &c);
        store_rounded<WD>(w, (int64_t)r * sr + (int64_t)c * sc, __fadd_rn(load_f32<BD>(base, k), p));
    }
}

template <int D>
void launch_masked_grad(const void* x, int64_t x_st, int64_t x_sc, const void* gy, int64_t gy_st, int64_t gy_sc,
                        int64_t tokens, int64_t n, const randmask_mask_t& mask, float* dst, int64_t splits,
                        cudaStream_t stream) {
    const int64_t per = (tokens + splits - 1) / splits;
    const dim3 grid((unsigned)((n + kSlots - 1) / kSlots), (unsigned)splits), block(kSlots, kLanesT);
    masked_grad_kernel<D><<<grid, block, 0, stream>>>(x, x_st, x_sc, gy, gy_st, gy_sc, tokens, n, mask, dst, per);
}

// base is fp32 or the weight's dtype (kernels/native.py widens any other base to fp32, exactly): 5 instantiations
// per kernel instead of 9 keeps the nvcc build short.
template <int WD, template <int, int> class Launch, typename... Args>
void dispatch_base(int base_dtype, Args... args) {
    if (base_dtype == RANDMASK_F32) Launch<WD, RANDMASK_F32>::run(args...);
    else Launch<WD, WD>::run(args...);
}

template <int WD, int BD>
struct UpdateLaunch {
    static void run(void* w, int64_t sr, int64_t sc, const void* base, const float* delta, int64_t n,
                    randmask_mask_t mask, cudaStream_t stream) {
        update_kernel<WD, BD><<<grid_for(n), kThreads, 0, stream>>>(w, sr, sc, base, delta, n, mask);
    }
};

template <int WD, int BD>
struct AdamWLaunch {
    static void run(void* w, int64_t sr, int64_t sc, const void* base, float* delta, const float* grad, float* m,
                    float* v, int64_t n, randmask_mask_t mask, AdamWScalars s, cudaStream_t stream) {
        adamw_update_kernel<WD, BD><<<grid_for(n), kThreads, 0, stream>>>(w, sr, sc, base, delta, grad, m, v, n, mask,
                                                                           s);
    }
};

template <template <int, int> class Launch, typename... Args>
void dispatch_weight(int w_dtype, int base_dtype, Args... args) {
    if (w_dtype == RANDMASK_F32) dispatch_base<RANDMASK_F32, Launch>(base_dtype, args...);
    else if (w_dtype == RANDMASK_F16) dispatch_base<RANDMASK_F16, Launch>(base_dtype, args...);
    else dispatch_base<RANDMASK_BF16, Launch>(base_dtype, args...);
}

}  // namespace

extern "C" {

int randmask_cuda_abi_version(void) { return RANDMASK_NATIVE_ABI; }

int64_t randmask_cuda_masked_grad_splits(int64_t n, int64_t tokens, int sms) {
    // Enough blocks for ~4 waves of 256-thread blocks, but at least 64 tokens per split and at most 64 splits.
    const int64_t blocks = (n + kSlots - 1) / kSlots, want = 4 * (int64_t)(sms > 0 ? sms : 1);
    int64_t splits = blocks >= want ? 1 : (want + blocks - 1) / blocks;
    const int64_t cap = tokens / 64 > 1 ? tokens / 64 : 1;
    if (splits > cap) splits = cap;
    return splits > 64 ? 64 : (splits < 1 ? 1 : splits);
}

int randmask_cuda_masked_grad(const void* x, int x_dtype, int64_t x_st, int64_t x_sc, const void* grad_y,
                              int gy_dtype, int64_t gy_st, int64_t gy_sc, int64_t tokens, int64_t in, int64_t out,
                              int64_t n, uint64_t key, float* g, float* partial, int64_t splits, void* stream) {
    if (!valid_dtype(x_dtype) || gy_dtype != x_dtype) return RANDMASK_EDTYPE;  // one dtype (native.py casts)
    if (n < 0 || tokens < 0 || out < 0 || in < 0 || n > out * in || (n && !g)) return RANDMASK_EINVAL;
    if (n == 0) return RANDMASK_OK;
    const randmask_mask_t mask = make_mask(out, in, n, key);
    if (!mask.numel || splits < 1 || splits > 65535 || (splits > 1 && !partial)) return RANDMASK_EINVAL;
    cudaStream_t s = static_cast<cudaStream_t>(stream);
    if (tokens == 0) {
        cudaMemsetAsync(g, 0, sizeof(float) * (size_t)n, s);
        return launch_status();
    }
    if (!x || !grad_y || (n + kSlots - 1) / kSlots > 0x7FFFFFFF) return RANDMASK_EINVAL;
    float* dst = splits > 1 ? partial : g;
    if (x_dtype == RANDMASK_F32)
        launch_masked_grad<RANDMASK_F32>(x, x_st, x_sc, grad_y, gy_st, gy_sc, tokens, n, mask, dst, splits, s);
    else if (x_dtype == RANDMASK_F16)
        launch_masked_grad<RANDMASK_F16>(x, x_st, x_sc, grad_y, gy_st, gy_sc, tokens, n, mask, dst, splits, s);
    else
        launch_masked_grad<RANDMASK_BF16>(x, x_st, x_sc, grad_y, gy_st, gy_sc, tokens, n, mask, dst, splits, s);
    if (splits > 1) reduce_splits_kernel<<<grid_for(n), kThreads, 0, s>>>(partial, splits, n, g);
    return launch_status();
}

int randmask_cuda_gather_weight(const void* weight, int w_dtype, int64_t w_sr, int64_t w_sc, int64_t out, int64_t in,
                                int64_t n, uint64_t key, void* base, void* stream) {
    if (!valid_dtype(w_dtype)) return RANDMASK_EDTYPE;
    if (n < 0 || out < 0 || in < 0 || n > out * in || (n && (!weight || !base))) return RANDMASK_EINVAL;
    if (n == 0) return RANDMASK_OK;
    const randmask_mask_t mask = make_mask(out, in, n, key);
    if (!mask.numel) return RANDMASK_EINVAL;
    cudaStream_t s = static_cast<cudaStream_t>(stream);
    if (w_dtype == RANDMASK_F32)
        gather_kernel<<<grid_for(n), kThreads, 0, s>>>(static_cast<const uint32_t*>(weight), w_sr, w_sc, n, mask,
                                                       static_cast<uint32_t*>(base));
    else
        gather_kernel<<<grid_for(n), kThreads, 0, s>>>(static_cast<const uint16_t*>(weight), w_sr, w_sc, n, mask,
                                                       static_cast<uint16_t*>(base));
    return launch_status();
}

int randmask_cuda_sparse_update(void* weight, int w_dtype, int64_t w_sr, int64_t w_sc, int64_t out, int64_t in,
                                const void* base, int base_dtype, const float* delta, int64_t n, uint64_t key,
                                void* stream) {
    if (!valid_dtype(w_dtype) || (base_dtype != w_dtype && base_dtype != RANDMASK_F32)) return RANDMASK_EDTYPE;
    if (n < 0 || out < 0 || in < 0 || n > out * in || (n && (!weight || !base || !delta))) return RANDMASK_EINVAL;
    if (n == 0) return RANDMASK_OK;
    const randmask_mask_t mask = make_mask(out, in, n, key);
    if (!mask.numel) return RANDMASK_EINVAL;
    dispatch_weight<UpdateLaunch>(w_dtype, base_dtype, weight, w_sr, w_sc, base, delta, n, mask,
                                  static_cast<cudaStream_t>(stream));
    return launch_status();
}

int randmask_cuda_adamw_update(void* weight, int w_dtype, int64_t w_sr, int64_t w_sc, int64_t out, int64_t in,
                               const void* base, int base_dtype, float* delta, const float* grad, float* exp_avg,
                               float* exp_avg_sq, int64_t n, uint64_t key, float decay, float lerp_weight,
                               float beta2, float one_minus_beta2, float neg_step_size, float bias_correction2_sqrt,
                               float eps, void* stream) {
    if (!valid_dtype(w_dtype) || (base_dtype != w_dtype && base_dtype != RANDMASK_F32)) return RANDMASK_EDTYPE;
    if (n < 0 || out < 0 || in < 0 || n > out * in) return RANDMASK_EINVAL;
    if (n && (!weight || !base || !delta || !grad || !exp_avg || !exp_avg_sq)) return RANDMASK_EINVAL;
    if (n == 0) return RANDMASK_OK;
    const randmask_mask_t mask = make_mask(out, in, n, key);
    if (!mask.numel) return RANDMASK_EINVAL;
    const AdamWScalars s = {decay, lerp_weight, beta2, one_minus_beta2, neg_step_size, bias_correction2_sqrt, eps};
    dispatch_weight<AdamWLaunch>(w_dtype, base_dtype, weight, w_sr, w_sc, base, delta, grad, exp_avg, exp_avg_sq, n,
                                 mask, s, static_cast<cudaStream_t>(stream));
    return launch_status();
}

}  // extern "C"
