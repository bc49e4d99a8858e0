// native_cpu.cpp: the native CPU kernels of randmask (C++17, OpenMP), behind the C ABI of randmask_native.h.
//
// Positions are computed inline from the key (randmask_mask.h's bijection, restated as a vectorised loop and held
// bit-identical to the header and the torch twin by the tests): no index tensor is read or kept between calls.
// Inputs are fp32, fp16 or bf16 with any strides; sums are fp32.
//
// Masked gradient g[k] = sum_t grad_y[t, r_k] * x[t, c_k], the way that keeps the loads in cache (DESIGN.md):
//   0. a handful of slots (kDirectRatio * n < in + out): no transposes; threads over slots (dynamic, 8 at a time),
//      each slot a strided dot product straight from the (T, features) inputs with 4 partial sums.
//   Otherwise, one parallel region of nt threads (nt = torch's intra-op thread count; 1 below kSerialWork):
//   1. positions: each thread computes (r_k, c_k) for its static range of slots; when rows hold >= 2 slots on
//      average (n >= 2 * out) a counting sort by row (per-thread histograms, one serial prefix sum) groups them,
//      so consecutive dot products share the row of grad_y^T (scratch: 8-20 bytes per slot);
//   2. per chunk of TC tokens (TC: both transposed copies in ~768 KiB, see kChunkBytes; 16 <= TC <= 1024), threads
//      split the chunk in tiles of 16 tokens x 1024 features and transpose x and grad_y into fp32 (in, TC) and
//      (out, TC) buffers, every feature one contiguous, 64-byte aligned, zero-padded token vector (8x8 AVX2 register
//      transposes when the features are contiguous); barrier;
//   3. threads take blocks of 256 slots of the (sorted) list dynamically; a slot is a dot product of two
//      contiguous vectors, four slots of one row at a time (one load of the grad_y row feeds four FMA chains, and
//      their four sums are reduced together), added into g[k]; barrier, next chunk. The blocks are fixed, so
//      results do not depend on the thread count.
// Sparse add (out += src S(delta)^T, or src S(delta) transposed): slots sorted by destination column, tiles of 64
// tokens, each column's sums in registers; see the comment that opens its kernel ("Sparse add, ...") below.
// Gather / sparse update: threads over blocks of 1024 slots (positions of a block, then the reads or the rounded
// writes). The loops exist for AVX-512, AVX2+FMA+F16C (intrinsics or vectorised C++ under per-function target
// attributes) and portable C++; the best this CPU supports is picked when the library loads, so the library
// needs no -march flag and runs on any x86-64 (or other) CPU.
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#include <type_traits>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "randmask_dtype.h"
#include "randmask_mask.h"
#include "randmask_native.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define RANDMASK_X86 1
#define RANDMASK_TARGET(isa) __attribute__((target(isa)))
#else
#define RANDMASK_X86 0
#endif

namespace {

constexpr int64_t kAlign = 16;          // floats per 64-byte line: token vectors are padded to a multiple of this
// Target size of one chunk's transposed copies: both fit a core's L2 (512 KiB-2 MiB). A 2 MiB target traded
// one-thread speed for two-thread speed (BENCHMARKS.md, designs tried and dropped).
constexpr int64_t kChunkBytes = 768 << 10;
constexpr int64_t kMinChunk = 16, kMaxChunk = 1024;  // tokens per chunk (16 only for very wide layers)
constexpr int64_t kSerialWork = 1 << 20;  // below this many multiply-adds one thread does the whole call
constexpr int64_t kDotBlock = 256;        // slots per unit of work of the dot-product phase
constexpr int64_t kDirectRatio = 12;      // masked gradient without transposes while kDirectRatio * n < in + out

int threads_for(int nthreads) {
#ifdef _OPENMP
    return nthreads > 0 ? nthreads : omp_get_max_threads();
#else
    (void)nthreads;
    return 1;
#endif
}

bool valid_dtype(int d) { return d == RANDMASK_F32 || d == RANDMASK_F16 || d == RANDMASK_BF16; }

size_t dtype_size(int d) { return d == RANDMASK_F32 ? 4 : 2; }

// Whether mask_args describes a valid mask: 0 <= out, in; out * in < 2^31; 0 <= n <= out * in.
bool valid_mask(const randmask_mask_args_t* a) {
    const int64_t max = (int64_t)RANDMASK_MAX_ENTRIES;
    return a->out >= 0 && a->in >= 0 && a->out <= max && a->in <= max && a->out * a->in <= max && a->n >= 0 &&
           a->n <= a->out * a->in;
}

// The mask of a valid mask_args with n > 0 (so out, in > 0).
randmask_mask_t make_mask(const randmask_mask_args_t* a) {
    return randmask_mask_init((uint32_t)a->out, (uint32_t)a->in, a->key);
}

// 64-byte aligned scratch, freed on scope exit; data() is null when the allocation failed.
struct Scratch {
    void* p = nullptr;
    explicit Scratch(size_t bytes) {
        if (bytes) p = std::aligned_alloc(64, (bytes + 63) / 64 * 64);
    }
    ~Scratch() { std::free(p); }
    Scratch(const Scratch&) = delete;
    Scratch& operator=(const Scratch&) = delete;
    template <typename T>
    T* as() const { return static_cast<T*>(p); }
};

template <int D>
inline float load_f32(const void* base, int64_t i) {
    if constexpr (D == RANDMASK_F32) return static_cast<const float*>(base)[i];
    else if constexpr (D == RANDMASK_F16) return randmask_f16_to_f32(static_cast<const uint16_t*>(base)[i]);
    else return randmask_bf16_to_f32(static_cast<const uint16_t*>(base)[i]);
}

template <int D>
inline void store_rounded(void* base, int64_t i, float v) {
    if constexpr (D == RANDMASK_F32) static_cast<float*>(base)[i] = v;
    else if constexpr (D == RANDMASK_F16) static_cast<uint16_t*>(base)[i] = randmask_f32_to_f16(v);
    else static_cast<uint16_t*>(base)[i] = randmask_f32_to_bf16(v);
}

int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// The transposes: dst[f * ld + t] = float(src[(t0 + t) * st + f * sc]) for f < features, t < tc, and zero for
// tc <= t < ld. Called inside a parallel region: threads split the chunk in tiles of kTokenTile tokens x
// kFeatureSpan features, token tile by token tile (a thread's static share is a run of whole token rows). In a
// training step x is cold (the forward wrote it long before), so the transposes read from memory: a tile reads 16
// rows in runs of 4 KiB, which the hardware prefetcher follows (blocks of 64 features, read in 256-byte runs, were
// slower with cold inputs: bench_masked_grad.py --cold, BENCHMARKS.md). Within a tile, scalar
// (portable: reads of a row-major source are contiguous runs and every written line of dst is filled whole) or 8 x 8
// register transposes (AVX2: 8 loads, 24 in-register shuffles, 8 aligned stores; fp16/bf16 widened on load), the
// latter when the features are contiguous (sc == 1) and the CPU has AVX2 + F16C.
constexpr int64_t kTokenTile = 16, kFeatureSpan = 1024;

template <int D>
void transpose_tile_portable(const void* src, int64_t st, int64_t sc, int64_t t0, int64_t tc, int64_t fb,
                             int64_t fe, float* dst, int64_t ld) {
    for (int64_t t = 0; t < tc; ++t) {
        const int64_t row = (t0 + t) * st;
        for (int64_t f = fb; f < fe; ++f) dst[f * ld + t] = load_f32<D>(src, row + f * sc);
    }
}

#if RANDMASK_X86
template <int D>
RANDMASK_TARGET("avx2,fma,f16c")
inline __m256 load8_f32(const void* base, int64_t i) {
    if constexpr (D == RANDMASK_F32) return _mm256_loadu_ps(static_cast<const float*>(base) + i);
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(base) + i));
    if constexpr (D == RANDMASK_F16) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

