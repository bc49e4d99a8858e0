"""Independent references for the op tests: written from the specifications (kernels/mask_addressing.py's docstring
for the mask, the ops' docstrings for the math), in plain Python integers and float64, sharing no code with any
implementation under test. Slow by design; the tests keep their sizes small.
"""
import functools
import math
import pathlib

import torch

VECTORS = pathlib.Path(__file__).resolve().parents[1] / "vectors" / "mask_scheme1.txt"
M32 = 0xFFFFFFFF


def _fmix32(h: int) -> int:
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & M32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & M32
    return h ^ (h >> 16)


class Sigma:
    """sigma and its inverse for one (numel, key), mask scheme 1, in Python integers."""

    def __init__(self, numel: int, key: int):
        self.numel = numel
        self.a = math.isqrt(numel - 1) + 1
        self.b = -(-numel // self.a)
        k0, k1 = key & M32, key >> 32
        self.rk = [_fmix32(k0 ^ _fmix32((k1 + 0x9E3779B9 * (i + 1)) & M32)) for i in range(6)]

    def _offset(self, v: int, i: int, m: int) -> int:
        return (_fmix32(((v * 0x9E3779B9) & M32) ^ self.rk[i]) * m) >> 32

    def _p(self, x: int, inverse: bool) -> int:
        a, b = divmod(x, self.b)
        for i in (reversed(range(6)) if inverse else range(6)):
            sign = -1 if inverse else 1
            if i % 2 == 0:
                b = (b + sign * self._offset(a, i, self.b)) % self.b
            else:
                a = (a + sign * self._offset(b, i, self.a)) % self.a
        return a * self.b + b

    def forward(self, k: int) -> int:
        x = self._p(k, False)
        while x >= self.numel:
            x = self._p(x, False)
        return x

    def inverse(self, p: int) -> int:
        x = self._p(p, True)
        while x >= self.numel:
            x = self._p(x, True)
        return x


@functools.cache
def positions(shape, n: int, key: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) int64 of slots 0..n-1."""
    sigma = Sigma(shape[0] * shape[1], key)
    flat = [sigma.forward(k) for k in range(n)]
    return (torch.tensor([p // shape[1] for p in flat], dtype=torch.int64),
            torch.tensor([p % shape[1] for p in flat], dtype=torch.int64))


def slots(rows: torch.Tensor, cols: torch.Tensor, shape, n: int, key: int) -> torch.Tensor:
    sigma = Sigma(shape[0] * shape[1], key)
    out = [sigma.inverse(r * shape[1] + c) for r, c in zip(rows.flatten().tolist(), cols.flatten().tolist())]
    return torch.tensor([s if s < n else -1 for s in out], dtype=torch.int64).view(rows.shape)


def vectors() -> dict:
    """{(out, in, key): [(slot, row, col), ...]} from the committed vectors."""
    groups = {}
    for line in VECTORS.read_text().splitlines():
        if line and not line.startswith("#"):
            out_features, in_features, key, slot, row, col = map(int, line.split())
            groups.setdefault((out_features, in_features, key), []).append((slot, row, col))
    return groups


def masked_grad(x: torch.Tensor, grad_y: torch.Tensor, shape, n: int, key: int) -> torch.Tensor:
    """g[k] = sum_t grad_y[t, r_k] x[t, c_k] in float64, from the dense product."""
    rows, cols = positions(shape, n, key)
    return (grad_y.double().t() @ x.double())[rows, cols]


def sparse_update(weight: torch.Tensor, base: torch.Tensor, delta: torch.Tensor, key: int) -> torch.Tensor:
    """A copy of weight with weight[r_k, c_k] = weight dtype(fp32(base[k]) + delta[k]) (one fp32 add, one rounding to
    nearest even)."""
    rows, cols = positions(tuple(weight.shape), base.numel(), key)
    out = weight.clone()
    out[rows, cols] = (base.float() + delta.float()).to(weight.dtype)
    return out


def sparse_add(out: torch.Tensor, src: torch.Tensor, delta: torch.Tensor, shape, key: int,
               transpose: bool = False) -> torch.Tensor:
    """out + src S(delta)^T (or out + src S(delta) transposed) in float64, from the dense (out, in) matrix S with
    delta[k] at (r_k, c_k)."""
    rows, cols = positions(tuple(shape), delta.numel(), key)
    dense = torch.zeros(shape, dtype=torch.float64)
    dense[rows, cols] = delta.double()
    return out.double() + src.double() @ (dense if transpose else dense.t())
