"""The native side (CMakeLists.txt): configure, build and ctest in a temporary build tree.

ctest runs (label "python" excluded: tests/test_native_kernels.py runs in this same pytest session instead)
  mask_vectors, mask_vectors_cxx   kernels/csrc/test_mask_vectors (C99 and C++) against tests/vectors/mask_scheme1.txt
  native_cpu                       kernels/csrc/test_native_cpu.cpp: the CPU library against a naive reference
When CMake finds a CUDA compiler the build also compiles and links the CUDA backend, _randmask_cuda.so
(kernels/csrc/native_cuda.cu + mask_positions.cu, sm_80 and sm_90): test_cuda_backend_compiled checks it was built
and that its C ABI loads (nothing runs on a GPU here; skipped without nvcc). Skipped only when cmake or a C
compiler is missing.
"""
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from randmask.kernels import native

REPO = pathlib.Path(__file__).resolve().parents[1]
CUDA_SOURCES = ("native_cuda.cu", "mask_positions.cu")


def _c_compiler():
    if os.environ.get("CC"):
        return shutil.which(os.environ["CC"].split()[0])
    return next((p for p in map(shutil.which, ("cc", "gcc", "clang")) if p), None)


def _run(cmd, cwd=None):
    proc = subprocess.run(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stdout}"
    return proc.stdout


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    """Configure and build once per module; returns (build dir, configure log)."""
    if shutil.which("cmake") is None:
        pytest.skip("cmake is not installed: the native build cannot be checked")
    if _c_compiler() is None:
        pytest.skip("no C compiler (cc, gcc, clang or $CC) found: the native build cannot be checked")
    build_dir = tmp_path_factory.mktemp("cmake_build")
    log = _run(["cmake", "-S", REPO, "-B", build_dir, f"-DPython3_EXECUTABLE={sys.executable}"])
    _run(["cmake", "--build", build_dir, "-j2"])
    return build_dir, log


def test_ctest_mask_vectors_and_native_cpu(build):
    build_dir, _ = build
    out = _run(["ctest", "--output-on-failure", "-LE", "python"], cwd=build_dir)
    assert "100% tests passed" in out, out
    for name in ("mask_vectors", "mask_vectors_cxx", "native_cpu"):  # the C++ builds of the header ran too
        assert f" {name} " in out, out


def test_cpu_library_built_and_loads(build):
    build_dir, log = build
    lib = native.load_library(pathlib.Path(build_dir) / native.CPU_LIBRARY)
    assert lib.randmask_cpu_abi_version() == native.ABI_VERSION
    assert "randmask: native CPU library with OpenMP" in log  # multi-threaded, as in CI


def test_torch_twin_comparison_registered_with_ctest(build):
    build_dir, _ = build
    out = _run(["ctest", "-N", "-L", "python"], cwd=build_dir)
    assert "native_vs_torch_twins" in out, out


def test_cuda_backend_compiled(build):
    build_dir, log = build
    if "compiling native_cuda.cu" not in log:
        reason = next((line for line in log.splitlines() if "CUDA" in line and "randmask:" in line),
                      "no CUDA status line")
        pytest.skip(f"CUDA sources not compiled: {reason.strip()}")
    assert "archs 80;90" in log, log
    for source in CUDA_SOURCES:
        objects = list(pathlib.Path(build_dir).rglob(source + ".o"))
        assert objects and objects[0].stat().st_size > 0, f"{source}.o missing from {build_dir}"
    # the shared library links (static cudart) and its C ABI resolves; loading needs no GPU and no driver
    lib = native.load_library(pathlib.Path(build_dir) / native.CUDA_LIBRARY, cuda=True)
    assert lib.randmask_cuda_abi_version() == native.ABI_VERSION
    assert lib.randmask_cuda_masked_grad_splits(100_000, 4096, 132) == 1  # enough slots: no token splits
    assert lib.randmask_cuda_masked_grad_splits(1000, 4096, 132) > 1