template <int D>
RANDMASK_TARGET("avx2,fma,f16c")
void transpose_tile_avx2(const void* src, int64_t st, int64_t t0, int64_t tc, int64_t fb, int64_t fe, float* dst,
                         int64_t ld) {
    const int64_t t8 = tc / 8 * 8, f8 = fb + (fe - fb) / 8 * 8;
    for (int64_t tb = 0; tb < t8; tb += 8) {
        const int64_t row = (t0 + tb) * st;
        for (int64_t f = fb; f < f8; f += 8) {
            __m256 r0 = load8_f32<D>(src, row + f), r1 = load8_f32<D>(src, row + st + f);
            __m256 r2 = load8_f32<D>(src, row + 2 * st + f), r3 = load8_f32<D>(src, row + 3 * st + f);
            __m256 r4 = load8_f32<D>(src, row + 4 * st + f), r5 = load8_f32<D>(src, row + 5 * st + f);
            __m256 r6 = load8_f32<D>(src, row + 6 * st + f), r7 = load8_f32<D>(src, row + 7 * st + f);
            const __m256 u0 = _mm256_unpacklo_ps(r0, r1), u1 = _mm256_unpackhi_ps(r0, r1);
            const __m256 u2 = _mm256_unpacklo_ps(r2, r3), u3 = _mm256_unpackhi_ps(r2, r3);
            const __m256 u4 = _mm256_unpacklo_ps(r4, r5), u5 = _mm256_unpackhi_ps(r4, r5);
            const __m256 u6 = _mm256_unpacklo_ps(r6, r7), u7 = _mm256_unpackhi_ps(r6, r7);
            const __m256 v0 = _mm256_shuffle_ps(u0, u2, 0x44), v1 = _mm256_shuffle_ps(u0, u2, 0xEE);
            const __m256 v2 = _mm256_shuffle_ps(u1, u3, 0x44), v3 = _mm256_shuffle_ps(u1, u3, 0xEE);
            const __m256 v4 = _mm256_shuffle_ps(u4, u6, 0x44), v5 = _mm256_shuffle_ps(u4, u6, 0xEE);
            const __m256 v6 = _mm256_shuffle_ps(u5, u7, 0x44), v7 = _mm256_shuffle_ps(u5, u7, 0xEE);
            float* d = dst + f * ld + tb;  // 32-byte aligned: rows are 64-byte aligned, tb a multiple of 8
            _mm256_store_ps(d, _mm256_permute2f128_ps(v0, v4, 0x20));
            _mm256_store_ps(d + ld, _mm256_permute2f128_ps(v1, v5, 0x20));
            _mm256_store_ps(d + 2 * ld, _mm256_permute2f128_ps(v2, v6, 0x20));
            _mm256_store_ps(d + 3 * ld, _mm256_permute2f128_ps(v3, v7, 0x20));
            _mm256_store_ps(d + 4 * ld, _mm256_permute2f128_ps(v0, v4, 0x31));
            _mm256_store_ps(d + 5 * ld, _mm256_permute2f128_ps(v1, v5, 0x31));
            _mm256_store_ps(d + 6 * ld, _mm256_permute2f128_ps(v2, v6, 0x31));
            _mm256_store_ps(d + 7 * ld, _mm256_permute2f128_ps(v3, v7, 0x31));
        }
    }
    if (f8 < fe) transpose_tile_portable<D>(src, st, 1, t0, t8, f8, fe, dst, ld);  // feature tail
    if (t8 < tc)                                                                     // token tail
        for (int64_t t = t8; t < tc; ++t)
            for (int64_t f = fb; f < fe; ++f) dst[f * ld + t] = load_f32<D>(src, (t0 + t) * st + f);
}
#endif

template <int D>
void transpose_chunk(const void* src, int64_t st, int64_t sc, int64_t t0, int64_t tc, int64_t features, float* dst,
                     int64_t ld, bool fast) {
    const int64_t spans = (features + kFeatureSpan - 1) / kFeatureSpan, tiles = (tc + kTokenTile - 1) / kTokenTile;
#pragma omp for schedule(static) nowait
    for (int64_t u = 0; u < tiles * spans; ++u) {
        // tokens [tb, te) of the chunk, features [fb, fe); dst + tb is 64-byte aligned (tb a multiple of 16)
        const int64_t tb = u / spans * kTokenTile, te = std::min(tb + kTokenTile, tc);
        const int64_t fb = u % spans * kFeatureSpan, fe = std::min(fb + kFeatureSpan, features);
#if RANDMASK_X86
        if (fast && sc == 1) transpose_tile_avx2<D>(src, st, t0 + tb, te - tb, fb, fe, dst + tb, ld);
        else transpose_tile_portable<D>(src, st, sc, t0 + tb, te - tb, fb, fe, dst + tb, ld);
#else
        (void)fast;
        transpose_tile_portable<D>(src, st, sc, t0 + tb, te - tb, fb, fe, dst + tb, ld);
#endif
        if (te == tc)  // the last tile's padding
            for (int64_t f = fb; f < fe; ++f)
                for (int64_t t = tc; t < ld; ++t) dst[f * ld + t] = 0.f;
    }
}

void transpose_any(int dtype, const void* src, int64_t st, int64_t sc, int64_t t0, int64_t tc, int64_t features,
                   float* dst, int64_t ld, bool fast) {
    if (dtype == RANDMASK_F32) transpose_chunk<RANDMASK_F32>(src, st, sc, t0, tc, features, dst, ld, fast);
    else if (dtype == RANDMASK_F16) transpose_chunk<RANDMASK_F16>(src, st, sc, t0, tc, features, dst, ld, fast);
    else transpose_chunk<RANDMASK_BF16>(src, st, sc, t0, tc, features, dst, ld, fast);
}

// g[slot[i]] += dot(gyt[row[i]], xt[col[i]]) over the ld tokens of the chunk (ld a multiple of 16, rows 64-byte
// aligned and zero-padded), for the entries i in [i0, i1) of the slot list (slot == nullptr: slot[i] = i). Four
// consecutive entries of one row share each load of that grad_y row (4 FMA chains, x2 unrolled on AVX-512/AVX2);
// otherwise one dot product with 2-4 chains. One version per ISA, picked at load time (see select_isa): the library
// needs no -march flag and runs on any x86-64 (or any other CPU, with the portable version).
using DotFn = void (*)(const float*, const float*, int64_t, const uint32_t*, const uint32_t*, const uint32_t*,
                       int64_t, int64_t, float*);

inline bool four_in_row(const uint32_t* row, int64_t i, int64_t i1) {
    const uint32_t r = row[i];
    return i + 3 < i1 && row[i + 1] == r && row[i + 2] == r && row[i + 3] == r;
}

// The walk over the entries, shared by every ISA. Dot supplies the arithmetic: four(a, b0, b1, b2, b3, ld, s) sets
// s[j] = dot(a, bj), one(a, b, ld) returns dot(a, b). Each ISA's entry point below is flattened (everything it
// calls is inlined into it), so the walk and that ISA's Dot are compiled together for its target.
template <class Dot>
inline void walk_slots(const float* __restrict gyt, const float* __restrict xt, int64_t ld,
                       const uint32_t* __restrict slot, const uint32_t* __restrict row,
                       const uint32_t* __restrict col, int64_t i0, int64_t i1, float* __restrict g) {
    int64_t i = i0;
    while (i < i1) {
        const float* a = gyt + (int64_t)row[i] * ld;
        if (four_in_row(row, i, i1)) {
            float s[4];
            Dot::four(a, xt + (int64_t)col[i] * ld, xt + (int64_t)col[i + 1] * ld, xt + (int64_t)col[i + 2] * ld,
                      xt + (int64_t)col[i + 3] * ld, ld, s);
            for (int j = 0; j < 4; ++j) g[slot ? slot[i + j] : i + j] += s[j];
            i += 4;
        } else {
            g[slot ? slot[i] : i] += Dot::one(a, xt + (int64_t)col[i] * ld, ld);
            ++i;
        }
    }
}

struct DotPortable {
    static void four(const float* __restrict a, const float* __restrict b0, const float* __restrict b1,
                     const float* __restrict b2, const float* __restrict b3, int64_t ld, float* s) {
        float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
        for (int64_t t = 0; t < ld; ++t) {
            const float av = a[t];
            s0 += av * b0[t];
            s1 += av * b1[t];
            s2 += av * b2[t];
            s3 += av * b3[t];
        }
        s[0] = s0, s[1] = s1, s[2] = s2, s[3] = s3;
    }
    static float one(const float* __restrict a, const float* __restrict b, int64_t ld) {
        float s = 0.f;
#pragma omp simd reduction(+ : s)
        for (int64_t t = 0; t < ld; ++t) s += a[t] * b[t];
        return s;
    }
};

__attribute__((flatten)) void dot_slots_portable(const float* gyt, const float* xt, int64_t ld, const uint32_t* slot,
                                                 const uint32_t* row, const uint32_t* col, int64_t i0, int64_t i1,
                                                 float* g) {
    walk_slots<DotPortable>(gyt, xt, ld, slot, row, col, i0, i1, g);
}

#if RANDMASK_X86
RANDMASK_TARGET("avx512f")
inline __m128 add_lanes512(__m512 v) {
    // The sum of v's four 128-bit lanes. The masked (maskz) extracts: the plain ones (and the 512->256 cast,
    // _mm512_reduce_add_ps) trip GCC 12's -Wmaybe-uninitialized false positive inside its own headers.
    const __m128 lo = _mm_add_ps(_mm512_maskz_extractf32x4_ps(0xF, v, 0), _mm512_maskz_extractf32x4_ps(0xF, v, 1));
    const __m128 hi = _mm_add_ps(_mm512_maskz_extractf32x4_ps(0xF, v, 2), _mm512_maskz_extractf32x4_ps(0xF, v, 3));
    return _mm_add_ps(lo, hi);
}

