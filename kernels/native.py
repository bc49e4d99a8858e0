"""The native CPU kernels: the loader and launchers of _randmask_native.so (csrc/native_cpu.cpp, C++17 + OpenMP).

    positions_native(shape, n, key)                  (rows, cols) int64 of the n slots
    masked_grad_native(x, grad_y, n, key)            g[k] = sum_t grad_y[t, r_k] x[t, c_k], fp32
    gather_weight_native(weight, n, key)             base[k] = weight[r_k, c_k]
    sparse_update_native(weight, base, delta, key)   weight[r_k, c_k] = round(float(base[k]) + delta[k]), in place
    sparse_add_native(out, src, delta, n, key, shape, transpose)
                                                     out[t, r_k] += delta[k] src[t, c_k] (transposed: out[t, c_k] +=
                                                     delta[k] src[t, r_k]), in place

The library is a plain C library (its ABI: csrc/randmask_native.h, tensors passed as small structs) loaded with
ctypes, so building it needs a C++ compiler and cmake, never torch's headers (setup.py drives CMake and puts it beside
this file). It is loaded on first use, quietly: `status()` says whether it loaded and why not; randmask.ops then
runs the torch twins instead. $RANDMASK_NATIVE_LIB points the loader at another build (the ctest run, benchmarks).
Positions are computed inline from the key inside the kernels; no index tensor crosses the boundary.
"""
import ctypes
import os
import pathlib
import sys

import torch
from torch.autograd.graph import increment_version

from .mask_addressing import MAX_ENTRIES

ABI_VERSION = 3  # RANDMASK_NATIVE_ABI in csrc/randmask_native.h
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
LIBRARY = "_randmask_native" + (".dll" if sys.platform == "win32" else ".so")
_ERRORS = {-1: "invalid argument (shape, count, stride or pointer)", -2: "unsupported dtype",
           -3: "out of memory for the scratch buffers"}


class Matrix(ctypes.Structure):
    """randmask_matrix_t: a 2-D view, element (r, c) at data[r * stride_r + c * stride_c]."""
    _fields_ = [("data", ctypes.c_void_p), ("dtype", ctypes.c_int32), ("rows", ctypes.c_int64),
                ("cols", ctypes.c_int64), ("stride_r", ctypes.c_int64), ("stride_c", ctypes.c_int64)]


class Vector(ctypes.Structure):
    """randmask_vector_t: `length` contiguous elements."""
    _fields_ = [("data", ctypes.c_void_p), ("dtype", ctypes.c_int32), ("length", ctypes.c_int64)]


class MaskArgs(ctypes.Structure):
    """randmask_mask_args_t: the mask of an (out, in) matrix, n slots, key."""
    _fields_ = [("out", ctypes.c_int64), ("in_", ctypes.c_int64), ("n", ctypes.c_int64), ("key", ctypes.c_uint64)]


_P = ctypes.POINTER
_SIGNATURES = {
    "randmask_cpu_abi_version": ([], ctypes.c_int),
    "randmask_cpu_max_threads": ([], ctypes.c_int),
    "randmask_cpu_isa": ([], ctypes.c_char_p),
    "randmask_cpu_select_isa": ([ctypes.c_char_p], ctypes.c_int),
    "randmask_cpu_positions": ([_P(MaskArgs), ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int], ctypes.c_int),
    "randmask_cpu_masked_grad": ([_P(Matrix), _P(Matrix), _P(MaskArgs), ctypes.c_void_p, ctypes.c_int], ctypes.c_int),
    "randmask_cpu_gather_weight": ([_P(Matrix), _P(MaskArgs), _P(Vector), ctypes.c_int], ctypes.c_int),
    "randmask_cpu_sparse_update": ([_P(Matrix), _P(Vector), _P(Vector), _P(MaskArgs), ctypes.c_int], ctypes.c_int),
    "randmask_cpu_sparse_add": ([_P(Matrix), _P(Matrix), _P(Vector), _P(MaskArgs), ctypes.c_int, ctypes.c_int],
                                ctypes.c_int),
}


