"""The native build (CMakeLists.txt, setup.py): configure, build and ctest in a temporary build tree; setup.py puts
the library inside the package, or builds nothing without a toolchain.

ctest runs (label "python" excluded: tests/ops runs in this same pytest session instead)
  mask_vectors, mask_vectors_cxx   kernels/csrc/test_mask_vectors (C99 and C++) against tests/vectors/mask_scheme1.txt
  native_cpu                       kernels/csrc/test_native_cpu.cpp: the CPU library against a naive reference
Skipped only when cmake or a C compiler is missing.
"""
import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from randmask.kernels import native

pytestmark = pytest.mark.full
REPO = pathlib.Path(__file__).resolve().parents[1]


def _c_compiler():
    if os.environ.get("CC"):
        return shutil.which(os.environ["CC"].split()[0])
    return next((p for p in map(shutil.which, ("cc", "gcc", "clang")) if p), None)


def _run(cmd, cwd=None, env=None):
    proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=600)
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
    _run(["ctest", "--output-on-failure", "-LE", "python"], cwd=build_dir)  # a failing test fails the run
    assert {"mask_vectors", "mask_vectors_cxx", "native_cpu"} <= _ctest_names(build_dir, "-LE", "python")


def _ctest_names(build_dir, *selection) -> set:
    listing = json.loads(_run(["ctest", "--show-only=json-v1", *selection], cwd=build_dir))
    return {test["name"] for test in listing["tests"]}


def _openmp_found(build_dir) -> bool:
    """OpenMP_CXX_FOUND (CMakeLists.txt links OpenMP only then). FindOpenMP does not cache it, so it is decided here
    as find_package_handle_standard_args decides it, from the cached variables it requires: the flags and the
    library of every OpenMP_CXX_LIB_NAMES entry."""
    cache = {}
    for line in (pathlib.Path(build_dir) / "CMakeCache.txt").read_text().splitlines():
        if "=" in line and not line.startswith(("//", "#")):
            key, value = line.split("=", 1)
            cache[key.split(":")[0]] = value

    def found(name):
        value = cache.get(name, "")
        return value != "" and value != "NOTFOUND" and not value.endswith("-NOTFOUND")

    names = cache.get("OpenMP_CXX_LIB_NAMES", "NOTFOUND")
    return found("OpenMP_CXX_FLAGS") and names != "NOTFOUND" and all(
        found(f"OpenMP_{lib}_LIBRARY") for lib in names.split(";") if lib)


def test_cpu_library_built_and_loads(build):
    build_dir, log = build
    lib = native.load_library(pathlib.Path(build_dir) / native.LIBRARY)
    assert lib.randmask_cpu_abi_version() == native.ABI_VERSION
    # built with OpenMP: asked for 3 threads it has 3 (a build without OpenMP always has 1); in a fresh process
    # without torch, which sets OpenMP's count itself
    code = "import ctypes, sys; print(ctypes.CDLL(sys.argv[1]).randmask_cpu_max_threads())"
    env = {**os.environ, "OMP_NUM_THREADS": "3"}
    threads = int(_run([sys.executable, "-c", code, pathlib.Path(build_dir) / native.LIBRARY], env=env))
    assert threads == (3 if _openmp_found(build_dir) else 1)


def test_op_tests_registered_with_ctest(build):
    build_dir, _ = build
    assert "native_ops" in _ctest_names(build_dir, "-L", "python")


def test_a_stale_or_foreign_library_is_refused_with_the_reason(tmp_path):
    with pytest.raises(OSError, match="does not exist"):
        native.load_library(tmp_path / "missing.so")
    import torch

    foreign = next((pathlib.Path(torch.__file__).parent / "lib").glob("libc10.*"), None)  # a C library, not ours
    if foreign is None:
        pytest.skip("no libc10 in this torch to stand in for a foreign library")
    with pytest.raises(OSError, match="not a randmask native library"):
        native.load_library(foreign)


def test_setup_py_builds_the_library_into_the_package(tmp_path):
    if shutil.which("cmake") is None:
        pytest.skip("cmake is missing")
    env = dict(os.environ)
    _run([sys.executable, "setup.py", "-q", "build_ext", "--build-lib", tmp_path / "lib", "--build-temp",
          tmp_path / "tmp"], cwd=REPO, env=env)
    built = tmp_path / "lib" / "randmask" / "kernels" / native.LIBRARY
    assert built.is_file(), sorted(map(str, (tmp_path / "lib").rglob("*")))
    assert native.load_library(built).randmask_cpu_abi_version() == native.ABI_VERSION
    # without the native build (RANDMASK_NATIVE=0) the same command succeeds and builds nothing
    env["RANDMASK_NATIVE"] = "0"
    _run([sys.executable, "setup.py", "-q", "build_ext", "--build-lib", tmp_path / "pure", "--build-temp",
          tmp_path / "tmp2"], cwd=REPO, env=env)
    assert not (tmp_path / "pure" / "randmask" / "kernels" / native.LIBRARY).exists()