RANDMASK_TARGET("avx512f")
inline float hsum512(__m512 v) {
    __m128 s = add_lanes512(v);
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

// Avx512 / Avx2: one ISA's vector of W floats (ld, a multiple of 16, is walked 2W floats a step, then W at a time).
struct Avx512 {
    using V = __m512;
    static constexpr int64_t W = 16;
    RANDMASK_TARGET("avx512f") static V zero() { return _mm512_setzero_ps(); }
    RANDMASK_TARGET("avx512f") static V load(const float* p) { return _mm512_load_ps(p); }
    RANDMASK_TARGET("avx512f") static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
    RANDMASK_TARGET("avx512f") static V add(V a, V b) { return _mm512_add_ps(a, b); }
    RANDMASK_TARGET("avx512f") static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
    RANDMASK_TARGET("avx512f") static V set1(float a) { return _mm512_set1_ps(a); }
    RANDMASK_TARGET("avx512f") static void store(float* p, V a) { _mm512_store_ps(p, a); }
    RANDMASK_TARGET("avx512f") static float sum(V a, V b) { return hsum512(_mm512_add_ps(a, b)); }
    // out[j] = sum of the floats of v_j, j < 4: the four 512-bit vectors reduced together
    RANDMASK_TARGET("avx512f") static void sum4(V v0, V v1, V v2, V v3, float* out) {
        // maskz forms: the plain unpacks trip the same GCC 12 false positive as the extracts (see add_lanes512)
        const V t0 = _mm512_add_ps(_mm512_maskz_unpacklo_ps(0xFFFF, v0, v1), _mm512_maskz_unpackhi_ps(0xFFFF, v0, v1));
        const V t1 = _mm512_add_ps(_mm512_maskz_unpacklo_ps(0xFFFF, v2, v3), _mm512_maskz_unpackhi_ps(0xFFFF, v2, v3));
        const V r = _mm512_add_ps(_mm512_shuffle_ps(t0, t1, _MM_SHUFFLE(1, 0, 1, 0)),
                                  _mm512_shuffle_ps(t0, t1, _MM_SHUFFLE(3, 2, 3, 2)));  // (a, b, c, d) per lane
        _mm_storeu_ps(out, add_lanes512(r));
    }
};

RANDMASK_TARGET("avx2,fma")
inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

struct Avx2 {
    using V = __m256;
    static constexpr int64_t W = 8;
    RANDMASK_TARGET("avx2,fma") static V zero() { return _mm256_setzero_ps(); }
    RANDMASK_TARGET("avx2,fma") static V load(const float* p) { return _mm256_load_ps(p); }
    RANDMASK_TARGET("avx2,fma") static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
    RANDMASK_TARGET("avx2,fma") static V add(V a, V b) { return _mm256_add_ps(a, b); }
    RANDMASK_TARGET("avx2,fma") static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
    RANDMASK_TARGET("avx2,fma") static V set1(float a) { return _mm256_set1_ps(a); }
    RANDMASK_TARGET("avx2,fma") static void store(float* p, V a) { _mm256_store_ps(p, a); }
    RANDMASK_TARGET("avx2,fma") static float sum(V a, V b) { return hsum256(_mm256_add_ps(a, b)); }
    RANDMASK_TARGET("avx2,fma") static void sum4(V v0, V v1, V v2, V v3, float* out) {
        const V t0 = _mm256_add_ps(_mm256_unpacklo_ps(v0, v1), _mm256_unpackhi_ps(v0, v1));
        const V t1 = _mm256_add_ps(_mm256_unpacklo_ps(v2, v3), _mm256_unpackhi_ps(v2, v3));
        const V r = _mm256_add_ps(_mm256_shuffle_ps(t0, t1, _MM_SHUFFLE(1, 0, 1, 0)),
                                  _mm256_shuffle_ps(t0, t1, _MM_SHUFFLE(3, 2, 3, 2)));  // (a, b, c, d) per lane
        _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(r), _mm256_extractf128_ps(r, 1)));
    }
};

// The dot products with an ISA's vectors: two FMA chains per product (s* over the first W floats of each 2W step,
// u* over the second), added at the end.
template <class Simd>
struct DotSimd {
    using V = typename Simd::V;
    static constexpr int64_t W = Simd::W;
    static void four(const float* __restrict a, const float* __restrict b0, const float* __restrict b1,
                     const float* __restrict b2, const float* __restrict b3, int64_t ld, float* s) {
        V s0 = Simd::zero(), s1 = s0, s2 = s0, s3 = s0, u0 = s0, u1 = s0, u2 = s0, u3 = s0;
        int64_t t = 0;
        for (; t + 2 * W <= ld; t += 2 * W) {
            const V a0 = Simd::load(a + t), a1 = Simd::load(a + t + W);
            s0 = Simd::fma(a0, Simd::load(b0 + t), s0);
            s1 = Simd::fma(a0, Simd::load(b1 + t), s1);
            s2 = Simd::fma(a0, Simd::load(b2 + t), s2);
            s3 = Simd::fma(a0, Simd::load(b3 + t), s3);
            u0 = Simd::fma(a1, Simd::load(b0 + t + W), u0);
            u1 = Simd::fma(a1, Simd::load(b1 + t + W), u1);
            u2 = Simd::fma(a1, Simd::load(b2 + t + W), u2);
            u3 = Simd::fma(a1, Simd::load(b3 + t + W), u3);
        }
        for (; t < ld; t += W) {
            const V a0 = Simd::load(a + t);
            s0 = Simd::fma(a0, Simd::load(b0 + t), s0);
            s1 = Simd::fma(a0, Simd::load(b1 + t), s1);
            s2 = Simd::fma(a0, Simd::load(b2 + t), s2);
            s3 = Simd::fma(a0, Simd::load(b3 + t), s3);
        }
        Simd::sum4(Simd::add(s0, u0), Simd::add(s1, u1), Simd::add(s2, u2), Simd::add(s3, u3), s);
    }
    static float one(const float* __restrict a, const float* __restrict b, int64_t ld) {
        V s0 = Simd::zero(), s1 = s0;
        int64_t t = 0;
        for (; t + 2 * W <= ld; t += 2 * W) {
            s0 = Simd::fma(Simd::load(a + t), Simd::load(b + t), s0);
            s1 = Simd::fma(Simd::load(a + t + W), Simd::load(b + t + W), s1);
        }
        for (; t < ld; t += W) s0 = Simd::fma(Simd::load(a + t), Simd::load(b + t), s0);
        return Simd::sum(s0, s1);
    }
};

RANDMASK_TARGET("avx512f")
__attribute__((flatten)) void dot_slots_avx512(const float* gyt, const float* xt, int64_t ld, const uint32_t* slot,
                                               const uint32_t* row, const uint32_t* col, int64_t i0, int64_t i1,
                                               float* g) {
    walk_slots<DotSimd<Avx512>>(gyt, xt, ld, slot, row, col, i0, i1, g);
}

RANDMASK_TARGET("avx2,fma")
__attribute__((flatten)) void dot_slots_avx2(const float* gyt, const float* xt, int64_t ld, const uint32_t* slot,
                                             const uint32_t* row, const uint32_t* col, int64_t i0, int64_t i1,
                                             float* g) {
    walk_slots<DotSimd<Avx2>>(gyt, xt, ld, slot, row, col, i0, i1, g);
}
#endif

// rows[i], cols[i] = position of slot k0 + i, for i < count: sigma from randmask_mask.h, restated as a loop the
// compiler vectorises (compiled once per ISA like the dot loops). Divisions by the radix B and by the width go
// through double reciprocals with one exact integer correction step (the quotient estimate is off by at most one),
// and every other step is the header's uint32 arithmetic; the rare slots whose P(k) lands outside [0, N) are walked
// afterwards by the header itself. test_native_cpu and tests/test_native_kernels.py hold the result to the header
// and to the torch twin bit for bit.
using PosFn = void (*)(const randmask_mask_t&, uint32_t, int64_t, uint32_t*, uint32_t*);

#define RANDMASK_ROUND_OFFSET(v, rk, mod) \
    ((uint32_t)(((uint64_t)randmask_fmix32(((v) * RANDMASK_GOLDEN) ^ (rk)) * (mod)) >> 32))