def library_path() -> pathlib.Path:
    """Where the loader looks: $RANDMASK_NATIVE_LIB, else beside this file."""
    env = os.environ.get("RANDMASK_NATIVE_LIB")
    return pathlib.Path(env) if env else pathlib.Path(__file__).resolve().parent / LIBRARY


def load_library(path) -> ctypes.CDLL:
    """Open one build of the library, declare its functions' C types and check its ABI version; raises OSError with
    the reason."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise OSError(f"{path} does not exist (build it with `pip install .` or `pip install -e .`, which need cmake "
                      f"and a C++ compiler)")
    lib = ctypes.CDLL(str(path))  # ctypes calls release the GIL
    try:
        for name, (argtypes, restype) in _SIGNATURES.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = argtypes, restype
    except AttributeError as exc:
        raise OSError(f"{path} is not a randmask native library of this version ({exc})") from None
    version = lib.randmask_cpu_abi_version()
    if version != ABI_VERSION:
        raise OSError(f"{path} has ABI version {version}, this randmask needs {ABI_VERSION}: a stale build, rebuild "
                      f"it with `pip install -e .`")
    return lib


_loaded: tuple = ()  # (library or None, why not): filled on first use


def status() -> tuple[ctypes.CDLL | None, str]:
    """(the loaded library or None, the reason it is not there): loads it on the first call, quietly."""
    global _loaded
    if not _loaded:
        try:
            _loaded = (load_library(library_path()), "")
        except OSError as exc:
            _loaded = (None, str(exc))
    return _loaded


def library() -> ctypes.CDLL:
    """The loaded library; RuntimeError with the reason when it is not built."""
    lib, reason = status()
    if lib is None:
        raise RuntimeError(f"randmask: the native CPU kernels are not built ({reason})")
    return lib


def cpu_info() -> dict:
    """What the loaded library runs with: its path, the ISA of its vector loops, its default thread count."""
    lib = library()
    return {"path": lib._name, "isa": lib.randmask_cpu_isa().decode(), "threads": lib.randmask_cpu_max_threads()}


# ---------------------------------------------------------------- argument checks
def _code(t: torch.Tensor) -> int:
    try:
        return DTYPE_CODES[t.dtype]
    except KeyError:
        raise TypeError(f"the native kernels take float32, float16 or bfloat16 tensors, got {t.dtype}") from None


def _matrix(t: torch.Tensor) -> Matrix:
    return Matrix(t.data_ptr(), _code(t), *t.shape, *t.stride())


def _vector(t: torch.Tensor) -> Vector:
    return Vector(t.data_ptr(), _code(t), t.numel())


def _mask(out_features: int, in_features: int, n: int, key: int) -> MaskArgs:
    if out_features * in_features > MAX_ENTRIES:
        raise ValueError(f"a masked matrix needs at most {MAX_ENTRIES} entries, got {out_features}x{in_features}")
    if not 0 <= n <= out_features * in_features:
        raise ValueError(f"n must be in [0, {out_features * in_features}] for a {out_features}x{in_features} matrix, "
                         f"got {n}")
    if not 0 <= key < 2**64:
        raise ValueError(f"a layer key is an unsigned 64-bit integer, got {key}")
    return MaskArgs(out_features, in_features, n, key)


def _check(status_code: int, what: str) -> None:
    if status_code != 0:
        raise RuntimeError(f"randmask native {what} failed: {_ERRORS.get(status_code, f'status {status_code}')}")


def _cpu(*tensors) -> None:
    if any(t.device.type != "cpu" for t in tensors):
        raise ValueError(f"the native kernels take CPU tensors, got {', '.join(str(t.device) for t in tensors)}")


def _threads() -> int:
    return torch.get_num_threads()  # the caller's intra-op setting: 1 inside a DataLoader worker, etc.


# ---------------------------------------------------------------- launchers
def positions_native(shape, n: int, key: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) int64 of the n slots, computed by the C header."""
    mask = _mask(*shape, n, key)
    rows, cols = torch.empty(n, dtype=torch.int64), torch.empty(n, dtype=torch.int64)
    _check(library().randmask_cpu_positions(mask, rows.data_ptr(), cols.data_ptr(), _threads()), "positions")
    return rows, cols


