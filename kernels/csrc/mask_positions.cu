// mask_positions.cu: (row, col) of every trainable slot of one masked matrix, on the GPU.
//
// Math (mask scheme 1, see randmask_mask.h and kernels/mask_addressing.py): slot k in [0, n) lives at flat
// position p = sigma(k) of the (out, in) matrix, sigma a keyed 6-round Feistel permutation of [0, out*in) with
// cycle-walking; rows[k] = p / in, cols[k] = p % in. Must match positions computed by the torch twin bit for bit.
//
// Launch layout: 1-D grid-stride loop, one thread per slot; e.g. 256 threads per block and
// min(ceil(n / 256), 65535) blocks (any grid works). The randmask_mask_t (44 bytes) is passed by value.
//
// Compile-checked only for now (CMakeLists.txt, sm_80/sm_90); the CUDA backend proper comes later.
#include <stdint.h>

#include <cuda_runtime.h>

#include "randmask_mask.h"

extern "C" __global__ void randmask_mask_positions_kernel(randmask_mask_t mask, uint32_t n, int64_t* __restrict__ rows,
                                                          int64_t* __restrict__ cols) {
    for (uint32_t k = blockIdx.x * blockDim.x + threadIdx.x; k < n; k += gridDim.x * blockDim.x) {
        uint32_t r, c;
        randmask_position(&mask, k, &r, &c);
        rows[k] = r;
        cols[k] = c;
    }
}

// Host launcher: n slots (n <= out*in) into device arrays rows[n], cols[n] on `stream`.
extern "C" cudaError_t randmask_mask_positions(uint32_t out, uint32_t in, uint64_t key, uint32_t n, int64_t* rows,
                                               int64_t* cols, cudaStream_t stream) {
    if (n == 0) return cudaSuccess;
    randmask_mask_t mask = randmask_mask_init(out, in, key);
    if (mask.numel == 0 || n > mask.numel) return cudaErrorInvalidValue;
    const unsigned threads = 256;
    unsigned blocks = (n + threads - 1) / threads;
    if (blocks > 65535u) blocks = 65535u;
    randmask_mask_positions_kernel<<<blocks, threads, 0, stream>>>(mask, n, rows, cols);
    return cudaGetLastError();
}