// P(x) (one pass of the 6 rounds) on uint32 x < 2^31, branch-free so that loops over it vectorise.
__attribute__((always_inline)) inline uint32_t permute_once(uint32_t x, uint32_t A, uint32_t B, double inv_b,
                                                            const uint32_t* rk) {
    int32_t a = (int32_t)((double)(int32_t)x * inv_b);
    int32_t b = (int32_t)(x - (uint32_t)a * B);  // in (-B, 2B): one correction makes (a, b) = divmod(x, B)
    a = b < 0 ? a - 1 : (b >= (int32_t)B ? a + 1 : a);
    b = b < 0 ? b + (int32_t)B : (b >= (int32_t)B ? b - (int32_t)B : b);
    uint32_t ua = (uint32_t)a, ub = (uint32_t)b, t;
    t = ub + RANDMASK_ROUND_OFFSET(ua, rk[0], B); ub = t >= B ? t - B : t;
    t = ua + RANDMASK_ROUND_OFFSET(ub, rk[1], A); ua = t >= A ? t - A : t;
    t = ub + RANDMASK_ROUND_OFFSET(ua, rk[2], B); ub = t >= B ? t - B : t;
    t = ua + RANDMASK_ROUND_OFFSET(ub, rk[3], A); ua = t >= A ? t - A : t;
    t = ub + RANDMASK_ROUND_OFFSET(ua, rk[4], B); ub = t >= B ? t - B : t;
    t = ua + RANDMASK_ROUND_OFFSET(ub, rk[5], A); ua = t >= A ? t - A : t;
    return ua * B + ub;  // in [0, A*B)
}

__attribute__((always_inline)) inline void positions_body(const randmask_mask_t& m, uint32_t k0, int64_t count,
                                                          uint32_t* __restrict rows, uint32_t* __restrict cols) {
    const uint32_t A = m.a, B = m.b, C = m.cols, R = m.rows;
    const uint32_t rk[RANDMASK_ROUNDS] = {m.rk[0], m.rk[1], m.rk[2], m.rk[3], m.rk[4], m.rk[5]};
    const double inv_b = 1.0 / B, inv_c = 1.0 / C;
    if (R > 1 && C > 1) {  // then C, R <= 2^30: every signed intermediate below fits int32
        for (int64_t i = 0; i < count; ++i) {
            const uint32_t p = permute_once(k0 + (uint32_t)i, A, B, inv_b, rk);
            // p < 2^32 and C >= 2, so p / C < 2^31; the double estimate is off by at most one
            int32_t r = (int32_t)((double)p * inv_c);
            int32_t c = (int32_t)(p - (uint32_t)r * C);
            r = c < 0 ? r - 1 : (c >= (int32_t)C ? r + 1 : r);
            c = c < 0 ? c + (int32_t)C : (c >= (int32_t)C ? c - (int32_t)C : c);
            rows[i] = (uint32_t)r;  // >= R: p is outside the matrix, walked below
            cols[i] = (uint32_t)c;
        }
    } else if (R == 1) {  // 1xN: (0, p), or row R (to be walked) when p >= N
        for (int64_t i = 0; i < count; ++i) {
            const uint32_t p = permute_once(k0 + (uint32_t)i, A, B, inv_b, rk);
            rows[i] = p >= C ? R : 0u;
            cols[i] = p;
        }
    } else {  // Nx1: (p, 0)
        for (int64_t i = 0; i < count; ++i) {
            rows[i] = permute_once(k0 + (uint32_t)i, A, B, inv_b, rk);
            cols[i] = 0u;
        }
    }
    for (int64_t i = 0; i < count; ++i) {  // cycle-walking: probability < 1/sqrt(N) per slot
        if (rows[i] >= R) randmask_position(&m, k0 + (uint32_t)i, &rows[i], &cols[i]);
    }
}

void positions_portable(const randmask_mask_t& m, uint32_t k0, int64_t count, uint32_t* rows, uint32_t* cols) {
    positions_body(m, k0, count, rows, cols);
}

#if RANDMASK_X86
RANDMASK_TARGET("avx512f,avx512dq,avx512vl,avx512bw")
void positions_avx512(const randmask_mask_t& m, uint32_t k0, int64_t count, uint32_t* rows, uint32_t* cols) {
    positions_body(m, k0, count, rows, cols);
}

RANDMASK_TARGET("avx2,fma")
void positions_avx2(const randmask_mask_t& m, uint32_t k0, int64_t count, uint32_t* rows, uint32_t* cols) {
    positions_body(m, k0, count, rows, cols);
}
#endif

// The sums of the sparse add (see sparse_add_tile): for the column groups g in [g0, g1),
//   acc[(g - g0) * kAddTile + t] = sum over i in [beg[g], beg[g + 1]), in order, of d[i] * S[off[i] * kAddTile + t]
// for the kAddTile tokens t of a tile, started from +0. The product is rounded to fp32 before the add, as the
// contract (kernels/sparse_add.py) and the torch twin have it: no fused multiply-add, so every ISA gives bitwise the
// same sums. Each group's kAddTile lanes are independent add chains (4 AVX-512 / 8 AVX2 vectors), which hides the
// add latency of a group's serial sum.
constexpr int64_t kAddTile = 64;   // tokens per tile of the sparse add: a multiple of 16
constexpr int64_t kAddBlock = 64;  // destination columns per block of sums (acc, acc_t: 16 KiB each)
using AddFn = void (*)(const float*, const uint32_t*, const float*, const uint32_t*, int64_t, int64_t, float*);

void add_groups_portable(const float* __restrict S, const uint32_t* __restrict off, const float* __restrict d,
                         const uint32_t* __restrict beg, int64_t g0, int64_t g1, float* __restrict acc) {
    for (int64_t g = g0; g < g1; ++g) {
        float* a = acc + (g - g0) * kAddTile;
        for (int64_t t = 0; t < kAddTile; ++t) a[t] = 0.f;
        for (uint32_t i = beg[g]; i < beg[g + 1]; ++i) {
            const float dv = d[i];
            const float* s = S + (int64_t)off[i] * kAddTile;
#if defined(__FP_FAST_FMAF) && (defined(__GNUC__) || defined(__clang__))
            // a baseline with FMA (not x86-64): products through memory, so the compiler cannot fuse them
            alignas(64) float p[kAddTile];
            for (int64_t t = 0; t < kAddTile; ++t) p[t] = dv * s[t];
            __asm__ volatile("" : : "r"(p) : "memory");
            for (int64_t t = 0; t < kAddTile; ++t) a[t] += p[t];
#else
#pragma omp simd
            for (int64_t t = 0; t < kAddTile; ++t) a[t] += dv * s[t];  // no FMA in baseline x86-64: never fused
#endif
        }
    }
}

#if RANDMASK_X86
template <class Simd>
struct AddSimd {
    using V = typename Simd::V;
    static constexpr int64_t W = Simd::W, NV = kAddTile / Simd::W;
    static void groups(const float* __restrict S, const uint32_t* __restrict off, const float* __restrict d,
                       const uint32_t* __restrict beg, int64_t g0, int64_t g1, float* __restrict acc) {
        for (int64_t g = g0; g < g1; ++g) {
            V a[NV];
            for (int64_t v = 0; v < NV; ++v) a[v] = Simd::zero();
            for (uint32_t i = beg[g]; i < beg[g + 1]; ++i) {
                const V dv = Simd::set1(d[i]);
                const float* s = S + (int64_t)off[i] * kAddTile;
                for (int64_t v = 0; v < NV; ++v) {
                    V p = Simd::mul(dv, Simd::load(s + v * W));
                    __asm__("" : "+v"(p));  // opaque to the compiler: GCC would fuse mul + add into an FMA
                    a[v] = Simd::add(a[v], p);
                }
            }
            for (int64_t v = 0; v < NV; ++v) Simd::store(acc + (g - g0) * kAddTile + v * W, a[v]);
        }
    }
};

RANDMASK_TARGET("avx512f")
__attribute__((flatten)) void add_groups_avx512(const float* S, const uint32_t* off, const float* d,
                                                const uint32_t* beg, int64_t g0, int64_t g1, float* acc) {
    AddSimd<Avx512>::groups(S, off, d, beg, g0, g1, acc);
}

RANDMASK_TARGET("avx2,fma")
__attribute__((flatten)) void add_groups_avx2(const float* S, const uint32_t* off, const float* d,
                                              const uint32_t* beg, int64_t g0, int64_t g1, float* acc) {
    AddSimd<Avx2>::groups(S, off, d, beg, g0, g1, acc);
}
#endif

// The write-back of one block of the sparse add into an out with contiguous rows, in vectors:
//   out[t * ost + col[g]] = round(out + acc_t[t * kAddBlock + g])   for t < tc, g < len (col increasing)
// Per vector of W consecutive columns of out that holds touched ones: the block's sums for them, loaded contiguous
// and spread to their lanes (AVX-512 expand; AVX2 a permutation from a table), added to a masked load of out and
// stored masked, so untouched elements are neither read nor written. The same IEEE add and the same roundings as
// the scalar loop (randmask_dtype.h's, NaN included): the bits do not depend on the ISA. Returns false (nothing
// written) for what it does not handle (AVX2: fp16/bf16 outs) and when under a quarter of the lanes would be
// touched: the scalar loop is cheaper then. acc_t rows are read up to W - 1 floats past len (the scratch has room).
using BackFn = bool (*)(int, void*, int64_t, int64_t, const uint32_t*, int64_t, const float*);

