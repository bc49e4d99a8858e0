"""The native kernels: loader and launchers for the C/C++/CUDA libraries that CMakeLists.txt builds from csrc/.

    _randmask_native.so   csrc/native_cpu.cpp (C++17, OpenMP): masked gradient, gather, sparse update on CPU
    _randmask_cuda.so     csrc/native_cuda.cu: the same ops plus the fused AdamW + weight update on CUDA tensors

Both are plain C libraries (the ABI is csrc/randmask_native.h) loaded with ctypes: building them needs a C++
compiler and cmake (and nvcc for the CUDA one), never torch's headers, so `pip install` builds them with the system
toolchain in seconds (setup.py drives CMake and puts them beside this file). Positions are computed inline from the
key inside the kernels; the launchers pass (pointer, dtype, strides) of each tensor and nothing else.

The launchers have the Triton launchers' signatures: masked_grad_native(x, grad_y, n, key),
gather_weight_native(weight, n, key), sparse_update_native(weight, base, delta, key), and *_cuda for CUDA tensors.
HAS_NATIVE says whether the CPU library loaded; when it did not, importing this module warns once
("randmask: native CPU kernels not built (reason); using the torch twins") and the torch twins do the work.
The CUDA library is loaded on first use (has_cuda_native() / cuda_library()), so CPU-only users never hear of it.
masked_adamw_cuda is the CUDA backend's fused AdamW + weight write, with kernels/masked_adamw.py's interface.

RANDMASK_NATIVE_LIB / RANDMASK_CUDA_LIB point the loader at another build of either library (tests, benchmarks).
"""
import ctypes
import os
import pathlib
import sys
import warnings

import torch
from torch.autograd.graph import increment_version

from .mask_addressing import MAX_ENTRIES

ABI_VERSION = 1  # RANDMASK_NATIVE_ABI in csrc/randmask_native.h
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_ERRORS = {-1: "invalid argument (shape, count, stride or pointer)", -2: "unsupported dtype",
           -3: "out of memory for the scratch buffers", -4: "CUDA launch failed"}
_HERE = pathlib.Path(__file__).resolve().parent
_SUFFIX = ".dll" if sys.platform == "win32" else ".so"
CPU_LIBRARY = "_randmask_native" + _SUFFIX
CUDA_LIBRARY = "_randmask_cuda" + _SUFFIX

# Above this density the CPU backend hands the masked gradient to the torch dense twin (BLAS) instead of the native
# gather. Measured with benchmarks/bench_masked_grad.py at the SmolLM2-135M shapes, 512 tokens (2-core AMD EPYC,
# AVX-512; results/masked_grad_cpu_*): the native gather beats the dense twin at every density up to 0.3 on one
# thread and on two (1.2-1.5x at 0.3, 1.6-1.9x at 0.2, two threads); at 0.5 the two are within 10% either way. Masks
# that dense are rare (the paper trains <= 0.1% of a model); 0.4 sits between the last clear native win and the tie.
DENSE_DENSITY_NATIVE = 0.4
# The same for the CUDA backend against the torch dense twin (cuBLAS, then a gather), measured on an H200
# (benchmarks/results/cuda_backend.json, bf16): the CUDA gather costs ~1.75e-11 s per (slot x token) and the dense
# twin ~out*in*T / 1.9e13 s but never less than ~0.5 ms (launches, fp32 copies). So the dense twin wins above density
# 3e-3 on big layers (4096x4096 at 4096 tokens: cuda 0.86 ms vs 3.6 at 1e-3, 12.0 vs 3.6 at 1e-2) and never on small
# ones (SmolLM2's 576x576 / 1536x576 at 512 tokens: the gather is faster up to density 0.1 in bf16). Since then the
# dense twin gives bf16/fp16 operands to cuBLAS as they are (fp32 result, no upcast copies): on the H200 that matmul
# + a gather took 0.39 ms at 4096x4096 x 8192 tokens where the old twin took 6.4, so this crossover is now
# conservative (too high); not refitted, as the CUDA backend has not been timed since.
DENSE_DENSITY_CUDA = 3e-3
CUDA_DENSE_FLOOR_S, CUDA_GATHER_S = 0.5e-3, 1.75e-11


