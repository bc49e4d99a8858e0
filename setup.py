"""randmask: install with `pip install -e .` (or `pip install .`).

The top-level kernels/ folder installs as `randmask.kernels`, so it can never shadow another distribution named
`kernels` (transformers probes for one).
"""
from setuptools import setup

setup(
    name="randmask",
    version="0.1.0",
    description="Random-Masking fine-tuning with seed-addressed masks and Triton kernels",
    python_requires=">=3.10",
    packages=["randmask", "randmask.kernels"],
    package_dir={"randmask": "randmask", "randmask.kernels": "kernels"},
    package_data={"randmask.kernels": ["csrc/*.h", "csrc/*.c", "csrc/*.cpp", "csrc/*.cu"]},
    install_requires=[
        "torch>=2.4",
        "numpy",
        "safetensors",
        "tqdm",
        # Triton has no wheels for some platforms (macOS, Windows); the torch twins run without it.
        "triton>=3.2; platform_system == 'Linux'",
    ],
    extras_require={"test": ["pytest"]},
)