#if RANDMASK_X86
// The vectors of a block: vector v covers columns [at, at + W) of out, lanes `mask`, its sums from acc_t[start].
struct BackVectors {
    int64_t count = 0;
    int64_t at[kAddBlock];
    uint32_t mask[kAddBlock], start[kAddBlock];
    BackVectors(const uint32_t* col, int64_t len, uint32_t w) {
        for (int64_t g = 0; g < len; ++g) {
            const uint32_t lane = (col[g] - col[0]) % w;
            const int64_t base = (int64_t)col[g] - lane;
            if (!count || at[count - 1] != base) {
                at[count] = base, mask[count] = 0, start[count] = (uint32_t)g;
                ++count;
            }
            mask[count - 1] |= 1u << lane;
        }
    }
};

#define RANDMASK_AVX512_BACK "avx512f,avx512bw,avx512vl,f16c"

// out[lanes m of o] = round_D(float(out) + sums) for 16 elements of an fp16/bf16 out: randmask_dtype.h's roundings,
// NaN to its canonical 0x7E00 / 0x7FC0. The maskz forms (on every lane) dodge GCC 12's -Wmaybe-uninitialized false
// positive inside its own headers, as in add_lanes512.
template <int D>
RANDMASK_TARGET(RANDMASK_AVX512_BACK)
inline void add16_avx512(uint16_t* o, __mmask16 m, __m512 sums) {
    const __mmask16 all = 0xFFFF;
    const __m256i h = _mm256_maskz_loadu_epi16(m, o);
    const __m512 x = D == RANDMASK_F16 ? _mm512_maskz_cvtph_ps(all, h)
                                       : _mm512_castsi512_ps(_mm512_maskz_slli_epi32(
                                             all, _mm512_maskz_cvtepu16_epi32(all, h), 16));
    const __m512 r = _mm512_add_ps(x, sums);
    const __mmask16 nan = _mm512_cmp_ps_mask(r, r, _CMP_UNORD_Q);
    __m256i narrow;
    if constexpr (D == RANDMASK_F16) {
        narrow = _mm512_maskz_cvtps_ph(all, r, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        narrow = _mm256_mask_mov_epi16(narrow, nan, _mm256_set1_epi16(0x7E00));
    } else {  // (u + 0x7FFF + ((u >> 16) & 1)) >> 16, as randmask_f32_to_bf16
        const __m512i u = _mm512_castps_si512(r);
        const __m512i odd = _mm512_and_si512(_mm512_maskz_srli_epi32(all, u, 16), _mm512_set1_epi32(1));
        const __m512i sum = _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), odd);
        const __m512i rounded = _mm512_mask_mov_epi32(_mm512_maskz_srli_epi32(all, sum, 16), nan,
                                                      _mm512_set1_epi32(0x7FC0));
        narrow = _mm512_maskz_cvtepi32_epi16(all, rounded);
    }
    _mm256_mask_storeu_epi16(o, m, narrow);
}

template <int D>
RANDMASK_TARGET(RANDMASK_AVX512_BACK)
void add_back_avx512_rows(void* out, int64_t ost, int64_t tc, const BackVectors& v, const float* acc_t) {
    for (int64_t t = 0; t < tc; ++t) {
        const float* a = acc_t + t * kAddBlock;
        for (int64_t i = 0; i < v.count; ++i) {
            const __mmask16 m = (__mmask16)v.mask[i];
            const __m512 sums = _mm512_maskz_expand_ps(m, _mm512_loadu_ps(a + v.start[i]));
            if constexpr (D == RANDMASK_F32) {
                float* o = static_cast<float*>(out) + t * ost + v.at[i];
                _mm512_mask_storeu_ps(o, m, _mm512_maskz_add_ps(m, _mm512_maskz_loadu_ps(m, o), sums));
            } else {
                add16_avx512<D>(static_cast<uint16_t*>(out) + t * ost + v.at[i], m, sums);
            }
        }
    }
}

RANDMASK_TARGET(RANDMASK_AVX512_BACK)
bool add_back_avx512(int dtype, void* out, int64_t ost, int64_t tc, const uint32_t* col, int64_t len,
                     const float* acc_t) {
    const BackVectors v(col, len, 16);
    if (4 * len < 16 * v.count) return false;
    if (dtype == RANDMASK_F32) add_back_avx512_rows<RANDMASK_F32>(out, ost, tc, v, acc_t);
    else if (dtype == RANDMASK_F16) add_back_avx512_rows<RANDMASK_F16>(out, ost, tc, v, acc_t);
    else add_back_avx512_rows<RANDMASK_BF16>(out, ost, tc, v, acc_t);
    return true;
}

// kExpand8.idx[m]: the permutation that puts the first popcount(m) floats of a vector in m's lanes, in order.
struct Expand8 {
    int32_t idx[256][8];
    constexpr Expand8() : idx() {
        for (int m = 0; m < 256; ++m)
            for (int lane = 0, j = 0; lane < 8; ++lane) idx[m][lane] = (m >> lane) & 1 ? j++ : 0;
    }
};
constexpr Expand8 kExpand8{};

RANDMASK_TARGET("avx2,fma")
bool add_back_avx2(int dtype, void* out_, int64_t ost, int64_t tc, const uint32_t* col, int64_t len,
                   const float* acc_t) {
    if (dtype != RANDMASK_F32) return false;
    float* out = static_cast<float*>(out_);
    const BackVectors v(col, len, 8);
    if (4 * len < 8 * v.count) return false;
    const __m256i bits = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    for (int64_t t = 0; t < tc; ++t) {
        float* o = out + t * ost;
        const float* a = acc_t + t * kAddBlock;
        for (int64_t i = 0; i < v.count; ++i) {
            const __m256i lanes = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32((int)v.mask[i]), bits), bits);
            const __m256i idx = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kExpand8.idx[v.mask[i]]));
            const __m256 sums = _mm256_and_ps(_mm256_permutevar8x32_ps(_mm256_loadu_ps(a + v.start[i]), idx),
                                              _mm256_castsi256_ps(lanes));  // untouched lanes: +0, not garbage
            const __m256 x = _mm256_maskload_ps(o + v.at[i], lanes);
            _mm256_maskstore_ps(o + v.at[i], lanes, _mm256_add_ps(x, sums));
        }
    }
    return true;
}
#endif

struct Isa {
    const char* name;
    DotFn dot;
    PosFn pos;
    AddFn add;
    BackFn back;          // null: the scalar write-back
    bool fast_transpose;  // AVX2 + F16C 8x8 transposes
};

const Isa kPortable = {"portable", dot_slots_portable, positions_portable, add_groups_portable, nullptr, false};
#if RANDMASK_X86
const Isa kAvx2 = {"avx2", dot_slots_avx2, positions_avx2, add_groups_avx2, add_back_avx2, true};
const Isa kAvx512 = {"avx512f", dot_slots_avx512, positions_avx512, add_groups_avx512, add_back_avx512, true};
#endif

// The loops for this CPU (or the ones randmask_cpu_select_isa chose, for tests and benchmarks).
Isa best_isa() {
#if RANDMASK_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("f16c") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw"))
        return kAvx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) return kAvx2;
#endif
    return kPortable;
}

// Positions of slots [k0, k0 + count) in blocks of kPosBlock (cache-sized) through the selected ISA's loop.
constexpr int64_t kPosBlock = 1024;

Isa g_isa = best_isa();

// f(std::integral_constant<int, D>{}) for the runtime dtype code d (already validated).
template <typename F>
void with_dtype(int d, F&& f) {
    if (d == RANDMASK_F32) f(std::integral_constant<int, RANDMASK_F32>{});
    else if (d == RANDMASK_F16) f(std::integral_constant<int, RANDMASK_F16>{});
    else f(std::integral_constant<int, RANDMASK_BF16>{});
}

// The masked gradient without the transposes, for a handful of slots: each slot reads its column of x and of
// grad_y straight from the (T, features) inputs (strided loads, 4 partial sums), threads over slots. It costs
// ~2 * n * T scattered loads against the ~(in + out) * T element moves of the transposes, so it wins while n is
// a small fraction of in + out (kDirectRatio; the crossover is in BENCHMARKS.md, designs tried and dropped).
template <int XD, int GD>
void masked_grad_direct(const randmask_mask_t& m, const void* x, int64_t x_st, int64_t x_sc, const void* gy,
                        int64_t gy_st, int64_t gy_sc, int64_t tokens, int64_t n, float* g, int nt) {
#pragma omp parallel for num_threads(nt) schedule(dynamic, 8) if (n * tokens >= kSerialWork)
    for (int64_t k = 0; k < n; ++k) {
        uint32_t r, c;
        randmask_position(&m, (uint32_t)k, &r, &c);
        const int64_t xo = (int64_t)c * x_sc, go = (int64_t)r * gy_sc;
        float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
        int64_t t = 0;
        for (; t + 4 <= tokens; t += 4) {
            s0 += load_f32<GD>(gy, t * gy_st + go) * load_f32<XD>(x, t * x_st + xo);
            s1 += load_f32<GD>(gy, (t + 1) * gy_st + go) * load_f32<XD>(x, (t + 1) * x_st + xo);
            s2 += load_f32<GD>(gy, (t + 2) * gy_st + go) * load_f32<XD>(x, (t + 2) * x_st + xo);
            s3 += load_f32<GD>(gy, (t + 3) * gy_st + go) * load_f32<XD>(x, (t + 3) * x_st + xo);
        }
        for (; t < tokens; ++t) s0 += load_f32<GD>(gy, t * gy_st + go) * load_f32<XD>(x, t * x_st + xo);
        g[k] = (s0 + s1) + (s2 + s3);
    }
}

