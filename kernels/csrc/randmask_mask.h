/* randmask_mask.h: mask addressing, scheme 1, header-only (C99 and C++).
 *
 * A matrix of shape (out, in) has N = out*in < 2^31 positions, flat index p = r*in + c. For a layer key (uint64)
 * sigma is a keyed permutation of [0, N): slot k in [0, n) is the trainable position sigma(k), and position p is
 * trainable iff its slot sigma^-1(p) < n. Nothing is stored.
 *
 * THIS MUST STAY BIT-IDENTICAL to the torch twin and the Triton device functions in kernels/mask_addressing.py
 * (whose docstring is the spec) and to the committed vectors tests/vectors/mask_scheme1.txt. All arithmetic is
 * uint32 with natural wraparound (mod 2^32) unless noted:
 *
 *     fmix32(h):  h ^= h >> 16; h *= 0x85EBCA6B; h ^= h >> 13; h *= 0xC2B2AE35; h ^= h >> 16
 *     k0, k1    = key & 0xFFFFFFFF, key >> 32
 *     rk_i      = fmix32(k0 ^ fmix32(k1 + 0x9E3779B9 * (i + 1)))                       i = 0..5
 *     F_i(v)    = fmix32((v * 0x9E3779B9) ^ rk_i)
 *     reduce(h, m) = ((uint64)h * m) >> 32                                   h in [0, 2^32) -> [0, m)
 *     A = ceil(sqrt(N)), B = ceil(N / A)       (A*B - N < A, A, B <= 46341, A*B < 2^32)
 *     P(x):  a, b = x / B, x % B
 *            round i even: b = (b + reduce(F_i(a), B)) mod B
 *            round i odd:  a = (a + reduce(F_i(b), A)) mod A
 *            return a*B + b
 *     sigma(k) = P(k), then P again while >= N (cycle-walking);
 *     sigma^-1 runs the rounds backwards (i = 5..0) with subtraction, also cycle-walking.
 */
#ifndef RANDMASK_MASK_H
#define RANDMASK_MASK_H

#include <stdint.h>

#define RANDMASK_FN static inline

#define RANDMASK_MASK_SCHEME 1
#define RANDMASK_ROUNDS 6
#define RANDMASK_MAX_ENTRIES 2147483647u /* 2^31 - 1 */
#define RANDMASK_GOLDEN 0x9E3779B9u
#define RANDMASK_FMIX_C1 0x85EBCA6Bu
#define RANDMASK_FMIX_C2 0xC2B2AE35u

/* Everything one (shape, key) needs: 6 round keys, the Feistel radices and the matrix shape. Plain data (44 bytes),
 * cheap to pass by value. */
typedef struct randmask_mask {
    uint32_t rk[RANDMASK_ROUNDS]; /* round keys rk_0..rk_5 */
    uint32_t a, b;                /* A = ceil(sqrt(N)), B = ceil(N / A) */
    uint32_t numel;               /* N = rows * cols; 0 marks an invalid shape (see randmask_mask_init) */
    uint32_t rows, cols;          /* out, in */
} randmask_mask_t;

RANDMASK_FN uint32_t randmask_fmix32(uint32_t h) {
    h ^= h >> 16;
    h *= RANDMASK_FMIX_C1;
    h ^= h >> 13;
    h *= RANDMASK_FMIX_C2;
    h ^= h >> 16;
    return h;
}

/* rk_i for i = 0..5 from the uint64 layer key. */
RANDMASK_FN void randmask_round_keys(uint64_t key, uint32_t rk[RANDMASK_ROUNDS]) {
    uint32_t k0 = (uint32_t)(key & 0xFFFFFFFFu), k1 = (uint32_t)(key >> 32);
    int i;
    for (i = 0; i < RANDMASK_ROUNDS; ++i)
        rk[i] = randmask_fmix32(k0 ^ randmask_fmix32(k1 + RANDMASK_GOLDEN * (uint32_t)(i + 1)));
}

/* floor(sqrt(x)), exact, integer only (no libm, same on host and device). */
RANDMASK_FN uint32_t randmask_isqrt(uint32_t x) {
    uint32_t r = 0, bit = 1u << 30;
    while (bit > x) bit >>= 2;
    while (bit) {
        if (x >= r + bit) {
            x -= r + bit;
            r = (r >> 1) + bit;
        } else {
            r >>= 1;
        }
        bit >>= 2;
    }
    return r;
}

