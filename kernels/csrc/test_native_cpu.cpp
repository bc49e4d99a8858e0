// test_native_cpu.cpp: the native CPU library (native_cpu.cpp, through its C ABI) against a naive reference.
//
// The reference takes positions from randmask_mask.h (itself held to tests/vectors by test_mask_vectors) and sums
// in double; the library must agree to fp32 accuracy on the masked gradient and exactly on gather, sparse update,
// positions and the sparse add (whose contract fixes every rounding). Shapes: 1xN, Nx1, primes, n = 0, n = N, T = 0,
// strided (non-contiguous) inputs; fp32/fp16/bf16.
// tests/test_native_kernels.py holds the same library to the torch twins.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "randmask_dtype.h"
#include "randmask_mask.h"
#include "randmask_native.h"

namespace {

int failures = 0;

#define CHECK(cond, ...)                                    \
    do {                                                    \
        if (!(cond)) {                                      \
            ++failures;                                     \
            std::printf("FAIL %s:%d: ", __FILE__, __LINE__); \
            std::printf(__VA_ARGS__);                       \
            std::printf("\n");                              \
        }                                                   \
    } while (0)

const uint64_t kKey = 0x0123456789ABCDEFull;

// A (rows, cols) matrix stored with strides (sr, sc) in a buffer of 16-bit or 32-bit elements.
struct Strided {
    int dtype;
    int64_t rows, cols, sr, sc;
    std::vector<uint32_t> f32;
    std::vector<uint16_t> h16;
    const void* data() const { return dtype == RANDMASK_F32 ? (const void*)f32.data() : (const void*)h16.data(); }
    void* data() { return dtype == RANDMASK_F32 ? (void*)f32.data() : (void*)h16.data(); }
    randmask_matrix_t view() const { return {const_cast<void*>(data()), dtype, rows, cols, sr, sc}; }
    float at(int64_t r, int64_t c) const {
        const int64_t i = r * sr + c * sc;
        if (dtype == RANDMASK_F32) return randmask_f32_from_bits(f32[i]);
        return dtype == RANDMASK_F16 ? randmask_f16_to_f32(h16[i]) : randmask_bf16_to_f32(h16[i]);
    }
};

// Random values rounded to `dtype`; `transposed` stores it column-major, `gap` leaves unused elements between.
Strided make(int dtype, int64_t rows, int64_t cols, bool transposed, int64_t gap, std::mt19937& rng) {
    Strided m{dtype, rows, cols, 0, 0, {}, {}};
    if (transposed) {
        m.sr = gap;
        m.sc = rows * gap;
    } else {
        m.sr = cols * gap;
        m.sc = gap;
    }
    const size_t size = (size_t)(rows * cols * gap + 1);
    std::normal_distribution<float> normal(0.f, 1.f);
    if (dtype == RANDMASK_F32) m.f32.assign(size, 0x7FC00000u);  // NaN in the gaps: reading one would show
    else m.h16.assign(size, dtype == RANDMASK_F16 ? 0x7E00u : 0x7FC0u);
    for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < cols; ++c) {
            const float v = normal(rng);
            const int64_t i = r * m.sr + c * m.sc;
            if (dtype == RANDMASK_F32) m.f32[i] = randmask_f32_bits(v);
            else m.h16[i] = dtype == RANDMASK_F16 ? randmask_f32_to_f16(v) : randmask_f32_to_bf16(v);
        }
    return m;
}