def cuda_prefers_dense(n: int, numel: int, tokens: int) -> bool:
    """Whether the dense twin beats the CUDA gather for n slots of a numel-entry matrix over `tokens` tokens."""
    return n > DENSE_DENSITY_CUDA * numel and n * tokens * CUDA_GATHER_S > CUDA_DENSE_FLOOR_S


_p = ctypes.c_void_p
_i = ctypes.c_int
_i64 = ctypes.c_int64
_u64 = ctypes.c_uint64
_f = ctypes.c_float  # a Python float passed as c_float is rounded to nearest, like a Triton fp32 argument
_SIGNATURES = {
    "randmask_cpu_abi_version": ([], _i),
    "randmask_cpu_max_threads": ([], _i),
    "randmask_cpu_isa": ([], ctypes.c_char_p),
    "randmask_cpu_select_isa": ([ctypes.c_char_p], _i),
    "randmask_cpu_positions": ([_i64, _i64, _i64, _u64, _p, _p, _i], _i),
    "randmask_cpu_masked_grad": ([_p, _i, _i64, _i64, _p, _i, _i64, _i64, _i64, _i64, _i64, _i64, _u64, _p, _i], _i),
    "randmask_cpu_gather_weight": ([_p, _i, _i64, _i64, _i64, _i64, _i64, _u64, _p, _i], _i),
    "randmask_cpu_sparse_update": ([_p, _i, _i64, _i64, _i64, _i64, _p, _i, _p, _i64, _u64, _i], _i),
    "randmask_cuda_abi_version": ([], _i),
    "randmask_cuda_masked_grad_splits": ([_i64, _i64, _i], _i64),
    "randmask_cuda_masked_grad": ([_p, _i, _i64, _i64, _p, _i, _i64, _i64, _i64, _i64, _i64, _i64, _u64, _p, _p,
                                   _i64, _p], _i),
    "randmask_cuda_gather_weight": ([_p, _i, _i64, _i64, _i64, _i64, _i64, _u64, _p, _p], _i),
    "randmask_cuda_sparse_update": ([_p, _i, _i64, _i64, _i64, _i64, _p, _i, _p, _i64, _u64, _p], _i),
    "randmask_cuda_adamw_update": ([_p, _i, _i64, _i64, _i64, _i64, _p, _i, _p, _p, _p, _p, _i64, _u64, _f, _f, _f,
                                    _f, _f, _f, _f, _p], _i),
}


def library_path(cuda: bool = False) -> pathlib.Path:
    """Where the loader looks: $RANDMASK_NATIVE_LIB / $RANDMASK_CUDA_LIB, else beside this file."""
    env = os.environ.get("RANDMASK_CUDA_LIB" if cuda else "RANDMASK_NATIVE_LIB")
    return pathlib.Path(env) if env else _HERE / (CUDA_LIBRARY if cuda else CPU_LIBRARY)


