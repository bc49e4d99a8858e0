"""randmask: install with `pip install -e .` (or `pip install .`).

The top-level kernels/ folder installs as `randmask.kernels`, so it can never shadow another distribution named
`kernels` (transformers probes for one).

The native CPU library (CMakeLists.txt: kernels/csrc/) is built here by CMake and placed inside the package as
randmask/kernels/_randmask_native.so. It is a plain C library loaded with ctypes (kernels/native.py), so the build
needs cmake and a C++ compiler but no torch headers, and pip's build isolation costs nothing. Without cmake or a
compiler the install still succeeds as pure Python: the build prints why, and the torch twins run instead
(`randmask.ops.available_backends()` says why the native backend is missing).

Environment knobs:
    RANDMASK_NATIVE=0     skip the native build entirely (pure Python install)
    CMAKE_BUILD_PARALLEL_LEVEL, CMAKE_ARGS   passed on to CMake (parallel jobs; extra -D options)
"""
import os
import pathlib
import shlex
import shutil
import subprocess
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = pathlib.Path(__file__).resolve().parent
SUFFIX = ".dll" if sys.platform == "win32" else ".so"
# Extension name -> the CMake target that produces it.
NATIVE_TARGETS = {"randmask.kernels._randmask_native": "randmask_native"}


def _off(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("0", "off", "false", "no")


class CMakeExtension(Extension):
    """A library CMake builds; optional, so a failed or skipped build leaves a pure-Python install."""

    def __init__(self, name: str):
        super().__init__(name, sources=[], optional=True)


class CMakeBuild(build_ext):
    """Configure and build CMakeLists.txt once (library targets only, tests off), then copy each library to where
    setuptools wants the extension (inside randmask/kernels/, or the source tree's kernels/ for `pip install -e`)."""

    def get_ext_filename(self, fullname):
        # distutils asks with the full dotted name or with its last part only (get_ext_fullpath)
        if fullname in NATIVE_TARGETS or f"randmask.kernels.{fullname}" in NATIVE_TARGETS:
            return os.path.join(*fullname.split(".")) + SUFFIX  # a ctypes library, not a module: no ABI tag
        return super().get_ext_filename(fullname)

    def run(self):
        self._cmake_dir, self._cmake_error = None, None
        super().run()

    def _configure_and_build(self):
        if self._cmake_dir is not None or self._cmake_error is not None:
            return
        if _off("RANDMASK_NATIVE"):
            self._cmake_error = "RANDMASK_NATIVE=0"
            return
        cmake = shutil.which("cmake")
        if cmake is None:
            self._cmake_error = "cmake not found"
            return
        build_dir = pathlib.Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        configure = [cmake, "-S", str(ROOT), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release",
                     "-DRANDMASK_BUILD_TESTS=OFF",
                     *shlex.split(os.environ.get("CMAKE_ARGS", ""))]
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL") or str(os.cpu_count() or 1)
        try:
            subprocess.run(configure, check=True)
            subprocess.run([cmake, "--build", str(build_dir), "--parallel", jobs], check=True)
        except (OSError, subprocess.CalledProcessError) as exc:
            self._cmake_error = f"CMake build failed: {exc}"
            return
        self._cmake_dir = build_dir

    def build_extension(self, ext):
        if ext.name not in NATIVE_TARGETS:
            return super().build_extension(ext)
        self._configure_and_build()
        target = NATIVE_TARGETS[ext.name]
        name = pathlib.Path(self.get_ext_filename(ext.name)).name
        built = None if self._cmake_dir is None else self._cmake_dir / name
        dest = pathlib.Path(self.get_ext_fullpath(ext.name))
        if built is None or not built.is_file():
            why = self._cmake_error or f"CMake did not build {target}"
            print(f"randmask: skipping {ext.name}: {why}", file=sys.stderr)
            dest.unlink(missing_ok=True)  # a library left in build/lib by an earlier build must not ship
            return
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(built, dest)
        print(f"randmask: built {dest}", file=sys.stderr)


setup(
    name="randmask",
    version="0.1.0",
    description="Random-Masking fine-tuning with seed-addressed masks and Triton kernels",
    python_requires=">=3.10",
    packages=["randmask", "randmask.kernels", "randmask.recipes"],
    package_dir={"randmask": "randmask", "randmask.kernels": "kernels"},
    package_data={"randmask.kernels": ["csrc/*.h", "csrc/*.c", "csrc/*.cpp"]},
    ext_modules=[CMakeExtension(name) for name in NATIVE_TARGETS],
    cmdclass={"build_ext": CMakeBuild},
    install_requires=[
        "torch>=2.4",
        "numpy",
        "safetensors",
        "tqdm",
        # Triton has no wheels for some platforms (macOS, Windows); the torch twins run without it.
        "triton>=3.2; platform_system == 'Linux'",
    ],
    # quant: bitsandbytes 4-bit and 8-bit bases (additive mode); 0.50 runs them on the CPU as well as on CUDA.
    # peft: randmask as a PEFT method (randmask.peft: get_peft_model, save_pretrained, TRL's peft_config).
    extras_require={"test": ["pytest"], "quant": ["bitsandbytes>=0.50"], "peft": ["peft>=0.21", "transformers>=4.56"]},
)