void check_masked_grad(int64_t out, int64_t in, int64_t n, int64_t tokens, int xd, int gd, bool strided,
                       std::mt19937& rng) {
    const Strided x = make(xd, tokens, in, strided, strided ? 2 : 1, rng);
    const Strided gy = make(gd, tokens, out, false, strided ? 3 : 1, rng);
    std::vector<float> g((size_t)n + 1, -1.f);
    const randmask_matrix_t xv = x.view(), gv = gy.view();
    const randmask_mask_args_t mask = {out, in, n, kKey};
    const int status = randmask_cpu_masked_grad(&xv, &gv, &mask, g.data(), 0);
    CHECK(status == RANDMASK_OK, "masked_grad %lldx%lld n=%lld T=%lld: status %d", (long long)out, (long long)in,
          (long long)n, (long long)tokens, status);
    if (status != RANDMASK_OK) return;
    const randmask_mask_t m = randmask_mask_init((uint32_t)out, (uint32_t)in, kKey);
    for (int64_t k = 0; k < n; ++k) {
        uint32_t r, c;
        randmask_position(&m, (uint32_t)k, &r, &c);
        double ref = 0.0, mag = 0.0;
        for (int64_t t = 0; t < tokens; ++t) {
            const double p = (double)gy.at(t, r) * (double)x.at(t, c);
            ref += p;
            mag += std::fabs(p);
        }
        // fp32 accumulation: the error is bounded by ~T * eps * sum |terms| in the worst case; the loops sum in
        // 16 lanes then reduce, so a few eps * sqrt(T) * sum |terms| is generous and still catches any wrong term.
        const double err = std::fabs((double)g[k] - ref);
        const double tol = 1e-5 * std::fabs(ref) + 4e-7 * std::sqrt((double)tokens + 1) * mag;
        CHECK(err <= tol, "masked_grad %lldx%lld n=%lld T=%lld dtypes %d/%d%s: slot %lld got %.9g want %.9g",
              (long long)out, (long long)in, (long long)n, (long long)tokens, xd, gd, strided ? " strided" : "",
              (long long)k, (double)g[k], ref);
        if (err > tol) return;
    }
    CHECK(g[(size_t)n] == -1.f, "masked_grad wrote past g[n - 1]");
}

void check_weight_ops(int64_t out, int64_t in, int64_t n, int wd, int bd, bool transposed, std::mt19937& rng) {
    Strided w = make(wd, out, in, transposed, 1, rng);
    const Strided before = w;
    // gather: base[k] = weight[r_k, c_k], bit for bit
    std::vector<uint32_t> base32((size_t)n + 1, 0xDEADBEEFu);
    std::vector<uint16_t> base16((size_t)n + 1, 0xBEEFu);
    void* gathered = wd == RANDMASK_F32 ? (void*)base32.data() : (void*)base16.data();
    const randmask_matrix_t wv = w.view();
    const randmask_mask_args_t mask = {out, in, n, kKey};
    const randmask_vector_t gathered_v = {gathered, wd, n};
    int status = randmask_cpu_gather_weight(&wv, &mask, &gathered_v, 0);
    CHECK(status == RANDMASK_OK, "gather status %d", status);
    const randmask_mask_t m = randmask_mask_init((uint32_t)out, (uint32_t)in, kKey);
    for (int64_t k = 0; k < n && status == RANDMASK_OK; ++k) {
        uint32_t r, c;
        randmask_position(&m, (uint32_t)k, &r, &c);
        const int64_t i = r * w.sr + c * w.sc;
        const bool same = wd == RANDMASK_F32 ? base32[k] == w.f32[i] : base16[k] == w.h16[i];
        CHECK(same, "gather %lldx%lld slot %lld differs", (long long)out, (long long)in, (long long)k);
        if (!same) break;
    }
    // sparse update with a base of dtype bd: weight[r_k, c_k] = round_wd(float(base[k]) + delta[k])
    std::normal_distribution<float> normal(0.f, 1.f);
    Strided base = make(bd, 1, n > 0 ? n : 1, false, 1, rng);
    std::vector<float> delta((size_t)(n > 0 ? n : 1));
    for (auto& d : delta) d = 1e-2f * normal(rng);
    const randmask_vector_t base_v = {const_cast<void*>(base.data()), bd, n}, delta_v = {delta.data(), RANDMASK_F32, n};
    status = randmask_cpu_sparse_update(&wv, &base_v, &delta_v, &mask, 0);
    CHECK(status == RANDMASK_OK, "sparse_update status %d", status);
    std::vector<char> touched((size_t)(out * in), 0);
    for (int64_t k = 0; k < n; ++k) {
        uint32_t r, c;
        randmask_position(&m, (uint32_t)k, &r, &c);
        touched[(size_t)(r * in + c)] = 1;
        const float v = base.at(0, k) + delta[(size_t)k];
        const int64_t i = r * w.sr + c * w.sc;
        bool same;
        if (wd == RANDMASK_F32) same = w.f32[i] == randmask_f32_bits(v);
        else same = w.h16[i] == (wd == RANDMASK_F16 ? randmask_f32_to_f16(v) : randmask_f32_to_bf16(v));
        CHECK(same, "sparse_update %lldx%lld slot %lld wrong", (long long)out, (long long)in, (long long)k);
        if (!same) return;
    }
    for (int64_t r = 0; r < out; ++r)  // nothing else moved
        for (int64_t c = 0; c < in; ++c) {
            const int64_t i = r * w.sr + c * w.sc;
            const bool same = wd == RANDMASK_F32 ? w.f32[i] == before.f32[i] : w.h16[i] == before.h16[i];
            if (!touched[(size_t)(r * in + c)] && !same) {
                CHECK(false, "sparse_update touched unmasked (%lld, %lld)", (long long)r, (long long)c);
                return;
            }
        }
}

