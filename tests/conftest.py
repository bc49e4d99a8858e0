"""Test-wide settings. TRITON_INTERPRET must be set before any Triton kernel module is imported, so it is set here,
where no GPU is: the Triton kernels then run on CPU tensors when a test forces the triton backend (ordinary CPU code
paths use the native kernels or the torch twins and are unaffected). On a GPU machine the kernels compile for the
GPU, and the gpu tier (tests/gpu) runs them there."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402, I001


@pytest.fixture
def torch_backend():
    """Run every op of the test on the torch twins."""
    import randmask

    with randmask.use_backend("torch"):
        yield
