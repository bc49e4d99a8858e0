"""Test-wide settings. TRITON_INTERPRET must be set before any Triton kernel module is imported, so it is set here:
the Triton kernels then run on CPU tensors when a test forces RANDMASK_BACKEND=triton (ordinary CPU code paths
use the torch twins and are unaffected)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
