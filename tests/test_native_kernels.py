"""The native CPU kernels (kernels/csrc/native_cpu.cpp through kernels/native.py) against the torch twins.

The library under test is built from the current sources (CMake, the CPU target only, a few seconds) unless
$RANDMASK_NATIVE_LIB names one (ctest's native_vs_torch_twins passes the library it just built), so a stale
`pip install -e .` build is never what is tested. Every ISA version of the loops this CPU can run is tested
(AVX-512, AVX2, portable). Positions must be bit-identical to the torch twin, the masked gradient equal to fp32
accuracy (rtol 1e-5), gather and sparse update bit-exact (including fp16/bf16 rounding: ties, overflow, subnormals).
tests/test_native.py builds everything (and the CUDA sources) and runs the C++ tests through ctest.
"""
import functools
import math
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch

import randmask.functional as functional
from randmask import MaskedLinear, mask_positions
from randmask.addressing import MatrixMask
from randmask.backend import kernel_backend
from randmask.kernels import masked_grad as mg
from randmask.kernels import native
from randmask.kernels import sparse_update as su

REPO = pathlib.Path(__file__).resolve().parents[1]
KEY = 0x0123456789ABCDEF
HALF = (torch.float16, torch.bfloat16)


def _run(cmd, **kwargs):
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600, **kwargs)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stdout}"
    return proc.stdout


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    path = os.environ.get("RANDMASK_NATIVE_LIB")
    if not path:
        if shutil.which("cmake") is None or not any(map(shutil.which, ("c++", "g++", "clang++"))):
            pytest.skip("cmake or a C++ compiler is missing: the native CPU kernels cannot be built here")
        build = tmp_path_factory.mktemp("native_cpu")
        _run(["cmake", "-S", REPO, "-B", build, "-DRANDMASK_CUDA=OFF", "-DRANDMASK_BUILD_TESTS=OFF"])
        _run(["cmake", "--build", build, "--target", "randmask_native", "-j2"])
        path = build / native.CPU_LIBRARY
    return native.load_library(path)


@pytest.fixture
def use_lib(lib, monkeypatch):
    """Route kernels/native.py (and so the CPU backend) to the library under test."""
    monkeypatch.setattr(native, "_CPU", lib)
    monkeypatch.setattr(native, "HAS_NATIVE", True)
    monkeypatch.setattr(native, "NATIVE_REASON", "")
    monkeypatch.delenv("RANDMASK_BACKEND", raising=False)
    return lib


def _isas():
    return ["avx512f", "avx2", "portable"]


@pytest.fixture(params=_isas())
def isa(use_lib, request):
    if use_lib.randmask_cpu_select_isa(request.param.encode()) != 0:
        pytest.skip(f"this CPU cannot run the {request.param} loops")
    yield request.param
    assert use_lib.randmask_cpu_select_isa(b"best") == 0


@functools.lru_cache(maxsize=None)
def _twin_positions(shape, n):
    """The torch twin's positions (cached: the twin is the slow part of these tests)."""
    before = os.environ.get("RANDMASK_BACKEND")
    os.environ["RANDMASK_BACKEND"] = "torch"
    try:
        return mask_positions(shape, n, KEY)
    finally:
        if before is None:
            del os.environ["RANDMASK_BACKEND"]
        else:
            os.environ["RANDMASK_BACKEND"] = before


