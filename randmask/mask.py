"""Seed -> layer key -> mask -> positions: the first step of the data path (kernels/mask_addressing.py has the math,
randmask/ops.py is the next step).

The mask of a layer depends only on (seed, name relative to the model root, shape, n): not on module order, device,
thread count or library version. `MASK_SCHEME` is saved in every adapter; a different function is a new version.
"""
import hashlib
import numbers
import weakref

import torch

from randmask import ops
from randmask.kernels.mask_addressing import MASK_SCHEME, MAX_ENTRIES

__all__ = ["MASK_SCHEME", "MatrixMask", "layer_key", "count_for_density", "mask_positions", "mask_slots"]


def layer_key(seed: int, name: str) -> int:
    """A stable 64-bit key for one layer: blake2b of the seed and the layer's name, little-endian."""
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    digest = hashlib.blake2b(f"randmask/{MASK_SCHEME}/{seed}/{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def _check_shape(shape) -> tuple[int, int]:
    if len(shape) != 2 or any(not isinstance(d, int) or d < 0 for d in shape):
        raise ValueError(f"shape must be (out_features, in_features) with non-negative ints, got {tuple(shape)}")
    if shape[0] * shape[1] > MAX_ENTRIES:
        raise ValueError(f"a masked matrix may have at most {MAX_ENTRIES} entries, {tuple(shape)} has more")
    return shape[0], shape[1]


def _check_key(key) -> int:
    if not isinstance(key, numbers.Integral) or isinstance(key, bool):
        raise TypeError(f"key must be an unsigned 64-bit int (randmask.layer_key(seed, name)), got {key!r}")
    if not 0 <= key < 2**64:
        raise ValueError(f"key must be an unsigned 64-bit int, got {key!r}")
    return int(key)


def _check_count(n, numel: int) -> int:
    if not isinstance(n, numbers.Integral) or isinstance(n, bool):  # numpy integers are Integral too
        raise TypeError(f"n must be an int, got {type(n).__name__}")
    n = int(n)
    if not 0 <= n <= numel:
        raise ValueError(f"n must be in [0, {numel}] for a matrix of {numel} entries, got {n}")
    return n


def count_for_density(shape, density: float) -> int:
    """n = round(density * out * in): the exact number of trainable values at this density."""
    out_features, in_features = _check_shape(shape)
    if isinstance(density, bool) or not isinstance(density, numbers.Real) or not 0.0 <= density <= 1.0:
        raise ValueError(f"density must be a number in [0, 1], got {density!r}")
    return round(float(density) * out_features * in_features)


def mask_positions(shape, n: int, key: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols): int64 tensors of length n, slot k at (rows[k], cols[k]). O(n) time and memory."""
    out_features, in_features = _check_shape(shape)
    n = _check_count(n, out_features * in_features)
    key = _check_key(key)
    device = torch.device("cpu" if device is None else device)
    if n == 0:
        empty = torch.empty(0, dtype=torch.int64, device=device)
        return empty, empty.clone()
    return ops.positions((out_features, in_features), n, key, device)


def mask_slots(rows: torch.Tensor, cols: torch.Tensor, shape, n: int, key: int) -> torch.Tensor:
    """Slot of each (rows[i], cols[i]) as int64, -1 where the position is not trainable."""
    out_features, in_features = _check_shape(shape)
    n = _check_count(n, out_features * in_features)
    key = _check_key(key)
    rows, cols = torch.as_tensor(rows), torch.as_tensor(cols)
    if rows.shape != cols.shape or rows.device != cols.device:
        raise ValueError("rows and cols must have the same shape and device")
    if rows.dtype.is_floating_point or cols.dtype.is_floating_point:
        raise TypeError("rows and cols must be integer tensors")
    rows, cols = rows.to(torch.int64), cols.to(torch.int64)
    if rows.numel() and (rows.min() < 0 or rows.max() >= out_features or cols.min() < 0 or cols.max() >= in_features):
        raise ValueError(f"positions outside a {out_features}x{in_features} matrix")
    if n == 0:
        return torch.full_like(rows, -1)
    return ops.slots(rows, cols, (out_features, in_features), n, key)


class MatrixMask:
    """The mask of one (out, in) matrix: n trainable values keyed by `key`. Holds no index tensor until the torch
    twins ask for positions, which it then keeps (on the one device last asked for) so a training step on the
    twins does not recompute them; the Triton and native kernels compute positions inline and never ask.

    Every live mask is findable by (shape, n, key) through `MatrixMask.live`, which is how the `randmask::` custom
    ops (whose arguments must be tensors and ints) reach a layer's cached positions."""

    _live = weakref.WeakValueDictionary()

    def __init__(self, shape, n: int, key: int):
        self.shape = _check_shape(shape)
        self.n = _check_count(n, self.shape[0] * self.shape[1])
        self.key = _check_key(key)
        self._positions = None
        MatrixMask._live[(self.shape, self.n, self.key)] = self

    @classmethod
    def live(cls, shape, n: int, key: int) -> "MatrixMask":
        """The live mask with these parameters (a layer's, with its cached positions), or a new one."""
        mask = cls._live.get((tuple(shape), n, key))
        return mask if mask is not None else cls(shape, n, key)

    @property
    def density(self) -> float:
        return self.n / max(1, self.shape[0] * self.shape[1])

    def positions(self, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        device = torch.device("cpu" if device is None else device)
        if self._positions is None or self._positions[0].device != device:
            self._positions = mask_positions(self.shape, self.n, self.key, device)
        return self._positions

    def __repr__(self):
        return f"MatrixMask(shape={self.shape}, n={self.n}, key={self.key:#018x})"