// Sparse update: weight[r_k, c_k] = round_WD(float(base[k]) + delta[k]) for k < n, nothing else written (sigma is a
// bijection, so no two slots share an entry). Threads take blocks of kPosBlock = 1024 slots dynamically (one thread
// below 4 blocks): positions of the block into stack arrays, then the rounded writes.
template <int WD, int BD>
void update_impl(const randmask_mask_t& m, PosFn pos, void* weight, int64_t sr, int64_t sc, const void* base,
                 const float* delta, int64_t n, int nt) {
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1) if (n > 4 * kPosBlock)
    for (int64_t k0 = 0; k0 < n; k0 += kPosBlock) {
        uint32_t rows[kPosBlock], cols[kPosBlock];
        const int64_t count = std::min(kPosBlock, n - k0);
        pos(m, (uint32_t)k0, count, rows, cols);
        for (int64_t i = 0; i < count; ++i)
            store_rounded<WD>(weight, rows[i] * sr + cols[i] * sc, load_f32<BD>(base, k0 + i) + delta[k0 + i]);
    }
}


// Gather: base[k] = weight[r_k, c_k] for k < n (a bit copy of E = uint32 or uint16). Same layout as update_impl.
template <typename E>
void gather_impl(const randmask_mask_t& m, PosFn pos, const E* weight, int64_t sr, int64_t sc, E* base, int64_t n,
                 int nt) {
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1) if (n > 4 * kPosBlock)
    for (int64_t k0 = 0; k0 < n; k0 += kPosBlock) {
        uint32_t rows[kPosBlock], cols[kPosBlock];
        const int64_t count = std::min(kPosBlock, n - k0);
        pos(m, (uint32_t)k0, count, rows, cols);
        for (int64_t i = 0; i < count; ++i) base[k0 + i] = weight[rows[i] * sr + cols[i] * sc];
    }
}

// Sparse add, out[t, dst_k] += delta[k] * src[t, src_k] for k < n (forward: dst = r, src = c; transposed: dst = c,
// src = r). Each touched element is written once, round(out + acc) with acc the fp32 sum, in slot order, of the
// fp32-rounded products (never fused: see add_groups_*), so every ISA and thread count gives the same bits as the
// torch twin; elements no slot reaches are never written. Cost O(T n); per call:
//   1. positions (threads over blocks of kPosBlock slots); then on one thread, O(n + in + out): a stable counting
//      sort of the slots by destination column (slot order kept within a column, so every element's sum keeps the
//      contract's order), delta copied into that order, and the rows of S: the source columns read, in increasing
//      order, or every column when the 8x8 transposes apply and a quarter or more are read;
//   2. threads take tiles of kAddTile = 64 tokens (dynamic; a tile is computed the same way on any thread): the
//      tile's rows of S = fp32 src[tile, column] (64 tokens per row), then per block of kAddBlock = 64 destination
//      columns: each column's 64 sums in registers (AddFn), stored as acc[column][token], transposed to
//      acc_t[token][column] (16 KiB each, in L1), and added into out row by row: masked vectors (BackFn) when the
//      touched columns fill a quarter or more of the vectors they meet, else a contiguous run per row when the
//      block's columns are consecutive (as they are from ~1% density), else one scalar per element.
// Summing whole columns in registers leaves no scattered read-modify-write of an accumulator, and only the touched
// elements of out are read and written. Designs measured and dropped: a per-token loop without S (slower at every
// density down to 1e-4 on SmolLM2's shapes), 16- or 32-token tiles (fewer independent add chains per column),
// blocks of 256+ columns (no faster, and a long block rarely has all its columns touched). Scratch: ~20 bytes per
// slot, 8-12 per column, (rows of S + 128) x 64 floats per thread.
constexpr int64_t kAddSerialWork = 1 << 14;  // below this many token x slot products one thread does the call

// S[u * kAddTile + t] = float(src[t0 + t, col(u)]) for u < nu, t < tc, zero for tc <= t < kAddTile; col(u) = ucol[u],
// or u itself when ucol is null. Every column with contiguous features: the 8x8 register transposes, in spans of
// kAddSpan columns (32 KiB of S, so each line of S is completed in L1). Otherwise scalar, row by row over blocks of
// kAddSpan / 2 columns (a block's lines of S stay in L1 while the tile's rows are read).
constexpr int64_t kAddSpan = 128;

template <int D>
void add_gather(const void* src, int64_t st, int64_t sc, int64_t t0, int64_t tc, const uint32_t* ucol, int64_t nu,
                float* S, bool fast) {
#if RANDMASK_X86
    if (!ucol && fast && sc == 1) {
        for (int64_t fb = 0; fb < nu; fb += kAddSpan)
            transpose_tile_avx2<D>(src, st, t0, tc, fb, std::min(fb + kAddSpan, nu), S, kAddTile);
    } else
#else
    (void)fast;
#endif
    {
        for (int64_t u0 = 0; u0 < nu; u0 += kAddSpan / 2) {
            const int64_t u1 = std::min(u0 + kAddSpan / 2, nu);
            for (int64_t t = 0; t < tc; ++t) {
                const int64_t row = (t0 + t) * st;
                for (int64_t u = u0; u < u1; ++u)
                    S[u * kAddTile + t] = load_f32<D>(src, row + (int64_t)(ucol ? ucol[u] : u) * sc);
            }
        }
    }
    if (tc < kAddTile)
        for (int64_t u = 0; u < nu; ++u) std::memset(S + u * kAddTile + tc, 0, sizeof(float) * (size_t)(kAddTile - tc));
}

// out[t0 + t, dst[g]] = round(out + acc_t[t * kAddBlock + g - g0]) for t < tc, g in [g0, g1), row by row, in scalars
// (what BackFn declines). When the block's columns are consecutive and out's are contiguous, a row's update is one
// contiguous run.
template <int D>
void add_back(void* out, int64_t ost, int64_t osc, int64_t t0, int64_t tc, const uint32_t* dst, int64_t g0,
              int64_t g1, const float* acc_t) {
    const int64_t len = g1 - g0;
    const uint32_t* col = dst + g0;
    if (osc == 1 && (int64_t)(col[len - 1] - col[0]) == len - 1) {
        for (int64_t t = 0; t < tc; ++t) {
            const float* __restrict a = acc_t + t * kAddBlock;
            const int64_t row = (t0 + t) * ost + col[0];
            if constexpr (D == RANDMASK_F32) {
                float* __restrict o = static_cast<float*>(out) + row;
                for (int64_t g = 0; g < len; ++g) o[g] += a[g];
            } else {
                for (int64_t g = 0; g < len; ++g) store_rounded<D>(out, row + g, load_f32<D>(out, row + g) + a[g]);
            }
        }
        return;
    }
    for (int64_t t = 0; t < tc; ++t) {
        const float* a = acc_t + t * kAddBlock;
        const int64_t row = (t0 + t) * ost;
        for (int64_t g = 0; g < len; ++g) {
            const int64_t i = row + (int64_t)col[g] * osc;
            store_rounded<D>(out, i, load_f32<D>(out, i) + a[g]);
        }
    }
}

// The prepared slots of one call (step 1 above), shared by the tiles.
struct AddPlan {
    const uint32_t* off;    // per sorted slot: its source column's row of S
    const float* delta;     // per sorted slot: delta
    const uint32_t* beg;    // groups + 1 offsets into the sorted slots
    const uint32_t* dst;    // per group: its destination column
    int64_t groups;
    const uint32_t* ucol;   // the source columns read, increasing; null: every column
    int64_t nu;             // rows of S
};