# ---------------------------------------------------------------- positions
@pytest.mark.parametrize("shape", [(1, 97), (97, 1), (53, 47), (193, 61), (1, 1), (7, 1000), (1, 4099)])
def test_positions_bit_identical_to_the_twin(isa, shape):
    numel = shape[0] * shape[1]
    for n in sorted({0, 1, numel // 3, numel}):
        rows, cols = native.positions_native(shape, n, KEY)
        want_rows, want_cols = _twin_positions(shape, n)
        assert torch.equal(rows, want_rows) and torch.equal(cols, want_cols), (shape, n)


# ---------------------------------------------------------------- masked gradient
CASES = [  # (out, in, n, tokens)
    (1, 97, 30, 5),        # 1xN
    (89, 1, 89, 33),       # Nx1, n = N
    (53, 47, 0, 17),       # n = 0
    (53, 47, 53 * 47, 17),  # n = N, primes
    (64, 48, 300, 0),      # T = 0
    (101, 67, 1500, 300),  # several token chunks, tail chunk
    (576, 192, 4000, 130),  # slots grouped by row
    (300, 200, 10, 50),    # a handful of slots: the path without transposes
    (7, 1000, 20, 40),
    (30, 1500, 4000, 37),  # wider than one transpose tile (1024 features)
]


def _inputs(out, in_features, tokens, dtype, layout):
    gen = torch.Generator().manual_seed(out * 1000 + in_features + tokens)
    x = torch.randn(tokens, in_features, generator=gen).to(dtype)
    grad_y = torch.randn(tokens, out, generator=gen).to(dtype)
    if layout == "transposed":  # x column-major, grad_y with a column stride of 2
        x = x.t().contiguous().t()
        wide = torch.randn(tokens, 2 * out, generator=gen).to(dtype)
        wide[:, ::2] = grad_y
        grad_y = wide[:, ::2]
    return x, grad_y


def _check_grad(g, x, grad_y, rows, cols):
    want = mg.masked_grad_gather_torch(x, grad_y, rows, cols)
    assert g.dtype == torch.float32 and g.shape == want.shape
    if want.numel():
        torch.testing.assert_close(g, want, rtol=1e-5, atol=1e-5 * want.abs().max().item() + 1e-30)


@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=[f"{o}x{i}-n{n}-T{t}" for o, i, n, t in CASES])
def test_masked_grad_matches_the_twins(isa, case, dtype, layout):
    out, in_features, n, tokens = case
    x, grad_y = _inputs(out, in_features, tokens, dtype, layout)
    if layout == "transposed" and tokens > 1 and in_features > 1:
        assert x.stride() == (1, tokens) and grad_y.stride() == (2 * out, 2)
    g = native.masked_grad_native(x, grad_y, n, KEY)
    _check_grad(g, x, grad_y, *_twin_positions((out, in_features), n))


def test_masked_grad_mixed_dtypes_and_dense_twin(use_lib):
    x, _ = _inputs(40, 70, 90, torch.bfloat16, "contiguous")
    _, grad_y = _inputs(40, 70, 90, torch.float32, "contiguous")
    rows, cols = _twin_positions((40, 70), 900)
    g = native.masked_grad_native(x, grad_y, 900, KEY)
    _check_grad(g, x, grad_y, rows, cols)
    torch.testing.assert_close(g, mg.masked_grad_dense_torch(x, grad_y, rows, cols), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("out,in_features", [(576, 192), (40, 1500)])  # (40, 1500): two transpose tiles wide
def test_masked_grad_is_the_same_for_any_thread_count(use_lib, out, in_features):
    x, grad_y = _inputs(out, in_features, 300, torch.float32, "contiguous")
    threads = torch.get_num_threads()
    try:
        results = []
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            results.append(native.masked_grad_native(x, grad_y, 20000, KEY))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(results[0], r) for r in results[1:])


# ---------------------------------------------------------------- gather and sparse update (bit-exact)
@pytest.mark.parametrize("transposed", [False, True], ids=["rowmajor", "transposed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("shape,n", [((1, 97), 50), ((89, 1), 89), ((53, 47), 0), ((53, 47), 2491),
                                     ((300, 200), 25000)])
def test_gather_and_update_exact(isa, shape, n, dtype, transposed):
    gen = torch.Generator().manual_seed(n)
    weight = torch.randn(shape[::-1] if transposed else shape, generator=gen).to(dtype)
    weight = weight.t() if transposed else weight
    rows, cols = _twin_positions(shape, n)
    base = native.gather_weight_native(weight, n, KEY)
    bits = torch.int16 if dtype in HALF else torch.int32
    assert base.dtype == dtype
    assert torch.equal(base.view(bits), su.gather_weight_torch(weight, rows, cols).view(bits))
    delta = torch.randn(n, generator=gen) * 1e-2
    ours, twin = weight.clone(), weight.clone()
    native.sparse_update_native(ours, base, delta, KEY)
    su.sparse_update_torch(twin, base, delta, rows, cols)
    torch.testing.assert_close(ours, twin, rtol=0, atol=0)  # and nothing else moved
    if n:
        assert not torch.equal(ours, weight)


@pytest.mark.parametrize("dtype", HALF, ids=["fp16", "bf16"])
def test_widening_every_half_value(use_lib, dtype):
    # all 65536 bit patterns: float(base) + 0 into an fp32 weight must equal torch's conversion, bit for bit
    values = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype)
    rows, cols = _twin_positions((1, values.numel()), values.numel())
    ours, twin = torch.zeros(1, values.numel()), torch.zeros(1, values.numel())
    delta = torch.zeros(values.numel())
    native.sparse_update_native(ours, values, delta, KEY)
    su.sparse_update_torch(twin, values, delta, rows, cols)
    torch.testing.assert_close(ours, twin, rtol=0, atol=0, equal_nan=True)
    # and through the masked gradient (x = the finite patterns, grad_y = 1): g[k] = x[0, c_k] exactly
    x = torch.where(torch.isfinite(values.float()), values, torch.zeros((), dtype=dtype)).reshape(1, -1)
    g = native.masked_grad_native(x, torch.ones(1, 1, dtype=dtype), x.shape[1], KEY)
    assert torch.equal(g, x.float()[0, cols])


