"""The one dispatch point: which backend runs on which device, how a backend is forced, and which implementation
each op's rule picks."""
import os
import subprocess
import sys

import pytest
import torch
from op_cases import KEY

import randmask
from randmask import MatrixMask, ops, tuning
from randmask.kernels import native


def test_the_table_is_well_formed():
    for op, table in ops.IMPLEMENTATIONS.items():
        assert any(impl.backend == "torch" for impl in table.values()), f"{op} has no torch twin"
        assert all(impl.backend in ops.BACKENDS for impl in table.values()), op
        assert set(ops.implementations(op)) == {name for name, impl in table.items()
                                                if not ops.available_backends("cpu")[impl.backend]}


def test_default_backends():
    native_reason = ops.available_backends("cpu")["native"]
    assert ops.backend_for("cpu") == ("torch" if native_reason else "native")
    assert ops.backend_for("meta") == "torch"  # a device no kernel serves: the twins


def test_use_backend_forces_nests_and_restores():
    default = ops.backend_for("cpu")
    with randmask.use_backend("torch"):
        assert ops.backend_for("cpu") == "torch"
        with randmask.use_backend(None):
            assert ops.backend_for("cpu") == default
        assert ops.backend_for("cpu") == "torch"
    assert ops.backend_for("cpu") == default
    with pytest.raises(ValueError, match="must be one of"):
        with randmask.use_backend("cuda"):
            pass
    assert ops.backend_for("cpu") == default


def test_forcing_a_backend_that_cannot_run_says_why(monkeypatch):
    with randmask.use_backend("native"), pytest.raises(RuntimeError, match="'native' is forced .* CPU tensors"):
        ops.backend_for("meta")
    monkeypatch.delenv("TRITON_INTERPRET")
    with randmask.use_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET=1|not installed"):
        ops.backend_for("cpu")
    monkeypatch.setattr(native, "_loaded", (None, "some reason"))
    assert ops.backend_for("cpu") == "torch"
    with randmask.use_backend("native"), pytest.raises(RuntimeError, match=r"not built \(some reason\)"):
        ops.backend_for("cpu")


def test_the_environment_is_read_once(monkeypatch):
    monkeypatch.setattr(ops, "_env_backend", ops._UNREAD)
    monkeypatch.setenv("RANDMASK_BACKEND", "torch")
    assert ops.backend_for("cpu") == "torch"
    monkeypatch.setenv("RANDMASK_BACKEND", "native")  # too late: the first call read it
    assert ops.backend_for("cpu") == "torch"
    monkeypatch.setattr(ops, "_env_backend", ops._UNREAD)
    monkeypatch.setenv("RANDMASK_BACKEND", "cuda")
    with pytest.raises(ValueError, match="must be one of .* got 'cuda'"):
        ops.backend_for("cpu")


def _python(code, **env):
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**{k: v for k, v in os.environ.items() if k != "RANDMASK_BACKEND"}, **env})
    assert out.returncode == 0, out.stderr
    return out


def _lines_naming(stderr, *words):
    """The stderr lines that name any of `words` (another machine's third-party notices may be there too)."""
    return [line for line in stderr.splitlines() if any(word in line for word in words)]


def test_importing_randmask_changes_nothing_outside_it():
    out = _python("import warnings; warnings.simplefilter('error')\n"
                  "from torch.optim.optimizer import _global_optimizer_post_hooks as hooks\n"
                  "import randmask\n"
                  "from randmask.kernels import native\n"
                  "print(len(hooks), native._loaded == (), any(m.startswith('randmask.recipes') for m in "
                  "__import__('sys').modules))\n"
                  "randmask.MaskedLinear(8, 4, density=0.5); randmask.MaskedLinear(8, 4, density=0.5)\n"
                  "print(len(hooks))\n")
    assert out.stdout.split() == ["0", "True", "False", "1"]  # the hook comes with the first masked layer, once
    assert _lines_naming(out.stderr, "randmask") == []


def test_a_missing_native_library_is_quiet_and_the_twins_run(tmp_path):
    out = _python("import warnings; warnings.simplefilter('error')\n"
                  "import torch, randmask\n"
                  "from randmask import ops\n"
                  "layer = randmask.MaskedLinear(8, 4, density=0.5)\n"
                  "layer(torch.randn(3, 8)).sum().backward()\n"
                  "print(ops.backend_for('cpu'), layer.delta.grad.shape[0])\n"
                  "print(ops.available_backends('cpu')['native'])\n",
                  RANDMASK_NATIVE_LIB=str(tmp_path / "missing.so"))
    backend, count, *reason = out.stdout.split()
    assert (backend, count) == ("torch", "16") and _lines_naming(out.stderr, "randmask", "native", "missing.so") == []
    assert "missing.so does not exist" in " ".join(reason)


def test_the_environment_variable_forces_a_process():
    out = _python("from randmask import ops; print(ops.backend_for('cpu'))", RANDMASK_BACKEND="torch")
    assert out.stdout.split() == ["torch"]


# ---------------------------------------------------------------------------------------------------- rules
def _select_grad(n, shape, dtype=torch.float32, tokens=512):
    return ops.select("masked_grad", "cpu", (dtype, dtype), n=n, tokens=tokens, out_features=shape[0],
                      in_features=shape[1])