def load_library(path, cuda: bool = False) -> ctypes.CDLL:
    """Open one library, declare its functions' C types and check its ABI version; raises OSError with the reason."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise OSError(f"{path} does not exist (build it with `pip install .` or `pip install -e .`, which need cmake "
                      f"and a C++ compiler{' and nvcc' if cuda else ''})")
    lib = ctypes.CDLL(str(path))  # ctypes.CDLL calls release the GIL
    prefix = "randmask_cuda_" if cuda else "randmask_cpu_"
    for name, (argtypes, restype) in _SIGNATURES.items():
        if name.startswith(prefix):
            fn = getattr(lib, name)  # AttributeError: a library from other sources
            fn.argtypes, fn.restype = argtypes, restype
    version = getattr(lib, prefix + "abi_version")()
    if version != ABI_VERSION:
        raise OSError(f"{path} has ABI version {version}, this randmask needs {ABI_VERSION}: a stale build, rebuild "
                      f"it with `pip install -e .`")
    return lib


def _load_cpu():
    try:
        return load_library(library_path()), ""
    except (OSError, AttributeError) as exc:
        return None, str(exc)


_CPU, NATIVE_REASON = _load_cpu()
HAS_NATIVE = _CPU is not None
if not HAS_NATIVE:
    warnings.warn(f"randmask: native CPU kernels not built ({NATIVE_REASON}); using the torch twins", stacklevel=2)

_CUDA = None
_CUDA_REASON = None


def cuda_library() -> ctypes.CDLL:
    """The CUDA library, loaded on first use; raises RuntimeError with the reason when it is not built."""
    global _CUDA, _CUDA_REASON
    if _CUDA is None and _CUDA_REASON is None:
        try:
            _CUDA = load_library(library_path(cuda=True), cuda=True)
        except (OSError, AttributeError) as exc:
            _CUDA_REASON = str(exc)
    if _CUDA is None:
        raise RuntimeError(f"randmask: native CUDA kernels not built ({_CUDA_REASON})")
    return _CUDA


def has_cuda_native() -> bool:
    try:
        cuda_library()
        return True
    except RuntimeError:
        return False


def cpu_library() -> ctypes.CDLL:
    if _CPU is None:
        raise RuntimeError(f"randmask: native CPU kernels not built ({NATIVE_REASON})")
    return _CPU


def cpu_info() -> dict:
    """What the loaded CPU library runs with: its path, ISA of the dot loops, default thread count."""
    lib = cpu_library()
    return {"path": lib._name, "isa": lib.randmask_cpu_isa().decode(), "threads": lib.randmask_cpu_max_threads()}


# ---------------------------------------------------------------- argument checks shared by both devices
def supports(*tensors) -> bool:
    """True when every tensor has a dtype the native kernels take (fp32, fp16, bf16)."""
    return all(t.dtype in DTYPE_CODES for t in tensors)


def _code(t: torch.Tensor) -> int:
    try:
        return DTYPE_CODES[t.dtype]
    except KeyError:
        raise TypeError(f"the native kernels take float32, float16 or bfloat16 tensors, got {t.dtype}") from None


def _check_mask(out_features: int, in_features: int, n: int, key: int) -> None:
    if out_features * in_features > MAX_ENTRIES:
        raise ValueError(f"a masked matrix needs at most {MAX_ENTRIES} entries, got {out_features}x{in_features}")
    if not 0 <= n <= out_features * in_features:
        raise ValueError(f"n must be in [0, {out_features * in_features}] for a {out_features}x{in_features} matrix, "
                         f"got {n}")
    if not 0 <= key < 2**64:
        raise ValueError(f"a layer key is an unsigned 64-bit integer, got {key}")


def _check(status: int, what: str) -> None:
    if status != 0:
        raise RuntimeError(f"randmask native {what} failed: {_ERRORS.get(status, f'status {status}')}")


def _check_grad_args(x, grad_y, n, key, device_type):
    if x.dim() != 2 or grad_y.dim() != 2 or x.shape[0] != grad_y.shape[0]:
        raise ValueError(f"x (T, in) and grad_y (T, out) must share T, got {tuple(x.shape)}, {tuple(grad_y.shape)}")
    if x.device.type != device_type or grad_y.device != x.device:
        raise ValueError(f"x and grad_y must both be {device_type} tensors, got {x.device} and {grad_y.device}")
    _check_mask(grad_y.shape[1], x.shape[1], n, key)


def _check_update_args(weight, base, delta, device_type):
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D, got shape {tuple(weight.shape)}")
    if base.shape != delta.shape or base.dim() != 1:
        raise ValueError(f"base and delta must be 1-D of one length, got {tuple(base.shape)}, {tuple(delta.shape)}")
    if weight.device.type != device_type or base.device != weight.device or delta.device != weight.device:
        raise ValueError(f"weight, base and delta must be {device_type} tensors on one device")


def _bump(*tensors) -> None:
    """The kernels write through pointers: bump the version counters as the torch twin's in-place write does, so
    autograd still catches a graph that saved the old weight being backpropagated later."""
    live = tuple(t for t in tensors if not t.is_inference())
    if live:
        increment_version(live)


# ---------------------------------------------------------------- CPU launchers
def _threads() -> int:
    return torch.get_num_threads()  # the caller's intra-op setting: 1 inside a DataLoader worker, etc.


def masked_grad_native(x: torch.Tensor, grad_y: torch.Tensor, n: int, key: int, library=None) -> torch.Tensor:
    """g[k] = sum_t grad_y[t, r_k] x[t, c_k] (fp32, length n) for CPU x (T, in), grad_y (T, out), any strides.
    library: another build of the CPU library (load_library), for benchmarks comparing two builds in one process."""
    _check_grad_args(x, grad_y, n, key, "cpu")
    (tokens, in_features), out_features = x.shape, grad_y.shape[1]
    g = torch.empty(n, dtype=torch.float32)
    _check((library or cpu_library()).randmask_cpu_masked_grad(
        x.data_ptr(), _code(x), *x.stride(), grad_y.data_ptr(), _code(grad_y), *grad_y.stride(), tokens,
        in_features, out_features, n, key, g.data_ptr(), _threads()), "masked_grad")
    return g


def gather_weight_native(weight: torch.Tensor, n: int, key: int) -> torch.Tensor:
    """base[k] = weight[r_k, c_k] for k in [0, n): the n masked entries of a CPU weight, in its dtype."""
    if weight.dim() != 2 or weight.device.type != "cpu":
        raise ValueError(f"weight must be a 2-D CPU tensor, got shape {tuple(weight.shape)} on {weight.device}")
    _check_mask(*weight.shape, n, key)
    base = torch.empty(n, dtype=weight.dtype)
    _check(cpu_library().randmask_cpu_gather_weight(weight.data_ptr(), _code(weight), *weight.stride(),
                                                    *weight.shape, n, key, base.data_ptr(), _threads()),
           "gather_weight")
    return base


def sparse_update_native(weight: torch.Tensor, base: torch.Tensor, delta: torch.Tensor, key: int) -> torch.Tensor:
    """weight[r_k, c_k] = (float(base[k]) + delta[k]).to(weight.dtype) in place on CPU, k in [0, len(base))."""
    _check_update_args(weight, base, delta, "cpu")
    n = base.numel()
    _check_mask(*weight.shape, n, key)
    base = base.contiguous()
    delta = delta.to(torch.float32).contiguous()
    _check(cpu_library().randmask_cpu_sparse_update(weight.data_ptr(), _code(weight), *weight.stride(),
                                                    *weight.shape, base.data_ptr(), _code(base), delta.data_ptr(),
                                                    n, key, _threads()), "sparse_update")
    _bump(weight)
    return weight


def positions_native(shape, n: int, key: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) int64 of the n slots, computed by the C header (the tests hold it to the torch twin)."""
    out_features, in_features = shape
    _check_mask(out_features, in_features, n, key)
    rows, cols = torch.empty(n, dtype=torch.int64), torch.empty(n, dtype=torch.int64)
    _check(cpu_library().randmask_cpu_positions(out_features, in_features, n, key, rows.data_ptr(), cols.data_ptr(),
                                                _threads()), "positions")
    return rows, cols


