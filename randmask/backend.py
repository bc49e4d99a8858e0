"""Which implementation runs an op: Triton on CUDA tensors, the torch twin on CPU tensors.

RANDMASK_BACKEND=torch|triton forces one (read at each call, so tests can switch it). Forcing triton on CPU
tensors only works under TRITON_INTERPRET=1, which is how the tests run the Triton kernels without a GPU.
"""
import os

import torch

BACKENDS = ("torch", "triton")

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # triton is optional: without it every op uses its torch twin
    HAS_TRITON = False


def forced_backend() -> str | None:
    choice = os.environ.get("RANDMASK_BACKEND", "").strip().lower()
    if choice and choice not in BACKENDS:
        raise ValueError(f"RANDMASK_BACKEND must be one of {BACKENDS}, got {choice!r}")
    return choice or None


def use_triton(device: torch.device) -> bool:
    choice = forced_backend()
    if choice == "torch":
        return False
    if choice == "triton":
        if not HAS_TRITON:
            raise RuntimeError("RANDMASK_BACKEND=triton, but triton is not installed")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("RANDMASK_BACKEND=triton on CPU tensors needs TRITON_INTERPRET=1")
        return True
    return HAS_TRITON and device.type == "cuda"