void sparse_add_tile(const AddPlan& plan, AddFn add, BackFn back, bool fast, const randmask_matrix_t& out,
                     const randmask_matrix_t& src, int64_t t0, int64_t tc, float* S, float* acc, float* acc_t) {
    with_dtype(src.dtype, [&](auto sd) {
        add_gather<decltype(sd)::value>(src.data, src.stride_r, src.stride_c, t0, tc, plan.ucol, plan.nu, S, fast);
    });
    for (int64_t g0 = 0; g0 < plan.groups; g0 += kAddBlock) {
        const int64_t g1 = std::min(g0 + kAddBlock, plan.groups);
        add(S, plan.off, plan.delta, plan.beg, g0, g1, acc);
        // acc[g][t] -> acc_t[t][g]: the write-back walks rows of out
#if RANDMASK_X86
        if (fast) transpose_tile_avx2<RANDMASK_F32>(acc, kAddTile, 0, g1 - g0, 0, tc, acc_t, kAddBlock);
        else transpose_tile_portable<RANDMASK_F32>(acc, kAddTile, 1, 0, g1 - g0, 0, tc, acc_t, kAddBlock);
#else
        transpose_tile_portable<RANDMASK_F32>(acc, kAddTile, 1, 0, g1 - g0, 0, tc, acc_t, kAddBlock);
#endif
        if (back && out.stride_c == 1 &&
            back(out.dtype, static_cast<char*>(out.data) + t0 * out.stride_r * (int64_t)dtype_size(out.dtype),
                 out.stride_r, tc, plan.dst + g0, g1 - g0, acc_t))
            continue;
        with_dtype(out.dtype, [&](auto od) {
            add_back<decltype(od)::value>(out.data, out.stride_r, out.stride_c, t0, tc, plan.dst, g0, g1, acc_t);
        });
    }
}

}  // namespace

extern "C" {

int randmask_cpu_abi_version(void) { return RANDMASK_NATIVE_ABI; }

int randmask_cpu_max_threads(void) { return threads_for(0); }

const char* randmask_cpu_isa(void) { return g_isa.name; }

int randmask_cpu_select_isa(const char* name) {
    if (!name) return RANDMASK_EINVAL;
    const Isa best = best_isa();
    if (!std::strcmp(name, "best")) g_isa = best;
    else if (!std::strcmp(name, "portable")) g_isa = kPortable;
#if RANDMASK_X86
    else if (!std::strcmp(name, "avx2") && best.dot != dot_slots_portable) g_isa = kAvx2;
    else if (!std::strcmp(name, "avx512f") && best.dot == dot_slots_avx512) g_isa = kAvx512;
#endif
    else return RANDMASK_EINVAL;
    return RANDMASK_OK;
}

int randmask_cpu_positions(const randmask_mask_args_t* mask_args, int64_t* rows, int64_t* cols, int nthreads) {
    if (!mask_args) return RANDMASK_EINVAL;
    const int64_t n = mask_args->n;
    if (n && (!rows || !cols)) return RANDMASK_EINVAL;
    if (!valid_mask(mask_args)) return RANDMASK_EINVAL;
    if (n == 0) return RANDMASK_OK;
    const randmask_mask_t m = make_mask(mask_args);
    const int nt = threads_for(nthreads);
    const PosFn pos = g_isa.pos;
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1) if (n > 4 * kPosBlock)
    for (int64_t k0 = 0; k0 < n; k0 += kPosBlock) {
        uint32_t r[kPosBlock], c[kPosBlock];
        const int64_t count = std::min(kPosBlock, n - k0);
        pos(m, (uint32_t)k0, count, r, c);
        for (int64_t i = 0; i < count; ++i) {
            rows[k0 + i] = r[i];
            cols[k0 + i] = c[i];
        }
    }
    return RANDMASK_OK;
}

int randmask_cpu_masked_grad(const randmask_matrix_t* x_view, const randmask_matrix_t* gy_view,
                             const randmask_mask_args_t* mask_args, float* g, int nthreads) {
    if (!x_view || !gy_view || !mask_args) return RANDMASK_EINVAL;
    if (!valid_dtype(x_view->dtype) || !valid_dtype(gy_view->dtype)) return RANDMASK_EDTYPE;
    const int64_t n = mask_args->n, tokens = x_view->rows, in = mask_args->in, out = mask_args->out;
    if (gy_view->rows != tokens || x_view->cols != in || gy_view->cols != out || tokens < 0 || (n && !g))
        return RANDMASK_EINVAL;
    if (!valid_mask(mask_args)) return RANDMASK_EINVAL;
    if (n == 0) return RANDMASK_OK;
    const randmask_mask_t m = make_mask(mask_args);
    std::memset(g, 0, sizeof(float) * (size_t)n);
    if (tokens == 0) return RANDMASK_OK;
    const void* x = x_view->data;
    const void* grad_y = gy_view->data;
    if (!x || !grad_y) return RANDMASK_EINVAL;
    const int x_dtype = x_view->dtype, gy_dtype = gy_view->dtype;
    const int64_t x_st = x_view->stride_r, x_sc = x_view->stride_c, gy_st = gy_view->stride_r,
                  gy_sc = gy_view->stride_c;
    if (kDirectRatio * n < in + out) {
        const int nt = threads_for(nthreads);
        with_dtype(x_dtype, [&](auto xd) {
            with_dtype(gy_dtype, [&](auto gd) {
                masked_grad_direct<decltype(xd)::value, decltype(gd)::value>(m, x, x_st, x_sc, grad_y, gy_st, gy_sc,
                                                                             tokens, n, g, nt);
            });
        });
        return RANDMASK_OK;
    }
    try {
        const DotFn dot = g_isa.dot;
        const PosFn pos = g_isa.pos;
        const bool fast = g_isa.fast_transpose;
        int nt = threads_for(nthreads);
        if ((n + in + out) * tokens < kSerialWork) nt = 1;  // dot products plus transposes
        // Tokens per chunk: both transposed copies within kChunkBytes.
        int64_t chunk = std::clamp<int64_t>(kChunkBytes / (4 * (in + out)), kMinChunk, kMaxChunk);
        chunk = std::min(round_up(chunk, kAlign), round_up(tokens, kAlign));
        // Group slots by row (counting sort) when rows hold a few slots on average; otherwise slot order.
        const bool sort = n >= 2 * out;
        Scratch tbuf(sizeof(float) * (size_t)((in + out) * chunk));
        Scratch pbuf(sizeof(uint32_t) * (size_t)n * (sort ? 5 : 2));
        Scratch hbuf(sort ? sizeof(int64_t) * (size_t)(nt * out) : 0);
        if (!tbuf.p || !pbuf.p || (sort && !hbuf.p)) return RANDMASK_ENOMEM;
        float* xt = tbuf.as<float>();
        float* gyt = xt + in * chunk;
        uint32_t* trow = pbuf.as<uint32_t>();  // slot order
        uint32_t* tcol = trow + n;
        uint32_t* srow = sort ? tcol + n : trow;  // row-sorted order (aliases slot order without sorting)
        uint32_t* scol = sort ? srow + n : tcol;
        uint32_t* sslot = sort ? scol + n : nullptr;
        int64_t* hist = hbuf.as<int64_t>();
        if (sort) std::memset(hist, 0, sizeof(int64_t) * (size_t)(nt * out));

#pragma omp parallel num_threads(nt)
        {
#ifdef _OPENMP
            const int tid = omp_get_thread_num(), nth = omp_get_num_threads();
#else
            const int tid = 0, nth = 1;
#endif
            const int64_t k0 = n * tid / nth, k1 = n * (tid + 1) / nth;
            // 1. positions of this thread's slots (and their per-thread row histogram)
            pos(m, (uint32_t)k0, k1 - k0, trow + k0, tcol + k0);
            if (sort)
                for (int64_t k = k0; k < k1; ++k) ++hist[tid * out + trow[k]];
            if (sort) {
#pragma omp barrier
#pragma omp single
                {  // exclusive offsets, row-major then thread: each thread's slots of a row stay in slot order
                    int64_t run = 0;
                    for (int64_t r = 0; r < out; ++r)
                        for (int j = 0; j < nth; ++j) {
                            const int64_t c = hist[j * out + r];
                            hist[j * out + r] = run;
                            run += c;
                        }
                }
                for (int64_t k = k0; k < k1; ++k) {
                    const int64_t at = hist[tid * out + trow[k]]++;
                    srow[at] = trow[k];
                    scol[at] = tcol[k];
                    sslot[at] = (uint32_t)k;
                }
            }
            // 2.-3. per token chunk: transposes, barrier, dot products in dynamic blocks, implicit barrier
            for (int64_t t0 = 0; t0 < tokens; t0 += chunk) {
                const int64_t tc = std::min(chunk, tokens - t0), ld = round_up(tc, kAlign);
                transpose_any(x_dtype, x, x_st, x_sc, t0, tc, in, xt, ld, fast);
                transpose_any(gy_dtype, grad_y, gy_st, gy_sc, t0, tc, out, gyt, ld, fast);
#pragma omp barrier
                // dynamic: a thread that lost its core (a busy machine) does not hold the others up; the blocks
                // are fixed, so every slot is summed the same way whatever the thread count
#pragma omp for schedule(dynamic, 1)
                for (int64_t i = 0; i < n; i += kDotBlock)
                    dot(gyt, xt, ld, sslot, srow, scol, i, std::min(i + kDotBlock, n), g);
            }
        }
    } catch (const std::bad_alloc&) {
        return RANDMASK_ENOMEM;
    } catch (...) {
        return RANDMASK_EINVAL;
    }
    return RANDMASK_OK;
}

