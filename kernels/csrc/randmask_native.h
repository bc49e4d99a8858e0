/* randmask_native.h: the plain C ABI of the native CPU library _randmask_native (native_cpu.cpp, C++17 + OpenMP),
 * loaded from Python with ctypes (kernels/native.py); no torch, no Python needed to build or call it.
 *
 * Tensors cross the boundary as structs: a 2-D matrix view (data, dtype code, rows, cols, strides in elements) or a
 * contiguous vector (data, dtype code, length). A mask is (out, in, n, key); positions are computed inline from the
 * key with randmask_mask.h, so no index array crosses the boundary. The caller (kernels/native.py) checks devices,
 * shapes and dtypes first; the functions check them again and return a negative status instead of touching memory
 * when something is off. Every function returns RANDMASK_OK (0) or one of the negative RANDMASK_E* codes below.
 * `nthreads` <= 0 means OpenMP's default.
 *
 * Bump RANDMASK_NATIVE_ABI whenever a struct, a signature or a dtype code changes: kernels/native.py refuses a
 * library built from other sources (a stale build) and says why.
 */
#ifndef RANDMASK_NATIVE_H
#define RANDMASK_NATIVE_H

#include <stdint.h>

#define RANDMASK_NATIVE_ABI 3

/* dtype codes */
#define RANDMASK_F32 0
#define RANDMASK_F16 1
#define RANDMASK_BF16 2

/* status codes */
#define RANDMASK_OK 0
#define RANDMASK_EINVAL -1 /* bad shape, count, stride or null pointer */
#define RANDMASK_EDTYPE -2 /* unsupported dtype code */
#define RANDMASK_ENOMEM -3 /* scratch allocation failed */

#ifdef _WIN32
#define RANDMASK_API __declspec(dllexport)
#else
#define RANDMASK_API __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* A 2-D view: element (r, c) is at data[r * stride_r + c * stride_c] (strides in elements, any layout). */
typedef struct randmask_matrix {
    void* data;
    int32_t dtype;
    int64_t rows, cols;
    int64_t stride_r, stride_c;
} randmask_matrix_t;

/* A contiguous vector of `length` elements. */
typedef struct randmask_vector {
    void* data;
    int32_t dtype;
    int64_t length;
} randmask_vector_t;

/* The mask of one (out, in) matrix: n trainable slots keyed by `key` (randmask_mask.h). */
typedef struct randmask_mask_args {
    int64_t out, in, n;
    uint64_t key;
} randmask_mask_args_t;

RANDMASK_API int randmask_cpu_abi_version(void);
/* The number of threads the kernels use when nthreads <= 0 (1 without OpenMP). */
RANDMASK_API int randmask_cpu_max_threads(void);
/* The instruction set of the vector loops: "avx512f", "avx2" or "portable" (the best this CPU has, chosen at load
 * time). randmask_cpu_select_isa("avx2" | "portable" | "avx512f" | "best") switches it for the whole process (the
 * tests run every version this CPU can); RANDMASK_EINVAL if this CPU lacks that ISA. */
RANDMASK_API const char* randmask_cpu_isa(void);
RANDMASK_API int randmask_cpu_select_isa(const char* name);

/* rows[k], cols[k] = position of slot k, k in [0, n) (int64, the torch twin's layout). */
RANDMASK_API int randmask_cpu_positions(const randmask_mask_args_t* mask, int64_t* rows, int64_t* cols, int nthreads);

/* g[k] = sum_t grad_y[t, r_k] * x[t, c_k] with fp32 accumulation, k in [0, n). x is (T, in), grad_y is (T, out), each
 * in its own dtype; g is n contiguous fp32 values (overwritten). */
RANDMASK_API int randmask_cpu_masked_grad(const randmask_matrix_t* x, const randmask_matrix_t* grad_y,
                                          const randmask_mask_args_t* mask, float* g, int nthreads);

/* base[k] = weight[r_k, c_k] (a bit copy; base holds n values in the weight's dtype). */
RANDMASK_API int randmask_cpu_gather_weight(const randmask_matrix_t* weight, const randmask_mask_args_t* mask,
                                            const randmask_vector_t* base, int nthreads);

/* weight[r_k, c_k] = round_to_weight_dtype(float(base[k]) + delta[k]) (round to nearest even), k in [0, n); delta
 * is fp32. No other entry of weight is written. */
RANDMASK_API int randmask_cpu_sparse_update(const randmask_matrix_t* weight, const randmask_vector_t* base,
                                            const randmask_vector_t* delta, const randmask_mask_args_t* mask,
                                            int nthreads);

/* The additive path's product with the sparse matrix S(delta) (out x in, delta[k] at (r_k, c_k)), in place on `out`:
 *   transpose == 0: out[t, r_k] += delta[k] * src[t, c_k]   out is (T, out), src is (T, in)
 *   transpose == 1: out[t, c_k] += delta[k] * src[t, r_k]   out is (T, in),  src is (T, out)
 * Each element reached by a slot is written once: round_to_out_dtype(float(out[t, j]) + acc), acc the fp32 sum in
 * increasing slot order of the rounded fp32 products delta[k] * float(src[t, i_k]); elements no slot reaches are not
 * written. Bitwise the same result for every thread count and every ISA. out and src each in their own dtype;
 * delta is n contiguous fp32 values. Cost O(T n). */
RANDMASK_API int randmask_cpu_sparse_add(const randmask_matrix_t* out, const randmask_matrix_t* src,
                                         const randmask_vector_t* delta, const randmask_mask_args_t* mask,
                                         int transpose, int nthreads);

#ifdef __cplusplus
}
#endif

#endif /* RANDMASK_NATIVE_H */
