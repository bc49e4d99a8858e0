"""Which implementation runs an op.

    tensors   default                                                   RANDMASK_BACKEND=...
    CPU       native (the C++ kernels, kernels/native.py) when built,    torch | native | triton (TRITON_INTERPRET=1)
              else the torch twins
    CUDA      triton when installed, else the CUDA C++ kernels when      torch | triton | cuda
              built, else the torch twins

RANDMASK_BACKEND=torch|triton|native|cuda forces one (read at each call, so tests can switch it). Forcing triton on
CPU tensors only works under TRITON_INTERPRET=1, which is how the tests run the Triton kernels without a GPU;
forcing native on CUDA tensors or cuda on CPU tensors is an error, as is forcing a native backend that is not built.
The native CPU backend is the default because it is faster than both torch twins wherever it is used (measured by
benchmarks/bench_masked_grad.py; above kernels.native.DENSE_DENSITY_NATIVE the masked gradient goes to the torch
dense twin, which is faster there).

`kernel_backend(device)` names the backend of the masked-gradient / gather / sparse-update kernels;
`use_triton(device)` says whether the ops that exist only as Triton kernels or torch twins (positions, slots, the
fused optimizer step) take the Triton path: the native backends leave those to the torch twin (native) or to Triton
(cuda, when installed).
"""
import os

import torch

from randmask.kernels import native

BACKENDS = ("torch", "triton", "native", "cuda")

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # triton is optional: without it every op uses its native kernel or torch twin
    HAS_TRITON = False


def forced_backend() -> str | None:
    choice = os.environ.get("RANDMASK_BACKEND", "").strip().lower()
    if choice and choice not in BACKENDS:
        raise ValueError(f"RANDMASK_BACKEND must be one of {BACKENDS}, got {choice!r}")
    return choice or None


def _check_triton(device: torch.device) -> None:
    if not HAS_TRITON:
        raise RuntimeError("RANDMASK_BACKEND=triton, but triton is not installed")
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("RANDMASK_BACKEND=triton on CPU tensors needs TRITON_INTERPRET=1")


def use_triton(device: torch.device) -> bool:
    choice = forced_backend()
    if choice == "triton":
        _check_triton(device)
        return True
    if choice in ("torch", "native"):
        return False
    return HAS_TRITON and device.type == "cuda"  # default, and cuda: Triton for the ops it alone has on GPU


def kernel_backend(device: torch.device) -> str:
    """'torch', 'triton', 'native' or 'cuda': who runs the masked gradient, gather and sparse update on `device`."""
    choice = forced_backend()
    if choice == "torch":
        return "torch"
    if choice == "triton":
        _check_triton(device)
        return "triton"
    if choice == "native":
        if device.type != "cpu":
            raise RuntimeError(f"RANDMASK_BACKEND=native runs the C++ kernels on CPU tensors, got {device.type} "
                               "tensors (RANDMASK_BACKEND=cuda is the native GPU backend)")
        if not native.HAS_NATIVE:
            raise RuntimeError(f"RANDMASK_BACKEND=native, but the native CPU kernels are not built "
                               f"({native.NATIVE_REASON})")
        return "native"
    if choice == "cuda":
        if device.type != "cuda":
            raise RuntimeError(f"RANDMASK_BACKEND=cuda runs the CUDA kernels on CUDA tensors, got {device.type} "
                               "tensors (RANDMASK_BACKEND=native is the native CPU backend)")
        native.cuda_library()  # raises with the reason when it is not built
        return "cuda"
    if device.type == "cuda":
        if HAS_TRITON:
            return "triton"
        return "cuda" if native.has_cuda_native() else "torch"
    if device.type == "cpu" and native.HAS_NATIVE:
        return "native"
    return "torch"