int randmask_cpu_gather_weight(const randmask_matrix_t* weight, const randmask_mask_args_t* mask_args,
                               const randmask_vector_t* base, int nthreads) {
    if (!weight || !mask_args || !base) return RANDMASK_EINVAL;
    if (!valid_dtype(weight->dtype) || base->dtype != weight->dtype) return RANDMASK_EDTYPE;
    const int64_t n = mask_args->n;
    if (weight->rows != mask_args->out || weight->cols != mask_args->in || base->length != n ||
        (n && (!weight->data || !base->data)))
        return RANDMASK_EINVAL;
    if (!valid_mask(mask_args)) return RANDMASK_EINVAL;
    if (n == 0) return RANDMASK_OK;
    const randmask_mask_t m = make_mask(mask_args);
    const int nt = threads_for(nthreads);
    if (dtype_size(weight->dtype) == 4)
        gather_impl(m, g_isa.pos, static_cast<const uint32_t*>(weight->data), weight->stride_r, weight->stride_c,
                    static_cast<uint32_t*>(base->data), n, nt);
    else
        gather_impl(m, g_isa.pos, static_cast<const uint16_t*>(weight->data), weight->stride_r, weight->stride_c,
                    static_cast<uint16_t*>(base->data), n, nt);
    return RANDMASK_OK;
}

int randmask_cpu_sparse_update(const randmask_matrix_t* weight, const randmask_vector_t* base,
                               const randmask_vector_t* delta, const randmask_mask_args_t* mask_args, int nthreads) {
    if (!weight || !base || !delta || !mask_args) return RANDMASK_EINVAL;
    if (!valid_dtype(weight->dtype) || !valid_dtype(base->dtype) || delta->dtype != RANDMASK_F32)
        return RANDMASK_EDTYPE;
    const int64_t n = mask_args->n;
    if (weight->rows != mask_args->out || weight->cols != mask_args->in || base->length != n || delta->length != n ||
        (n && (!weight->data || !base->data || !delta->data)))
        return RANDMASK_EINVAL;
    if (!valid_mask(mask_args)) return RANDMASK_EINVAL;
    if (n == 0) return RANDMASK_OK;
    const randmask_mask_t m = make_mask(mask_args);
    const int nt = threads_for(nthreads);
    const PosFn pos = g_isa.pos;
    const float* d = static_cast<const float*>(delta->data);
    with_dtype(weight->dtype, [&](auto wd) {
        with_dtype(base->dtype, [&](auto bd) {
            update_impl<decltype(wd)::value, decltype(bd)::value>(m, pos, weight->data, weight->stride_r,
                                                                  weight->stride_c, base->data, d, n, nt);
        });
    });
    return RANDMASK_OK;
}

int randmask_cpu_sparse_add(const randmask_matrix_t* out, const randmask_matrix_t* src, const randmask_vector_t* delta,
                            const randmask_mask_args_t* mask_args, int transpose, int nthreads) {
    if (!out || !src || !delta || !mask_args || (transpose != 0 && transpose != 1)) return RANDMASK_EINVAL;
    if (!valid_dtype(out->dtype) || !valid_dtype(src->dtype) || delta->dtype != RANDMASK_F32) return RANDMASK_EDTYPE;
    if (!valid_mask(mask_args)) return RANDMASK_EINVAL;
    const int64_t n = mask_args->n, tokens = out->rows;
    const int64_t dst_w = transpose ? mask_args->in : mask_args->out, src_w = transpose ? mask_args->out : mask_args->in;
    if (src->rows != tokens || tokens < 0 || out->cols != dst_w || src->cols != src_w || delta->length != n ||
        (n && !delta->data))
        return RANDMASK_EINVAL;
    if (n == 0 || tokens == 0) return RANDMASK_OK;
    if (!out->data || !src->data) return RANDMASK_EINVAL;
    const randmask_mask_t m = make_mask(mask_args);
    const float* d = static_cast<const float*>(delta->data);
    try {
        const Isa isa = g_isa;
        const int64_t tiles = (tokens + kAddTile - 1) / kAddTile;
        int nt = threads_for(nthreads);
        if (n * tokens < kAddSerialWork) nt = 1;
        nt = (int)std::min<int64_t>(nt, tiles);
        // per slot: positions, then the sorted slots' S rows and deltas; per destination column: write cursor,
        // group offsets, group columns; per source column: its S row, the columns read
        Scratch pbuf(sizeof(uint32_t) * (size_t)(4 * n + 3 * dst_w + 1 + 2 * src_w));
        if (!pbuf.p) return RANDMASK_ENOMEM;
        uint32_t* rows = pbuf.as<uint32_t>();
        uint32_t* cols = rows + n;
        uint32_t* off = cols + n;
        float* sdelta = reinterpret_cast<float*>(off + n);
        uint32_t* cursor = off + 2 * n;
        uint32_t* beg = cursor + dst_w;
        uint32_t* gdst = beg + dst_w + 1;
        uint32_t* sid = gdst + dst_w;
        uint32_t* ucol = sid + src_w;
#pragma omp parallel for num_threads(nt) schedule(static) if (n > 4 * kPosBlock)
        for (int64_t k0 = 0; k0 < n; k0 += kPosBlock)
            isa.pos(m, (uint32_t)k0, std::min(kPosBlock, n - k0), rows + k0, cols + k0);
        const uint32_t* kdst = transpose ? cols : rows;
        const uint32_t* ksrc = transpose ? rows : cols;
        // stable counting sort by destination column; the groups are the columns with slots
        std::memset(cursor, 0, sizeof(uint32_t) * (size_t)dst_w);
        std::memset(sid, 0, sizeof(uint32_t) * (size_t)src_w);
        for (int64_t k = 0; k < n; ++k) {
            ++cursor[kdst[k]];
            sid[ksrc[k]] = 1;
        }
        int64_t groups = 0;
        uint32_t run = 0;
        for (int64_t j = 0; j < dst_w; ++j) {
            const uint32_t count = cursor[j];
            cursor[j] = run;
            if (count) {
                gdst[groups] = (uint32_t)j;
                beg[groups++] = run;
            }
            run += count;
        }
        beg[groups] = run;
        int64_t nu = 0;
        for (int64_t c = 0; c < src_w; ++c)
            if (sid[c]) ucol[nu++] = (uint32_t)c;
        // every column when the 8x8 transposes can copy them and a quarter or more are read (a transposed column
        // costs about a quarter of a gathered one), else the columns read
        const bool every = isa.fast_transpose && src->stride_c == 1 ? 4 * nu >= src_w : nu == src_w;
        if (every) {
            nu = src_w;
            for (int64_t c = 0; c < src_w; ++c) sid[c] = (uint32_t)c;
        } else {
            for (int64_t u = 0; u < nu; ++u) sid[ucol[u]] = (uint32_t)u;
        }
        for (int64_t k = 0; k < n; ++k) {
            const uint32_t at = cursor[kdst[k]]++;
            off[at] = sid[ksrc[k]];
            sdelta[at] = d[k];
        }
        const AddPlan plan = {off, sdelta, beg, gdst, groups, every ? nullptr : ucol, nu};
        // S, acc, acc_t and the vector write-back's reads past acc_t's last row
        const size_t per_thread = (size_t)round_up((nu + 2 * kAddBlock) * kAddTile + kAlign, kAlign);
        Scratch tbuf(sizeof(float) * per_thread * (size_t)nt);
        if (!tbuf.p) return RANDMASK_ENOMEM;
#pragma omp parallel num_threads(nt)
        {
#ifdef _OPENMP
            const int tid = omp_get_thread_num();
#else
            const int tid = 0;
#endif
            float* S = tbuf.as<float>() + per_thread * (size_t)tid;
            float* acc = S + nu * kAddTile;
            float* acc_t = acc + kAddBlock * kAddTile;
            // dynamic: a thread that lost its core does not hold the others up
#pragma omp for schedule(dynamic, 1)
            for (int64_t tile = 0; tile < tiles; ++tile) {
                const int64_t t0 = tile * kAddTile;
                sparse_add_tile(plan, isa.add, isa.back, isa.fast_transpose, *out, *src, t0,
                                std::min(kAddTile, tokens - t0), S, acc, acc_t);
            }
        }
    } catch (const std::bad_alloc&) {
        return RANDMASK_ENOMEM;
    } catch (...) {
        return RANDMASK_EINVAL;
    }
    return RANDMASK_OK;
}

}  // extern "C"