@pytest.mark.parametrize("dtype", HALF, ids=["fp16", "bf16"])
def test_narrowing_rounds_like_torch(use_lib, dtype):
    # fp32 values all over the exponent range, plus ties, overflow and subnormal edges: weight = round(0 + delta)
    gen = torch.Generator().manual_seed(7)
    bits = torch.randint(-(2**31), 2**31 - 1, (1 << 18,), generator=gen, dtype=torch.int64).to(torch.int32)
    edges = torch.tensor([65504.0, 65519.99, 65520.0, 1e9, -1e9, 2.0**-24, 2.0**-25, 3 * 2.0**-26, 3 * 2.0**-25,
                          1 + 2.0**-11, 1 + 3 * 2.0**-11, 1 + 2.0**-8, 1 + 3 * 2.0**-8, 3.3895e38, float("inf"),
                          -float("inf"), 0.0, -0.0, 2.0**-126, 2.0**-149])
    delta = torch.cat([bits.view(torch.float32), edges])
    delta = torch.where(torch.isnan(delta), torch.zeros(()), delta)  # NaN payloads: torch's own paths disagree
    side = math.isqrt(delta.numel()) + 1
    weight = torch.zeros(side, side, dtype=dtype)
    base = torch.zeros(delta.numel(), dtype=torch.float32)
    ours, twin = weight.clone(), weight.clone()
    native.sparse_update_native(ours, base, delta, KEY)
    su.sparse_update_torch(twin, base, delta, *_twin_positions((side, side), delta.numel()))
    assert torch.equal(ours.view(torch.int16), twin.view(torch.int16))


def test_nan_stays_nan(use_lib):
    weight = torch.zeros(4, 4, dtype=torch.bfloat16)
    native.sparse_update_native(weight, torch.zeros(16), torch.full((16,), float("nan")), KEY)
    assert torch.isnan(weight.float()).all()


# ---------------------------------------------------------------- argument checks
def test_bad_arguments_raise(use_lib):
    x, grad_y = torch.randn(4, 3), torch.randn(4, 2)
    with pytest.raises(ValueError, match="n must be in"):
        native.masked_grad_native(x, grad_y, 7, KEY)
    with pytest.raises(ValueError, match="share T"):
        native.masked_grad_native(x, torch.randn(5, 2), 1, KEY)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        native.masked_grad_native(x.double(), grad_y.double(), 1, KEY)
    with pytest.raises(ValueError, match="1-D of one length"):
        native.sparse_update_native(torch.zeros(3, 3), torch.zeros(2), torch.zeros(3), KEY)
    with pytest.raises(ValueError, match="unsigned 64-bit"):
        native.gather_weight_native(torch.zeros(3, 3), 2, -1)


