"""The native side (CMakeLists.txt): configure, build and ctest in a temporary build tree.

ctest runs kernels/csrc/test_mask_vectors (built as C99 and as C++) against tests/vectors/mask_scheme1.txt, so the
header kernels/csrc/randmask_mask.h is held to the same vectors as the torch twin. When CMake finds a CUDA compiler,
the build also compiles kernels/csrc/mask_positions.cu for sm_80/sm_90 (compile-only); test_cuda_sources_compiled
reports that separately (skipped without nvcc). Skipped only when cmake or a C compiler is missing.
"""
import os
import pathlib
import shutil
import subprocess

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
CUDA_OBJECT = "mask_positions.cu.o"


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
    log = _run(["cmake", "-S", REPO, "-B", build_dir])
    _run(["cmake", "--build", build_dir, "-j2"])
    return build_dir, log


def test_ctest_mask_vectors(build):
    build_dir, _ = build
    out = _run(["ctest", "--output-on-failure"], cwd=build_dir)
    assert "100% tests passed" in out, out
    assert "mask_vectors_cxx" in out, out  # the C++ build of the header ran too


def test_cuda_sources_compiled(build):
    build_dir, log = build
    if "compiling mask_positions.cu" not in log:
        reason = next((line for line in log.splitlines() if "randmask:" in line), "no CUDA status line")
        pytest.skip(f"CUDA sources not compiled: {reason.strip()}")
    objects = list(pathlib.Path(build_dir).rglob(CUDA_OBJECT))
    assert objects and objects[0].stat().st_size > 0, f"{CUDA_OBJECT} missing from {build_dir}"