/* A = ceil(sqrt(N)) = isqrt(N - 1) + 1, B = ceil(N / A); needs 1 <= N <= 2^31 - 1. */
RANDMASK_FN void randmask_radices(uint32_t numel, uint32_t* a, uint32_t* b) {
    *a = randmask_isqrt(numel - 1u) + 1u;
    *b = (numel + *a - 1u) / *a;
}

/* The mask of an (out, in) matrix under `key`. Precondition: 1 <= out*in <= 2^31 - 1; otherwise the result has
 * numel == 0 and must not be used (check it on the host, like feistel_radices raises in Python). */
RANDMASK_FN randmask_mask_t randmask_mask_init(uint32_t out, uint32_t in, uint64_t key) {
    randmask_mask_t m;
    uint64_t n = (uint64_t)out * in;
    randmask_round_keys(key, m.rk);
    m.rows = out;
    m.cols = in;
    if (n == 0 || n > RANDMASK_MAX_ENTRIES) {
        m.numel = m.a = m.b = 0;
        return m;
    }
    m.numel = (uint32_t)n;
    randmask_radices(m.numel, &m.a, &m.b);
    return m;
}

/* reduce(F_i(v), m) = (fmix32((v * GOLDEN) ^ rk) * m) >> 32, in [0, m). */
RANDMASK_FN uint32_t randmask_round_offset(uint32_t v, uint32_t rk, uint32_t m) {
    uint32_t h = randmask_fmix32((v * RANDMASK_GOLDEN) ^ rk);
    return (uint32_t)(((uint64_t)h * m) >> 32);
}

/* P: one pass of the 6 rounds over Z_A x Z_B; x in [0, A*B). */
RANDMASK_FN uint32_t randmask_permute(const randmask_mask_t* m, uint32_t x) {
    uint32_t a = x / m->b, b = x % m->b;
    int i;
    for (i = 0; i < RANDMASK_ROUNDS; i += 2) {
        b += randmask_round_offset(a, m->rk[i], m->b); /* < 2B: no wrap */
        if (b >= m->b) b -= m->b;
        a += randmask_round_offset(b, m->rk[i + 1], m->a);
        if (a >= m->a) a -= m->a;
    }
    return a * m->b + b;
}

/* P^-1: the rounds backwards with subtraction. */
RANDMASK_FN uint32_t randmask_unpermute(const randmask_mask_t* m, uint32_t x) {
    uint32_t a = x / m->b, b = x % m->b, off;
    int i;
    for (i = RANDMASK_ROUNDS - 2; i >= 0; i -= 2) {
        off = randmask_round_offset(b, m->rk[i + 1], m->a);
        a = a >= off ? a - off : a + m->a - off;
        off = randmask_round_offset(a, m->rk[i], m->b);
        b = b >= off ? b - off : b + m->b - off;
    }
    return a * m->b + b;
}

/* sigma(slot): the flat position r*in + c of `slot`; slot in [0, N). */
RANDMASK_FN uint32_t randmask_slot_to_flat(const randmask_mask_t* m, uint32_t slot) {
    uint32_t x = randmask_permute(m, slot);
    while (x >= m->numel) x = randmask_permute(m, x); /* cycle-walking: rare */
    return x;
}

/* sigma^-1(flat): the slot of flat position `flat`; flat in [0, N). */
RANDMASK_FN uint32_t randmask_flat_to_slot(const randmask_mask_t* m, uint32_t flat) {
    uint32_t x = randmask_unpermute(m, flat);
    while (x >= m->numel) x = randmask_unpermute(m, x);
    return x;
}

/* (row, col) of `slot`; slot in [0, N). */
RANDMASK_FN void randmask_position(const randmask_mask_t* m, uint32_t slot, uint32_t* row, uint32_t* col) {
    uint32_t p = randmask_slot_to_flat(m, slot);
    *row = p / m->cols;
    *col = p % m->cols;
}

/* The slot of (row, col) if it is trainable with n slots (slot < n), else -1 (also -1 outside the matrix). */
RANDMASK_FN int64_t randmask_slot(const randmask_mask_t* m, uint32_t row, uint32_t col, uint32_t n) {
    uint32_t s;
    if (row >= m->rows || col >= m->cols) return -1;
    s = randmask_flat_to_slot(m, row * m->cols + col);
    return s < n ? (int64_t)s : -1;
}

#endif /* RANDMASK_MASK_H */
