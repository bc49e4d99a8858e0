"""Mask addressing, scheme 1: a keyed bijection between slots and matrix positions.

A matrix of shape (out, in) has N = out*in positions, flat index p = r*in + c. For a layer key (uint64) we build a
permutation sigma of [0, N); slot k in [0, n) is the trainable position sigma(k), and position p is trainable iff
sigma^-1(p) < n (its slot). Nothing is stored: both directions are a few dozen integer ops.

sigma is a 6-round mixed-radix Feistel network P over Z_A x Z_B with A = ceil(sqrt(N)), B = ceil(N / A), restricted
to [0, N) by cycle-walking (apply P again while the value is >= N). Why not Feistel over Z_out x Z_in directly: for a
1xN (or Nx1, or 2xN) matrix one half has a single value and every round degenerates to a rotation, so the mask
would be a contiguous run. A balanced split mixes any shape; A*B - N < A <= sqrt(N)+1, so a walk step is needed
with probability < 1/sqrt(N) and the expected number of extra steps is negligible.

Every backend (this torch twin, the Triton device functions below, kernels/csrc/randmask_mask.h) computes exactly:

    fmix32(h):  h ^= h >> 16; h *= 0x85EBCA6B; h ^= h >> 13; h *= 0xC2B2AE35; h ^= h >> 16     (mod 2^32)
    k0, k1    = key & 0xFFFFFFFF, key >> 32
    rk_i      = fmix32(k0 ^ fmix32(k1 + 0x9E3779B9 * (i + 1)))                               i = 0..5
    F_i(v)    = fmix32((v * 0x9E3779B9) ^ rk_i)                                              (mod 2^32)
    reduce(h, m) = (h * m) >> 32                                                   h in [0, 2^32) -> [0, m)
    P(x):  a, b = x // B, x % B
           round i even: b = (b + reduce(F_i(a), B)) mod B
           round i odd:  a = (a + reduce(F_i(b), A)) mod A
           return a*B + b
    sigma(k) = P(k), then P again while >= N;   sigma^-1 runs the rounds backwards with subtraction.

Matrices must have fewer than 2^31 entries, so every value fits a uint32 and A, B <= 46341.
"""
import math

import torch

MASK_SCHEME = 1
ROUNDS = 6
MAX_ENTRIES = 2**31 - 1
M32 = 0xFFFFFFFF
GOLDEN = 0x9E3779B9
FMIX_C1 = 0x85EBCA6B
FMIX_C2 = 0xC2B2AE35
# Torch temporaries per chunk of slots: ~a dozen int64 tensors of this length (a few MB), whatever n is.
CHUNK = 1 << 16


def feistel_radices(numel: int) -> tuple[int, int]:
    """(A, B) with A = ceil(sqrt(N)), B = ceil(N / A): the Feistel domain Z_A x Z_B covers [0, N)."""
    if not 0 < numel <= MAX_ENTRIES:
        raise ValueError(f"a masked matrix needs 1 to {MAX_ENTRIES} entries, got {numel}")
    a = math.isqrt(numel - 1) + 1
    return a, -(-numel // a)


def split_key(key: int) -> tuple[int, int]:
    if not 0 <= key < 2**64:
        raise ValueError(f"a layer key is an unsigned 64-bit integer, got {key}")
    return key & M32, key >> 32


# ---------------------------------------------------------------- python ints (scalars: round keys, test vectors)
def fmix32_int(h: int) -> int:
    h &= M32
    h ^= h >> 16
    h = (h * FMIX_C1) & M32
    h ^= h >> 13
    h = (h * FMIX_C2) & M32
    h ^= h >> 16
    return h


def round_keys(key: int) -> list[int]:
    k0, k1 = split_key(key)
    return [fmix32_int(k0 ^ fmix32_int(k1 + GOLDEN * (i + 1))) for i in range(ROUNDS)]


# ---------------------------------------------------------------- torch twin (int64 tensors holding uint32 values)
def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """x * c mod 2^32 for x in [0, 2^32): split c in 16-bit halves so no int64 product overflows."""
    lo = x * (c & 0xFFFF)
    hi = ((x * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & M32


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    h = h ^ (h >> 16)
    h = _mul32(h, FMIX_C1)
    h = h ^ (h >> 13)
    h = _mul32(h, FMIX_C2)
    return h ^ (h >> 16)


def _round_offset(v: torch.Tensor, rk: int, m: int) -> torch.Tensor:
    # v < 46341, so v * GOLDEN < 2^48 and h * m < 2^48: plain int64 products are exact.
    h = _fmix32(((v * GOLDEN) & M32) ^ rk)
    return (h * m) >> 32


def _permute(x: torch.Tensor, rks: list[int], a_radix: int, b_radix: int) -> torch.Tensor:
    a, b = torch.div(x, b_radix, rounding_mode="floor"), x % b_radix
    for i, rk in enumerate(rks):
        if i % 2 == 0:
            b = b + _round_offset(a, rk, b_radix)
            b = torch.where(b >= b_radix, b - b_radix, b)
        else:
            a = a + _round_offset(b, rk, a_radix)
            a = torch.where(a >= a_radix, a - a_radix, a)
    return a * b_radix + b


def _unpermute(x: torch.Tensor, rks: list[int], a_radix: int, b_radix: int) -> torch.Tensor:
    a, b = torch.div(x, b_radix, rounding_mode="floor"), x % b_radix
    for i in reversed(range(len(rks))):
        if i % 2 == 0:
            b = b - _round_offset(a, rks[i], b_radix)
            b = torch.where(b < 0, b + b_radix, b)
        else:
            a = a - _round_offset(b, rks[i], a_radix)
            a = torch.where(a < 0, a + a_radix, a)
    return a * b_radix + b


def _walk(step, x: torch.Tensor, numel: int, rks, a_radix, b_radix) -> torch.Tensor:
    x = step(x, rks, a_radix, b_radix)
    outside = (x >= numel).nonzero().flatten()
    while outside.numel():  # cycle-walking: rare (probability < 1/sqrt(N) per value)
        x[outside] = step(x[outside], rks, a_radix, b_radix)
        outside = outside[x[outside] >= numel]
    return x


def slot_to_flat_torch(slots: torch.Tensor, numel: int, key: int) -> torch.Tensor:
    """sigma(k) for int64 slots in [0, numel): flat positions r*in + c (int64, same device)."""
    a_radix, b_radix = feistel_radices(numel)
    rks = round_keys(key)
    out = torch.empty_like(slots)
    for start in range(0, slots.numel(), CHUNK):
        out[start:start + CHUNK] = _walk(_permute, slots[start:start + CHUNK], numel, rks, a_radix, b_radix)
    return out


def flat_to_slot_torch(flat: torch.Tensor, numel: int, key: int) -> torch.Tensor:
    """sigma^-1(p) for int64 flat positions in [0, numel)."""
    a_radix, b_radix = feistel_radices(numel)
    rks = round_keys(key)
    out = torch.empty_like(flat)
    for start in range(0, flat.numel(), CHUNK):
        out[start:start + CHUNK] = _walk(_unpermute, flat[start:start + CHUNK], numel, rks, a_radix, b_radix)
    return out