// The sparse add against the contract computed here in slot order: acc = sum of fp32-rounded products, then
// round(float(out) + acc). The library must agree bit for bit on every ISA this CPU has and every thread count, and
// leave every other element of out's buffer (the gaps of a strided view included) as it was.
void check_sparse_add(int64_t out, int64_t in, int64_t n, int64_t tokens, int od, int sd, bool transpose,
                      bool strided, std::mt19937& rng) {
    const int64_t dst_w = transpose ? in : out, src_w = transpose ? out : in;
    const Strided before = make(od, tokens, dst_w, false, strided ? 2 : 1, rng);
    const Strided src = make(sd, tokens, src_w, strided, strided ? 3 : 1, rng);
    std::normal_distribution<float> normal(0.f, 1.f);
    std::vector<float> delta((size_t)n + 1);
    for (auto& d : delta) d = normal(rng);
    // the contract, element by element
    const randmask_mask_t m = randmask_mask_init((uint32_t)out, (uint32_t)in, kKey);
    std::vector<float> acc((size_t)(tokens * dst_w), 0.f);
    std::vector<char> touched((size_t)dst_w, 0);
    for (int64_t k = 0; k < n; ++k) {
        uint32_t r, c;
        randmask_position(&m, (uint32_t)k, &r, &c);
        const uint32_t j = transpose ? c : r, i = transpose ? r : c;
        touched[j] = 1;
        for (int64_t t = 0; t < tokens; ++t) {
            volatile float product = delta[(size_t)k] * src.at(t, i);  // rounded to fp32: never fused into the add
            acc[(size_t)(t * dst_w + j)] += product;
        }
    }
    Strided want = before;
    for (int64_t t = 0; t < tokens; ++t)
        for (int64_t j = 0; j < dst_w; ++j) {
            if (!touched[j]) continue;
            const float v = before.at(t, j) + acc[(size_t)(t * dst_w + j)];
            const int64_t e = t * want.sr + j * want.sc;
            if (od == RANDMASK_F32) want.f32[e] = randmask_f32_bits(v);
            else want.h16[e] = od == RANDMASK_F16 ? randmask_f32_to_f16(v) : randmask_f32_to_bf16(v);
        }
    const randmask_mask_args_t mask = {out, in, n, kKey};
    const randmask_vector_t delta_v = {delta.data(), RANDMASK_F32, n};
    const char* isas[] = {"avx512f", "avx2", "portable"};
    for (const char* isa : isas) {
        if (randmask_cpu_select_isa(isa) != RANDMASK_OK) continue;  // this CPU lacks it
        for (int threads = 1; threads <= 3; ++threads) {
            Strided got = before;
            const randmask_matrix_t ov = got.view(), sv = src.view();
            const int status = randmask_cpu_sparse_add(&ov, &sv, &delta_v, &mask, transpose ? 1 : 0, threads);
            const bool same = got.f32 == want.f32 && got.h16 == want.h16;
            CHECK(status == RANDMASK_OK && same,
                  "sparse_add%s %lldx%lld n=%lld T=%lld dtypes %d/%d%s, %s, %d threads: status %d, %s",
                  transpose ? " (transposed)" : "", (long long)out, (long long)in, (long long)n, (long long)tokens,
                  od, sd, strided ? " strided" : "", isa, threads, status, same ? "same bits" : "bits differ");
            if (status != RANDMASK_OK || !same) {
                randmask_cpu_select_isa("best");
                return;
            }
        }
    }
    randmask_cpu_select_isa("best");
}

void check_positions(int64_t out, int64_t in, int64_t n) {
    std::vector<int64_t> rows((size_t)n + 1), cols((size_t)n + 1);
    const randmask_mask_args_t mask = {out, in, n, kKey};
    const int status = randmask_cpu_positions(&mask, rows.data(), cols.data(), 0);
    CHECK(status == RANDMASK_OK, "positions status %d", status);
    const randmask_mask_t m = randmask_mask_init((uint32_t)out, (uint32_t)in, kKey);
    for (int64_t k = 0; k < n; ++k) {
        uint32_t r, c;
        randmask_position(&m, (uint32_t)k, &r, &c);
        if (rows[k] != r || cols[k] != c) {
            CHECK(false, "positions %lldx%lld slot %lld", (long long)out, (long long)in, (long long)k);
            return;
        }
    }
}

