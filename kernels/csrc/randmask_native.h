/* randmask_native.h: the plain C ABI of the native libraries, loaded from Python with ctypes (kernels/native.py).
 *
 *   _randmask_native.so  (native_cpu.cpp, C++17 + OpenMP)   randmask_cpu_*   no torch, no CUDA, no Python needed
 *   _randmask_cuda.so    (native_cuda.cu + mask_positions.cu)  randmask_cuda_*  built when CMake finds nvcc
 *
 * Tensors cross the boundary as (data pointer, dtype code, strides in elements); the caller (kernels/native.py)
 * checks devices, shapes and dtypes first, and the functions check them again and return a negative status instead
 * of touching memory when something is off. Masks are (out, in, n, key) and positions are computed inline from the
 * key with randmask_mask.h: no index array crosses the boundary. Every function returns RANDMASK_OK (0) or one of
 * the negative RANDMASK_E* codes below; the CUDA launchers are asynchronous on `stream` (a cudaStream_t; NULL = the
 * legacy default stream) and report launch errors only.
 *
 * Bump RANDMASK_NATIVE_ABI whenever a signature or a dtype code changes: kernels/native.py refuses a library built
 * from other sources (a stale build), which then reads "not built" with the reason.
 */
#ifndef RANDMASK_NATIVE_H
#define RANDMASK_NATIVE_H

#include <stdint.h>

#define RANDMASK_NATIVE_ABI 1

/* dtype codes */
#define RANDMASK_F32 0
#define RANDMASK_F16 1
#define RANDMASK_BF16 2

/* status codes */
#define RANDMASK_OK 0
#define RANDMASK_EINVAL -1  /* bad shape, count, stride or null pointer */
#define RANDMASK_EDTYPE -2  /* unsupported dtype code */
#define RANDMASK_ENOMEM -3  /* scratch allocation failed */
#define RANDMASK_ECUDA -4   /* a CUDA launch failed (cudaGetLastError) */

#ifdef _WIN32
#define RANDMASK_API __declspec(dllexport)
#else
#define RANDMASK_API __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* ---------------------------------------------------------------- CPU (_randmask_native) */
RANDMASK_API int randmask_cpu_abi_version(void);
/* The number of threads the CPU kernels use when nthreads <= 0 (OpenMP's default), and whether OpenMP is in. */
RANDMASK_API int randmask_cpu_max_threads(void);
/* The instruction set of the masked gradient's dot-product loop: "avx512f", "avx2" or "portable" (the best this
 * CPU has, chosen at load time). randmask_cpu_select_isa("avx2" | "portable" | "avx512f" | "best") switches it for
 * the whole process (tests run every version this CPU can); RANDMASK_EINVAL if this CPU lacks that ISA. */
RANDMASK_API const char* randmask_cpu_isa(void);
RANDMASK_API int randmask_cpu_select_isa(const char* name);

/* rows[k], cols[k] = position of slot k, k in [0, n) (int64, the torch twin's layout). */
RANDMASK_API int randmask_cpu_positions(int64_t out, int64_t in, int64_t n, uint64_t key, int64_t* rows,
                                        int64_t* cols, int nthreads);

/* g[k] = sum_t grad_y[t, r_k] * x[t, c_k], fp32 accumulation, k in [0, n). x is (T, in), grad_y is (T, out), each
 * with its own dtype code and (token, feature) strides in elements; g is n contiguous fp32 values (overwritten). */
RANDMASK_API int randmask_cpu_masked_grad(const void* x, int x_dtype, int64_t x_st, int64_t x_sc, const void* grad_y,
                                          int gy_dtype, int64_t gy_st, int64_t gy_sc, int64_t tokens, int64_t in,
                                          int64_t out, int64_t n, uint64_t key, float* g, int nthreads);

