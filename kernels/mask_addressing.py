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


def _walk(step, values: torch.Tensor, numel: int, key: int) -> torch.Tensor:
    """Apply the Feistel `step` (P or P^-1) to 1-D int64 values in [0, numel), cycle-walking back into [0, numel),
    in chunks of CHUNK values so temporaries stay small whatever the count."""
    a_radix, b_radix = feistel_radices(numel)
    rks = round_keys(key)
    out = torch.empty_like(values)
    for start in range(0, values.numel(), CHUNK):
        x = step(values[start:start + CHUNK], rks, a_radix, b_radix)
        outside = (x >= numel).nonzero().flatten()
        while outside.numel():  # cycle-walking: rare (probability < 1/sqrt(N) per value)
            x[outside] = step(x[outside], rks, a_radix, b_radix)
            outside = outside[x[outside] >= numel]
        out[start:start + CHUNK] = x
    return out


def slot_to_flat_torch(slots: torch.Tensor, numel: int, key: int) -> torch.Tensor:
    """sigma(k) for int64 slots in [0, numel): flat positions r*in + c (int64, same device)."""
    return _walk(_permute, slots, numel, key)


def flat_to_slot_torch(flat: torch.Tensor, numel: int, key: int) -> torch.Tensor:
    """sigma^-1(p) for int64 flat positions in [0, numel)."""
    return _walk(_unpermute, flat, numel, key)


# ---------------------------------------------------------------- Triton device functions (bit-identical to the twin)
# Names differ from the twin's (round_keys_u32, _feistel_offset, _cycle_walk) so neither shadows the other.
# Shared by kernels/positions.py, masked_grad.py and sparse_update.py. Every hash value is a uint32 tensor, so
# multiplies wrap mod 2^32 and shifts are logical; radices and N are passed from the host (feistel_radices) as
# int32 and cast here. Keys arrive as two uint32-valued ints k0, k1 (split_key): Triton makes ints >= 2^31 int64
# arguments, so they are truncated to uint32 here. Constants are reduced mod 2^32 and made uint32 explicitly.
# The multiplies and adds that wrap on purpose say sanitize_overflow=False: under TRITON_DEBUG=1 Triton otherwise
# inserts overflow asserts into every integer op, and these would fire.


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for ints >= 0, for launch grids: triton.cdiv is a constexpr function since triton 3, ~2 us a call
    from Python (~6 us on a GPU machine's slower host), and a launcher makes several per call."""
    return -(-a // b)


def kernel_mask_args(numel: int, n: int, key: int) -> tuple[int, int, int, int, int]:
    """(numel, A, B, k0, k1): the mask arguments every Triton kernel takes, in that order (0 <= n <= numel)."""
    if triton is None:
        raise RuntimeError("the Triton kernels need triton, which is not installed")
    if not 0 <= n <= numel:
        raise ValueError(f"n must be in [0, {numel}] for a matrix of {numel} entries, got {n}")
    return (numel, *feistel_radices(numel), *split_key(key))


try:
    import triton
    import triton.language as tl
except ImportError:  # triton is optional: the torch twin above is the whole CPU path
    triton = None

if triton is not None:
    assert ROUNDS == 6, "the device functions unroll exactly 6 rounds (an even count: see _feistel)"
    _GOLDEN = tl.constexpr(GOLDEN & M32)
    _FMIX_C1 = tl.constexpr(FMIX_C1 & M32)
    _FMIX_C2 = tl.constexpr(FMIX_C2 & M32)
    _M32 = tl.constexpr(M32)

    @triton.jit
    def fmix32(h):
        """murmur3 finalizer on a uint32 tensor."""
        h ^= h >> 16
        h = tl.mul(h, tl.full((), _FMIX_C1, tl.uint32), sanitize_overflow=False)
        h ^= h >> 13
        h = tl.mul(h, tl.full((), _FMIX_C2, tl.uint32), sanitize_overflow=False)
        return h ^ (h >> 16)

    @triton.jit
    def _round_key(k0, k1, i: tl.constexpr):
        """rk_i = fmix32(k0 ^ fmix32(k1 + GOLDEN * (i + 1))); the constant is reduced mod 2^32 at compile time."""
        step = tl.full((), (_GOLDEN * (i + 1)) & _M32, tl.uint32)
        return fmix32(k0 ^ fmix32(tl.add(k1, step, sanitize_overflow=False)))

    @triton.jit
    def round_keys_u32(k0, k1):
        """The ROUNDS (= 6) uint32 round keys of a layer key, as a tuple of scalars."""
        k0 = tl.cast(k0, tl.uint32)
        k1 = tl.cast(k1, tl.uint32)
        return (_round_key(k0, k1, 0), _round_key(k0, k1, 1), _round_key(k0, k1, 2),
                _round_key(k0, k1, 3), _round_key(k0, k1, 4), _round_key(k0, k1, 5))

    @triton.jit
    def _feistel_offset(v, rk, m):
        """reduce(F(v), m) = (fmix32((v * GOLDEN) ^ rk) * m) >> 32, in [0, m)."""
        return tl.umulhi(fmix32(tl.mul(v, tl.full((), _GOLDEN, tl.uint32), sanitize_overflow=False) ^ rk), m)

    @triton.jit
    def _feistel(x, rks, a_radix, b_radix, INVERSE: tl.constexpr):
        """P(x) on uint32 x in [0, A*B); with INVERSE, P^-1(x): the caller passes rks reversed, so step j is round
        5 - j, whose parity is j's flipped (ROUNDS is even), and off is subtracted as adding m - off, which keeps
        every value unsigned and in [0, 2m)."""
        a = x // b_radix
        b = x % b_radix
        for j in tl.static_range(6):
            if (j + INVERSE) % 2 == 0:  # even rounds move b, odd rounds move a
                off = _feistel_offset(a, rks[j], b_radix)
                b += (b_radix - off) if INVERSE else off
                b = tl.where(b >= b_radix, b - b_radix, b)
            else:
                off = _feistel_offset(b, rks[j], a_radix)
                a += (a_radix - off) if INVERSE else off
                a = tl.where(a >= a_radix, a - a_radix, a)
        return a * b_radix + b

    @triton.jit
    def _cycle_walk(x, numel, a_radix, b_radix, k0, k1, INVERSE: tl.constexpr):
        rks = round_keys_u32(k0, k1)
        if INVERSE:
            rks = rks[::-1]
        a_radix = tl.cast(a_radix, tl.uint32)
        b_radix = tl.cast(b_radix, tl.uint32)
        numel = tl.cast(numel, tl.uint32)
        x = _feistel(tl.cast(x, tl.uint32), rks, a_radix, b_radix, INVERSE)
        # Cycle-walking: rare (probability < 1/sqrt(N) per value); the block loops until none is left outside.
        while tl.max((x >= numel).to(tl.int32)) > 0:
            x = tl.where(x >= numel, _feistel(x, rks, a_radix, b_radix, INVERSE), x)
        return x.to(tl.int64)

    @triton.jit
    def slot_to_flat(k, numel, a_radix, b_radix, k0, k1):
        """sigma(k): flat positions (int64) of slots k in [0, numel) (any shape; mask lanes to a valid value)."""
        return _cycle_walk(k, numel, a_radix, b_radix, k0, k1, False)

    @triton.jit
    def flat_to_slot(p, numel, a_radix, b_radix, k0, k1):
        """sigma^-1(p): slots (int64) of flat positions p in [0, numel)."""
        return _cycle_walk(p, numel, a_radix, b_radix, k0, k1, True)