# ---------------------------------------------------------------- dispatch and the MaskedLinear end to end
def test_default_cpu_backend_is_native(use_lib, monkeypatch):
    assert kernel_backend(torch.device("cpu")) == "native"
    monkeypatch.setenv("RANDMASK_BACKEND", "torch")
    assert kernel_backend(torch.device("cpu")) == "torch"
    monkeypatch.setenv("RANDMASK_BACKEND", "native")
    assert kernel_backend(torch.device("cpu")) == "native"
    monkeypatch.setenv("RANDMASK_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        kernel_backend(torch.device("cpu"))


def test_dispatch_picks_native_twin_or_dense(use_lib, monkeypatch):
    calls = []
    for name in ("masked_grad_native", "gather_weight_native", "sparse_update_native"):
        real = getattr(native, name)
        monkeypatch.setattr(native, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    dense = mg.masked_grad_dense_torch
    monkeypatch.setattr(mg, "masked_grad_dense_torch", lambda *a: calls.append("dense") or dense(*a))
    x, grad_y = torch.randn(8, 128), torch.randn(8, 64)
    low = MatrixMask((64, 128), 8, KEY)  # below both CPU crossovers (torch: DENSE_DENSITY_CPU)
    assert low.density < min(mg.DENSE_DENSITY_CPU, native.DENSE_DENSITY_NATIVE)
    high = MatrixMask((64, 128), int(64 * 128 * min(1.0, 2 * native.DENSE_DENSITY_NATIVE)) + 1, KEY)
    functional.masked_grad(x, grad_y, low)
    functional.masked_grad(x, grad_y, high)
    assert calls == ["masked_grad_native", "dense"]
    calls.clear()
    functional.masked_grad(x.double(), grad_y.double(), low)  # fp64: the torch twin
    monkeypatch.setenv("RANDMASK_BACKEND", "torch")
    functional.masked_grad(x, grad_y, low)
    weight = torch.randn(64, 128)
    functional.sparse_update(weight, functional.gather_weight(weight, low), torch.zeros(8), low)
    assert calls == []
    monkeypatch.delenv("RANDMASK_BACKEND")
    functional.sparse_update(weight, functional.gather_weight(weight, low), torch.zeros(8), low)
    assert calls == ["gather_weight_native", "sparse_update_native"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("density", [0.02, 0.3])
def test_masked_linear_native_equals_torch_backend(use_lib, monkeypatch, dtype, density):
    def run(backend):
        monkeypatch.setenv("RANDMASK_BACKEND", backend)
        torch.manual_seed(0)
        linear = torch.nn.Linear(96, 80).to(dtype)
        layer = MaskedLinear.from_linear(linear, density=density, seed=3, name="blk.q")
        opt = torch.optim.AdamW([layer.delta], lr=1e-2)
        grads = []
        for _ in range(3):
            x = torch.randn(4, 9, 96).to(dtype)
            layer(x).float().square().sum().backward()
            grads.append(layer.delta.grad.clone())
            opt.step()
            opt.zero_grad()
        layer.sync()
        return grads, layer.weight.detach().clone(), layer.base.clone()

    grads_native, weight_native, base_native = run("native")
    grads_torch, weight_torch, base_torch = run("torch")
    assert torch.equal(base_native, base_torch)
    for ours, want in zip(grads_native, grads_torch):
        torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    # the weights follow the (equal to 1e-5) gradients through AdamW: equal up to one rounding of the weight dtype
    torch.testing.assert_close(weight_native.float(), weight_torch.float(), rtol=1e-2 if dtype != torch.float32
                               else 1e-5, atol=1e-6)


# ---------------------------------------------------------------- build and import
def test_not_built_warns_once_and_falls_back(tmp_path):
    code = ("import warnings, torch\n"
            "import randmask, randmask.kernels.native as n, randmask.functional\n"
            "from randmask.backend import kernel_backend\n"
            "print(n.HAS_NATIVE, kernel_backend(torch.device('cpu')))\n")
    env = {**os.environ, "RANDMASK_NATIVE_LIB": str(tmp_path / "missing.so")}
    env.pop("RANDMASK_BACKEND", None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "torch"]
    assert out.stderr.count("randmask: native CPU kernels not built") == 1, out.stderr
    assert "missing.so does not exist" in out.stderr and "using the torch twins" in out.stderr


def test_forcing_an_unbuilt_native_backend_says_why(monkeypatch):
    monkeypatch.setattr(native, "HAS_NATIVE", False)
    monkeypatch.setattr(native, "NATIVE_REASON", "some reason")
    monkeypatch.delenv("RANDMASK_BACKEND", raising=False)
    assert kernel_backend(torch.device("cpu")) == "torch"
    monkeypatch.setenv("RANDMASK_BACKEND", "native")
    with pytest.raises(RuntimeError, match=r"RANDMASK_BACKEND=native, but .* not built \(some reason\)"):
        kernel_backend(torch.device("cpu"))


def test_setup_py_builds_the_library_into_the_package(tmp_path):
    if shutil.which("cmake") is None:
        pytest.skip("cmake is missing")
    env = {**os.environ, "RANDMASK_CUDA": "0"}
    _run([sys.executable, "setup.py", "-q", "build_ext", "--build-lib", tmp_path / "lib", "--build-temp",
          tmp_path / "tmp"], cwd=REPO, env=env)
    built = tmp_path / "lib" / "randmask" / "kernels" / native.CPU_LIBRARY
    assert built.is_file(), sorted(map(str, (tmp_path / "lib").rglob("*")))
    assert native.load_library(built).randmask_cpu_abi_version() == native.ABI_VERSION
    # without the native build (RANDMASK_NATIVE=0) the same command succeeds and builds nothing
    env["RANDMASK_NATIVE"] = "0"
    out = _run([sys.executable, "setup.py", "-q", "build_ext", "--build-lib", tmp_path / "pure", "--build-temp",
                tmp_path / "tmp2"], cwd=REPO, env=env)
    assert "skipping randmask.kernels._randmask_native: RANDMASK_NATIVE=0" in out
    assert not (tmp_path / "pure" / "randmask" / "kernels" / native.CPU_LIBRARY).exists()


def test_cuda_crossover_rule():
    # the CUDA backend's dense/gather choice (measured on an H200): small layers always gather, big ones switch
    # to the dense twin above DENSE_DENSITY_CUDA
    small, big = 576 * 576, 4096 * 4096
    assert not native.cuda_prefers_dense(int(0.1 * small), small, 512)
    assert not native.cuda_prefers_dense(int(0.5 * native.DENSE_DENSITY_CUDA * big), big, 4096)
    assert native.cuda_prefers_dense(int(2 * native.DENSE_DENSITY_CUDA * big), big, 4096)