def test_masked_grad_rules_on_the_cpu(monkeypatch):
    # densities of 64x128 = 8192 values: 2048 = 0.25, 4096 = 0.5; the dense way only above (strictly) each
    monkeypatch.setattr(tuning, "CPU", tuning.CpuTuning(native_dense_density=0.5, twin_dense_density=0.25))
    shape, ns = (64, 128), (2048, 2049, 4096, 4097)
    with randmask.use_backend("torch"):
        assert [_select_grad(n, shape) for n in ns] == ["torch-gather", "torch-dense", "torch-dense", "torch-dense"]
    if not ops.available_backends("cpu")["native"]:
        with randmask.use_backend("native"):
            assert [_select_grad(n, shape) for n in ns] == ["native", "native", "native", "torch-dense"]
            # dtypes the native kernels do not take: the twins, by the twins' rule
            assert [_select_grad(n, shape, torch.float64) for n in ns[:2]] == ["torch-gather", "torch-dense"]


def test_masked_grad_rule_on_the_gpu_follows_the_cost_model(monkeypatch):
    # the half-precision matmul wins at density 1e-3 of a 4096x4096 layer over 8192 tokens; fp32 operands make
    # cuBLAS ~15x slower (TF32 off, torch's default) and ~2x with TF32, so the crossover moves to a higher density
    n = round(1e-3 * 4096 * 4096)
    assert not ops.gather_is_cheaper(n, 8192, 4096, 4096, half=True)
    assert ops.gather_is_cheaper(round(1e-5 * 4096 * 4096), 8192, 4096, 4096, half=True)
    allow_tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        assert ops.gather_is_cheaper(n, 8192, 4096, 4096, half=False)
        torch.backends.cuda.matmul.allow_tf32 = True
        assert not ops.gather_is_cheaper(n, 8192, 4096, 4096, half=False)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    if ops.available_backends("cpu")["triton"]:
        pytest.skip(ops.available_backends("cpu")["triton"])
    asked = []
    monkeypatch.setattr(ops, "gather_is_cheaper", lambda *a: asked.append(a) or True)
    with randmask.use_backend("triton"):
        assert _select_grad(30, (20, 50), torch.bfloat16, tokens=8) == "triton-gather"
        monkeypatch.setattr(ops, "gather_is_cheaper", lambda *a: asked.append(a) or False)
        assert _select_grad(30, (20, 50), torch.float32, tokens=8) == "triton-matmul"
    assert asked == [(30, 8, 20, 50, True), (30, 8, 20, 50, False)]  # (n, tokens, out, in, half operands)


def test_each_op_runs_the_implementation_the_selector_names(monkeypatch):
    # n = 8 and 6000 of 64x128 at 8 tokens: density ~1e-3 and ~0.73, either side of 0.5; on the GPU model the
    # gather costs 8 * 8 * 1e-9 s (under the matmul's 1e-6 s) and 6000 * 8 * 1e-9 s (over it)
    monkeypatch.setattr(tuning, "CPU", tuning.CpuTuning(native_dense_density=0.5, twin_dense_density=0.5))
    monkeypatch.setattr(tuning, "GPU", tuning.GpuTuning(gather_fixed_s=0.0, gather_s=1e-9, matmul_fixed_s=1e-6,
                                                        matmul_s=0.0, matmul_slot_s=0.0))
    expected = {"torch": ("torch-gather", "torch-dense"), "native": ("native", "torch-dense"),
                "triton": ("triton-gather", "triton-matmul")}
    called = []
    for op, table in ops.IMPLEMENTATIONS.items():
        for name, impl in table.items():
            monkeypatch.setitem(table, name, ops.Impl(impl.backend, lambda *a, _fn=impl.fn, _c=(op, name):
                                                      called.append(_c) or _fn(*a), impl.takes))
    x, grad_y = torch.randn(8, 128), torch.randn(8, 64)
    weight = torch.randn(64, 128)
    for backend in ("torch", "native", "triton"):
        if ops.available_backends("cpu")[backend]:
            continue
        with randmask.use_backend(backend):
            def first_call(fn, *args):  # the op's own implementation (it may call others, e.g. positions)
                called.clear()
                fn(*args)
                return called[0]

            for n, name in zip((8, 6000), expected[backend]):
                mask = MatrixMask((64, 128), n, KEY)
                assert first_call(ops.masked_grad, x, grad_y, mask) == ("masked_grad", name)
            base = ops.gather_weight(weight, mask)
            assert first_call(ops.gather_weight, weight, mask) == ("gather_weight", backend)
            assert first_call(ops.sparse_update, weight, base, torch.zeros(mask.n), mask) == ("sparse_update", backend)
            assert first_call(ops.sparse_update_many, [(weight, base, torch.zeros(mask.n), mask)]) == \
                ("sparse_update_many", backend)
            assert first_call(ops.positions, (64, 128), 10, KEY, "cpu") == ("positions", backend)


def test_the_one_launch_update_takes_fp32_deltas_only():
    if ops.available_backends("cpu")["triton"]:
        pytest.skip(ops.available_backends("cpu")["triton"])
    with randmask.use_backend("triton"):
        assert ops.select("sparse_update_many", "cpu", (torch.bfloat16, torch.float32)) == "triton"
        assert ops.select("sparse_update_many", "cpu", (torch.bfloat16, torch.float16)) == "torch"
        assert ops.select("sparse_update_many", "cpu", (torch.int8, torch.float32)) == "torch"