# ---------------------------------------------------------------- CUDA launchers (the second GPU backend)
def _stream(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream


def masked_grad_cuda(x: torch.Tensor, grad_y: torch.Tensor, n: int, key: int) -> torch.Tensor:
    """masked_grad_native on CUDA tensors: a gather-dot over slots with positions computed inline."""
    _check_grad_args(x, grad_y, n, key, "cuda")
    lib = cuda_library()
    (tokens, in_features), out_features = x.shape, grad_y.shape[1]
    g = torch.empty(n, dtype=torch.float32, device=x.device)
    if n == 0:
        return g
    if tokens == 0:
        return g.zero_()
    if x.dtype != grad_y.dtype:  # the CUDA kernels take one dtype for both: widen both, exactly
        x, grad_y = x.float(), grad_y.float()
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    splits = lib.randmask_cuda_masked_grad_splits(n, tokens, sms)
    partial = torch.empty(splits * n if splits > 1 else 0, dtype=torch.float32, device=x.device)
    with torch.cuda.device(x.device):
        _check(lib.randmask_cuda_masked_grad(
            x.data_ptr(), _code(x), *x.stride(), grad_y.data_ptr(), _code(grad_y), *grad_y.stride(), tokens,
            in_features, out_features, n, key, g.data_ptr(), partial.data_ptr() if splits > 1 else None, splits,
            _stream(x)), "masked_grad (CUDA)")
    return g


def gather_weight_cuda(weight: torch.Tensor, n: int, key: int) -> torch.Tensor:
    """gather_weight_native on CUDA tensors."""
    if weight.dim() != 2 or weight.device.type != "cuda":
        raise ValueError(f"weight must be a 2-D CUDA tensor, got shape {tuple(weight.shape)} on {weight.device}")
    _check_mask(*weight.shape, n, key)
    base = torch.empty(n, dtype=weight.dtype, device=weight.device)
    with torch.cuda.device(weight.device):
        _check(cuda_library().randmask_cuda_gather_weight(weight.data_ptr(), _code(weight), *weight.stride(),
                                                          *weight.shape, n, key, base.data_ptr(), _stream(weight)),
               "gather_weight (CUDA)")
    return base


def _cuda_base(base: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """base in the weight's dtype or fp32, as the CUDA kernels take it (widening to fp32 is exact)."""
    return (base if base.dtype in (weight.dtype, torch.float32) else base.float()).contiguous()


def sparse_update_cuda(weight: torch.Tensor, base: torch.Tensor, delta: torch.Tensor, key: int) -> torch.Tensor:
    """sparse_update_native on CUDA tensors: one thread per slot, positions computed inline."""
    _check_update_args(weight, base, delta, "cuda")
    n = base.numel()
    _check_mask(*weight.shape, n, key)
    base, delta = _cuda_base(base, weight), delta.to(torch.float32).contiguous()
    with torch.cuda.device(weight.device):
        _check(cuda_library().randmask_cuda_sparse_update(weight.data_ptr(), _code(weight), *weight.stride(),
                                                          *weight.shape, base.data_ptr(), _code(base),
                                                          delta.data_ptr(), n, key, _stream(weight)),
               "sparse_update (CUDA)")
    _bump(weight)
    return weight


def masked_adamw_cuda(weight, base, delta, grad, exp_avg, exp_avg_sq, key, *, lr, beta1, beta2, eps, weight_decay,
                      step, positions=None) -> None:
    """One fused AdamW step on delta plus the weight write, in one CUDA launch: the interface and the math of
    kernels/masked_adamw.py (masked_adamw_torch / masked_adamw_triton), with its host scalars (adamw_scalars).
    Updates delta, exp_avg, exp_avg_sq and the n merged entries of weight in place; `positions` is ignored."""
    from .masked_adamw import _check_args, adamw_scalars

    _check_args(weight, base, delta, grad, exp_avg, exp_avg_sq, step)
    if weight.device.type != "cuda":
        raise ValueError(f"masked_adamw_cuda takes CUDA tensors, got {weight.device}")
    for name, t in (("delta", delta), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if not t.is_contiguous():
            raise ValueError(f"{name} is updated in place and must be contiguous")
    n = delta.numel()
    _check_mask(*weight.shape, n, key)
    if n == 0:
        return
    scalars = adamw_scalars(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, step=step)
    base, grad = _cuda_base(base, weight), grad.contiguous()
    with torch.cuda.device(weight.device):
        _check(cuda_library().randmask_cuda_adamw_update(
            weight.data_ptr(), _code(weight), *weight.stride(), *weight.shape, base.data_ptr(), _code(base),
            delta.data_ptr(), grad.data_ptr(), exp_avg.data_ptr(), exp_avg_sq.data_ptr(), n, key,
            *(float(v) for v in scalars), _stream(weight)), "masked_adamw (CUDA)")
    _bump(delta, weight, exp_avg, exp_avg_sq)