def masked_grad_native(x: torch.Tensor, grad_y: torch.Tensor, n: int, key: int, lib=None) -> torch.Tensor:
    """g[k] = sum_t grad_y[t, r_k] x[t, c_k] (fp32, length n) for CPU x (T, in), grad_y (T, out), any strides.
    lib: another build of the library (load_library), for benchmarks comparing two builds in one process."""
    if x.dim() != 2 or grad_y.dim() != 2 or x.shape[0] != grad_y.shape[0]:
        raise ValueError(f"x (T, in) and grad_y (T, out) must share T, got {tuple(x.shape)}, {tuple(grad_y.shape)}")
    _cpu(x, grad_y)
    mask = _mask(grad_y.shape[1], x.shape[1], n, key)
    g = torch.empty(n, dtype=torch.float32)
    _check((lib or library()).randmask_cpu_masked_grad(_matrix(x), _matrix(grad_y), mask, g.data_ptr(), _threads()),
           "masked_grad")
    return g


def gather_weight_native(weight: torch.Tensor, n: int, key: int) -> torch.Tensor:
    """base[k] = weight[r_k, c_k] for k in [0, n): the n masked entries of a CPU weight, in its dtype."""
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D, got shape {tuple(weight.shape)}")
    _cpu(weight)
    mask = _mask(*weight.shape, n, key)
    base = torch.empty(n, dtype=weight.dtype)
    _check(library().randmask_cpu_gather_weight(_matrix(weight), mask, _vector(base), _threads()), "gather_weight")
    return base


def sparse_update_native(weight: torch.Tensor, base: torch.Tensor, delta: torch.Tensor, key: int) -> torch.Tensor:
    """weight[r_k, c_k] = (float(base[k]) + delta[k]).to(weight.dtype) in place on CPU, k in [0, len(base))."""
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D, got shape {tuple(weight.shape)}")
    if base.shape != delta.shape or base.dim() != 1:
        raise ValueError(f"base and delta must be 1-D of one length, got {tuple(base.shape)}, {tuple(delta.shape)}")
    _cpu(weight, base, delta)
    mask = _mask(*weight.shape, base.numel(), key)
    base, delta = base.contiguous(), delta.to(torch.float32).contiguous()
    _check(library().randmask_cpu_sparse_update(_matrix(weight), _vector(base), _vector(delta), mask, _threads()),
           "sparse_update")
    if not weight.is_inference():  # written through a pointer: bump the version as an in-place torch op would
        increment_version(weight)
    return weight


def sparse_add_native(out: torch.Tensor, src: torch.Tensor, delta: torch.Tensor, n: int, key: int, shape,
                      transpose: bool) -> None:
    """out[t, r_k] += delta[k] src[t, c_k] in place on CPU (transpose: out[t, c_k] += delta[k] src[t, r_k]), k < n, for
    the mask of shape = (out_features, in_features): out (T, out_features) and src (T, in_features), or the other way
    round when transposed; any strides. fp32 sums in slot order, one rounding per touched element, deterministic."""
    if out.dim() != 2 or src.dim() != 2 or out.shape[0] != src.shape[0]:
        raise ValueError(f"out and src must be 2-D (T, *) with one T, got {tuple(out.shape)}, {tuple(src.shape)}")
    out_features, in_features = shape
    widths = (in_features, out_features) if transpose else (out_features, in_features)
    if (out.shape[1], src.shape[1]) != widths:
        raise ValueError(f"a{' transposed' if transpose else ''} sparse add with a {out_features}x{in_features} mask "
                         f"takes out (T, {widths[0]}) and src (T, {widths[1]}), got {tuple(out.shape)}, "
                         f"{tuple(src.shape)}")
    if delta.dtype != torch.float32 or delta.dim() != 1 or delta.numel() != n or not delta.is_contiguous():
        raise ValueError(f"delta must be {n} contiguous float32 values, got {delta.dtype} {tuple(delta.shape)}")
    _cpu(out, src, delta)
    mask = _mask(out_features, in_features, n, key)
    _check(library().randmask_cpu_sparse_add(_matrix(out), _matrix(src), _vector(delta), mask, int(bool(transpose)),
                                             _threads()), "sparse_add")
    if not out.is_inference():  # written through a pointer: bump the version as an in-place torch op would
        increment_version(out)