/* base[k] = weight[r_k, c_k] (bit copy, base contiguous in the weight's dtype). */
RANDMASK_API int randmask_cpu_gather_weight(const void* weight, int w_dtype, int64_t w_sr, int64_t w_sc, int64_t out,
                                            int64_t in, int64_t n, uint64_t key, void* base, int nthreads);

/* weight[r_k, c_k] = round_to_weight_dtype(float(base[k]) + delta[k]) (round to nearest even), k in [0, n);
 * base contiguous in base_dtype, delta contiguous fp32. No other entry of weight is written. */
RANDMASK_API int randmask_cpu_sparse_update(void* weight, int w_dtype, int64_t w_sr, int64_t w_sc, int64_t out,
                                            int64_t in, const void* base, int base_dtype, const float* delta,
                                            int64_t n, uint64_t key, int nthreads);

/* ---------------------------------------------------------------- CUDA (_randmask_cuda); pointers are device pointers
 * Same semantics as the CPU functions, with two dtype restrictions that keep the nvcc build small: x and grad_y
 * share one dtype, and base is fp32 or the weight's dtype (RANDMASK_EDTYPE otherwise; kernels/native.py converts). */
RANDMASK_API int randmask_cuda_abi_version(void);

RANDMASK_API int randmask_cuda_masked_grad(const void* x, int x_dtype, int64_t x_st, int64_t x_sc, const void* grad_y,
                                           int gy_dtype, int64_t gy_st, int64_t gy_sc, int64_t tokens, int64_t in,
                                           int64_t out, int64_t n, uint64_t key, float* g, float* partial,
                                           int64_t splits, void* stream);
/* How many token splits randmask_cuda_masked_grad wants for (n, tokens) on a GPU with `sms` multiprocessors; the
 * caller passes a scratch `partial` of splits * n fp32 values when splits > 1 (NULL otherwise). */
RANDMASK_API int64_t randmask_cuda_masked_grad_splits(int64_t n, int64_t tokens, int sms);

RANDMASK_API int randmask_cuda_gather_weight(const void* weight, int w_dtype, int64_t w_sr, int64_t w_sc, int64_t out,
                                             int64_t in, int64_t n, uint64_t key, void* base, void* stream);

RANDMASK_API int randmask_cuda_sparse_update(void* weight, int w_dtype, int64_t w_sr, int64_t w_sc, int64_t out,
                                             int64_t in, const void* base, int base_dtype, const float* delta,
                                             int64_t n, uint64_t key, void* stream);

/* Fused AdamW step on the n trainable values plus the weight write, one pass, one thread per slot; the same math
 * and roundings as kernels/masked_adamw.py (torch.optim.AdamW's single-tensor step, op for op):
 *   delta *= decay                                                     decay = 1 - lr * weight_decay
 *   m = lerp(m, grad, lerp_weight)                                     lerp_weight = 1 - beta1
 *   v = beta2 * v + one_minus_beta2 * grad * grad
 *   delta += neg_step_size * m / (sqrt(v) / bias_correction2_sqrt + eps)   neg_step_size = -lr / (1 - beta1^step)
 *   weight[r_k, c_k] = round_to_weight_dtype(float(base[k]) + delta[k])
 * The step-dependent scalars come from the host (masked_adamw.adamw_scalars, Python floats rounded to fp32).
 * delta, grad, exp_avg, exp_avg_sq: n contiguous fp32 values, updated in place (grad is only read). */
RANDMASK_API int randmask_cuda_adamw_update(void* weight, int w_dtype, int64_t w_sr, int64_t w_sc, int64_t out,
                                            int64_t in, const void* base, int base_dtype, float* delta,
                                            const float* grad, float* exp_avg, float* exp_avg_sq, int64_t n,
                                            uint64_t key, float decay, float lerp_weight, float beta2,
                                            float one_minus_beta2, float neg_step_size, float bias_correction2_sqrt,
                                            float eps, void* stream);

#ifdef __cplusplus
}
#endif

#endif /* RANDMASK_NATIVE_H */