void check_rounding() {
    // Hand-checked narrowing cases: ties to even, overflow to inf, fp16 subnormals, NaN stays NaN.
    CHECK(randmask_f32_to_bf16(1.0f) == 0x3F80u, "bf16(1)");
    CHECK(randmask_f32_to_bf16(randmask_f32_from_bits(0x3F808000u)) == 0x3F80u, "bf16 tie to even (down)");
    CHECK(randmask_f32_to_bf16(randmask_f32_from_bits(0x3F818000u)) == 0x3F82u, "bf16 tie to even (up)");
    CHECK(randmask_f32_to_bf16(randmask_f32_from_bits(0x7F7FFFFFu)) == 0x7F80u, "bf16 overflow to inf");
    CHECK((randmask_f32_to_bf16(NAN) & 0x7FFFu) > 0x7F80u, "bf16 NaN");
    CHECK(randmask_f32_to_f16(1.0f) == 0x3C00u, "f16(1)");
    CHECK(randmask_f32_to_f16(65504.f) == 0x7BFFu, "f16 max");
    CHECK(randmask_f32_to_f16(65519.f) == 0x7BFFu, "f16 below the overflow tie");
    CHECK(randmask_f32_to_f16(65520.f) == 0x7C00u, "f16 overflow tie to inf");
    CHECK(randmask_f32_to_f16(-1e9f) == 0xFC00u, "f16 -inf");
    CHECK(randmask_f32_to_f16(std::ldexp(1.f, -24)) == 0x0001u, "f16 smallest subnormal");
    CHECK(randmask_f32_to_f16(std::ldexp(1.f, -25)) == 0x0000u, "f16 2^-25 ties to 0");
    CHECK(randmask_f32_to_f16(std::ldexp(3.f, -26)) == 0x0001u, "f16 0.75 * 2^-24 rounds up");
    CHECK(randmask_f32_to_f16(std::ldexp(3.f, -25)) == 0x0002u, "f16 1.5 * 2^-24 ties to even 2");
    CHECK(randmask_f32_to_f16(1.0f + std::ldexp(1.f, -11)) == 0x3C00u, "f16 tie to even (down)");
    CHECK(randmask_f32_to_f16(1.0f + 3 * std::ldexp(1.f, -11)) == 0x3C02u, "f16 tie to even (up)");
    CHECK((randmask_f32_to_f16(NAN) & 0x7FFFu) > 0x7C00u, "f16 NaN");
    for (uint32_t h = 0; h < 0x10000u; ++h) {  // widening then narrowing is the identity on every non-NaN fp16
        if ((h & 0x7FFFu) > 0x7C00u) continue;
        if (randmask_f32_to_f16(randmask_f16_to_f32((uint16_t)h)) != h) {
            CHECK(false, "f16 round trip 0x%04x", h);
            break;
        }
    }
}

}  // namespace

