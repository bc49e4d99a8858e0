/* randmask_dtype.h: fp16 / bf16 <-> fp32 conversions, integer-only (C99 and C++).
 *
 * Widening (fp16/bf16 -> fp32) is exact. Narrowing rounds to nearest, ties to even, like torch's
 * tensor.to(torch.float16 / torch.bfloat16): overflow goes to +-inf, fp16 subnormals are produced exactly, NaN stays
 * NaN (as the canonical quiet NaN 0x7E00 / 0x7FC0; torch's own vectorised paths differ among themselves in NaN bit
 * patterns, so only NaN-ness is part of the contract). Integer-only, so the result does not depend on the floating
 * point environment (flush-to-zero, denormals-are-zero).
 */
#ifndef RANDMASK_DTYPE_H
#define RANDMASK_DTYPE_H

#include <stdint.h>
#include <string.h>

#ifndef RANDMASK_FN
#define RANDMASK_FN static inline
#endif

RANDMASK_FN uint32_t randmask_f32_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

RANDMASK_FN float randmask_f32_from_bits(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

RANDMASK_FN float randmask_bf16_to_f32(uint16_t h) { return randmask_f32_from_bits((uint32_t)h << 16); }

RANDMASK_FN uint16_t randmask_f32_to_bf16(float f) {
    uint32_t u = randmask_f32_bits(f);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0u; /* NaN */
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

RANDMASK_FN float randmask_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1Fu, m = h & 0x3FFu;
    if (e == 0x1Fu) return randmask_f32_from_bits(sign | 0x7F800000u | (m << 13)); /* inf, NaN */
    if (e) return randmask_f32_from_bits(sign | ((e + 112u) << 23) | (m << 13));
    if (!m) return randmask_f32_from_bits(sign);
    e = 113u; /* subnormal: m * 2^-24, normalise */
    while (!(m & 0x400u)) {
        m <<= 1;
        --e;
    }
    return randmask_f32_from_bits(sign | (e << 23) | ((m & 0x3FFu) << 13));
}

RANDMASK_FN uint16_t randmask_f32_to_f16(float f) {
    uint32_t u = randmask_f32_bits(f), sign = (u >> 16) & 0x8000u, a = u & 0x7FFFFFFFu;
    if (a > 0x7F800000u) return (uint16_t)0x7E00u;            /* NaN */
    if (a >= 0x477FF000u) return (uint16_t)(sign | 0x7C00u);  /* >= 65520 (and inf): rounds to inf */
    if (a >= 0x38800000u) {                                   /* >= 2^-14: a normal half */
        uint32_t r = a - 0x38000000u;                         /* rebias the exponent by 127 - 15 */
        r += 0xFFFu + ((r >> 13) & 1u);                       /* round the 13 dropped bits, ties to even */
        return (uint16_t)(sign | (r >> 13));
    }
    if (a < 0x33000000u) return (uint16_t)sign; /* < 2^-25 (or exactly: a tie to the even 0) */
    {                                           /* a subnormal half: m * 2^(e - 150) in units of 2^-24 */
        uint32_t e = a >> 23, m = (a & 0x7FFFFFu) | 0x800000u, shift = 126u - e;
        uint32_t h = m >> shift, rem = m & ((1u << shift) - 1u), half = 1u << (shift - 1u);
        if (rem > half || (rem == half && (h & 1u))) ++h;
        return (uint16_t)(sign | h);
    }
}

#endif /* RANDMASK_DTYPE_H */