int main() {
    std::mt19937 rng(1234);
    CHECK(randmask_cpu_abi_version() == RANDMASK_NATIVE_ABI, "ABI version");
    std::printf("native CPU library: ISA %s, %d threads\n", randmask_cpu_isa(), randmask_cpu_max_threads());
    check_rounding();

    struct Case { int64_t out, in, n, tokens; };
    const Case cases[] = {
        {1, 97, 30, 5},       // 1xN
        {89, 1, 89, 33},      // Nx1, n = N
        {53, 47, 0, 17},      // n = 0
        {53, 47, 53 * 47, 17},  // n = N, primes
        {64, 48, 300, 0},     // T = 0
        {31, 37, 200, 1},     // one token
        {101, 67, 1500, 300}, // more than one token chunk
        {576, 192, 4000, 130}, // sorted-by-row path (n >= 2 * out), tail chunk
        {7, 1000, 20, 40},    // few slots, wide
        {30, 1500, 4000, 37}, // wider than one transpose tile (1024 features)
    };
    const int dtypes[] = {RANDMASK_F32, RANDMASK_F16, RANDMASK_BF16};
    for (const Case& c : cases) {
        for (int xd : dtypes) {
            check_masked_grad(c.out, c.in, c.n, c.tokens, xd, xd, false, rng);
            check_masked_grad(c.out, c.in, c.n, c.tokens, xd, RANDMASK_F32, true, rng);
            check_weight_ops(c.out, c.in, c.n, xd, xd, false, rng);
            check_weight_ops(c.out, c.in, c.n, xd, RANDMASK_F32, true, rng);
        }
        check_positions(c.out, c.in, c.n);
        for (const bool transpose : {false, true}) {
            check_sparse_add(c.out, c.in, c.n, c.tokens, RANDMASK_F32, RANDMASK_F32, transpose, false, rng);
            check_sparse_add(c.out, c.in, c.n, c.tokens, RANDMASK_F16, RANDMASK_F16, transpose, true, rng);
            check_sparse_add(c.out, c.in, c.n, c.tokens, RANDMASK_BF16, RANDMASK_F32, transpose, false, rng);
        }
    }
    // bad arguments are refused, not dereferenced
    float g = 0.f;
    const randmask_matrix_t none = {nullptr, RANDMASK_F32, 4, 3, 3, 1}, none_out = {nullptr, RANDMASK_F32, 4, 3, 3, 1};
    const randmask_mask_args_t too_many = {3, 3, 10, kKey};
    CHECK(randmask_cpu_masked_grad(&none, &none_out, &too_many, &g, 0) == RANDMASK_EINVAL, "n > out * in accepted");
    const randmask_matrix_t bad_dtype = {&g, 7, 1, 1, 1, 1}, one = {&g, RANDMASK_F32, 1, 1, 1, 1};
    const randmask_mask_args_t single = {1, 1, 1, kKey};
    CHECK(randmask_cpu_masked_grad(&bad_dtype, &one, &single, &g, 0) == RANDMASK_EDTYPE, "bad dtype accepted");
    const randmask_matrix_t three = {&g, RANDMASK_F32, 3, 3, 3, 1};
    CHECK(randmask_cpu_masked_grad(&one, &three, &single, &g, 0) == RANDMASK_EINVAL, "mismatched shapes accepted");
    const randmask_matrix_t null_w = {nullptr, RANDMASK_F32, 3, 3, 3, 1};
    const randmask_vector_t null_v = {nullptr, RANDMASK_F32, 2};
    const randmask_mask_args_t two = {3, 3, 2, kKey};
    CHECK(randmask_cpu_sparse_update(&null_w, &null_v, &null_v, &two, 0) == RANDMASK_EINVAL, "null pointers accepted");
    const randmask_matrix_t huge = {nullptr, RANDMASK_F32, 70000, 70000, 70000, 1};
    const randmask_mask_args_t huge_mask = {70000, 70000, 1, kKey};
    const randmask_vector_t one_v = {&g, RANDMASK_F32, 1};
    CHECK(randmask_cpu_gather_weight(&huge, &huge_mask, &one_v, 0) == RANDMASK_EINVAL,
          "a matrix of 2^32 entries accepted");
    CHECK(randmask_cpu_positions(nullptr, nullptr, nullptr, 0) == RANDMASK_EINVAL, "a null mask accepted");
    const randmask_matrix_t out13 = {&g, RANDMASK_F32, 1, 3, 3, 1}, src12 = {&g, RANDMASK_F32, 1, 2, 2, 1};
    const randmask_mask_args_t mask32 = {3, 2, 1, kKey};
    const randmask_vector_t delta1 = {&g, RANDMASK_F32, 1}, delta1_f16 = {&g, RANDMASK_F16, 1};
    CHECK(randmask_cpu_sparse_add(&out13, &src12, &delta1, &mask32, 2, 0) == RANDMASK_EINVAL, "transpose=2 accepted");
    CHECK(randmask_cpu_sparse_add(&out13, &src12, &delta1_f16, &mask32, 0, 0) == RANDMASK_EDTYPE,
          "an fp16 delta accepted");
    CHECK(randmask_cpu_sparse_add(&out13, &src12, &delta1, &mask32, 1, 0) == RANDMASK_EINVAL,
          "forward shapes accepted as transposed");
    CHECK(randmask_cpu_sparse_add(&src12, &src12, &delta1, &mask32, 0, 0) == RANDMASK_EINVAL, "a narrow out accepted");
    const randmask_vector_t delta2 = {&g, RANDMASK_F32, 2};
    CHECK(randmask_cpu_sparse_add(&out13, &src12, &delta2, &mask32, 0, 0) == RANDMASK_EINVAL,
          "delta of the wrong length accepted");
    const randmask_matrix_t null_out = {nullptr, RANDMASK_F32, 1, 3, 3, 1};
    CHECK(randmask_cpu_sparse_add(&null_out, &src12, &delta1, &mask32, 0, 0) == RANDMASK_EINVAL,
          "a null out accepted");

    if (failures) {
        std::printf("%d failure(s)\n", failures);
        return 1;
    }
    std::printf("all native CPU checks passed\n");
    return 0;
}
