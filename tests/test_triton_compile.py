"""Every Triton kernel lowers to GPU machine code (PTX and cubin) for sm_90 and sm_80, on a machine without a GPU.

Under TRITON_INTERPRET=1 (set by conftest.py) triton.jit gives interpreted functions, so the compiling happens in
subprocesses with TRITON_INTERPRET unset: this file run as a script, one process per architecture (both at once),
each compiling every kernel variant with triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget)
into a fresh cache directory and printing one JSON line of results.
"""
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.full
ARCHS = (90, 80)
# Dtypes of the pointer arguments of each variant; other arguments are i32, except the key halves k0, k1: i64
# (what Triton makes of a half >= 2^31). The sparse gather passes its output as delta too; the masked gradient's
# matmul way gathers from fp32 blocks into fp32. Extra constexprs: the multi-matrix kernels' weight dtype and
# binary-search depth (5: up to 32 matrices).
VARIANTS = {
    "mask_positions": ("positions", "mask_positions_kernel", {"rows_ptr": "i64", "cols_ptr": "i64"}, {}),
    "mask_slots": ("positions", "mask_slots_kernel", {"rows_ptr": "i64", "cols_ptr": "i64", "slots_ptr": "i64"}, {}),
    "masked_grad_gather_bf16": ("masked_grad", "masked_grad_gather_kernel",
                                {"x_ptr": "bf16", "gy_ptr": "bf16", "g_ptr": "fp32"}, {}),
    "gather_weight_bf16": ("sparse_update", "sparse_weight_kernel",
                           {"weight_ptr": "bf16", "base_ptr": "bf16", "delta_ptr": "bf16"}, {"UPDATE": False}),
    "gather_rows_fp32": ("sparse_update", "sparse_weight_kernel",
                         {"weight_ptr": "fp32", "base_ptr": "fp32", "delta_ptr": "fp32"}, {"UPDATE": False}),
    "sparse_update_bf16": ("sparse_update", "sparse_weight_kernel",
                           {"weight_ptr": "bf16", "base_ptr": "bf16", "delta_ptr": "fp32"}, {"UPDATE": True}),
    "masked_adamw_bf16": ("masked_adamw", "masked_adamw_kernel",
                          {"weight_ptr": "bf16", "base_ptr": "bf16", "delta_ptr": "fp32", "grad_ptr": "fp32",
                           "exp_avg_ptr": "fp32", "exp_avg_sq_ptr": "fp32"}, {}),
    "sparse_update_multi_bf16": ("sparse_update", "sparse_update_multi_kernel", {"table_ptr": "i64"},
                                 {"WEIGHT_DTYPE": "bfloat16", "SEARCH_STEPS": 5}),
    "masked_adamw_multi_bf16": ("masked_adamw", "masked_adamw_multi_kernel",
                                {"table_ptr": "i64", "step_scalars_ptr": "fp32"},
                                {"WEIGHT_DTYPE": "bfloat16", "SEARCH_STEPS": 5}),
}
# Float scalar arguments (fp32, what Triton makes of a Python float): the AdamW step's host-computed scalars.
FP32_ARGS = ("decay", "lerp_weight", "beta2", "one_minus_beta2", "neg_step_size", "bias_correction2_sqrt", "eps")


def compile_all(cap: int) -> dict:
    """{variant: {"ok", "error", "name", "arch", "cubin_bytes"}} for one compute capability (no interpreter)."""
    import importlib
    import traceback

    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget

    results = {}
    for name, (module, kernel, pointers, extra) in VARIANTS.items():
        try:
            mod = importlib.import_module(f"randmask.kernels.{module}")
            fn = getattr(mod, kernel)
            constexprs = {k: getattr(tl, v) if isinstance(v, str) else v for k, v in extra.items()}
            for arg in fn.arg_names:  # block sizes: the module constants the launchers pass
                if arg == "BLOCK":
                    constexprs[arg] = mod.BLOCK
                elif arg.startswith("BLOCK_") and arg not in constexprs:
                    constexprs[arg] = getattr(mod, "GATHER_" + arg)
            signature = {arg: "constexpr" if arg in constexprs else f"*{pointers[arg]}" if arg in pointers
                         else "i64" if arg in ("k0", "k1") else "fp32" if arg in FP32_ARGS else "i32"
                         for arg in fn.arg_names}
            attrs = {(i,): [["tt.divisibility", 16]] for i, arg in enumerate(fn.arg_names) if arg in pointers}
            src = triton.compiler.ASTSource(fn, signature, constexprs, attrs)
            compiled = triton.compile(src, target=GPUTarget("cuda", cap, 32))
            results[name] = {"ok": True, "error": "", "name": compiled.metadata.name,
                             "arch": compiled.metadata.target.arch, "cubin_bytes": len(compiled.kernel)}
        except Exception:  # reported per variant by the tests
            results[name] = {"ok": False, "error": traceback.format_exc(limit=-3), "name": None, "arch": None,
                             "cubin_bytes": 0}
    return results


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton_cache"))  # a fresh cache: really compile
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # triton 3.9's default, said explicitly to silence its warning
    procs = {cap: subprocess.Popen([sys.executable, __file__, str(cap)], env=env, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE) for cap in ARCHS}
    results = {}
    try:
        for cap, proc in procs.items():
            out, err = proc.communicate(timeout=300)
            assert proc.returncode == 0, f"the sm_{cap} compile process failed:\n{err[-4000:]}"
            results[cap] = json.loads(out.strip().splitlines()[-1])
    finally:
        for proc in procs.values():  # on a timeout or failure, leave no compiler process behind
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


@pytest.mark.parametrize("cap", ARCHS)
@pytest.mark.parametrize("name", VARIANTS)
def test_kernel_compiles(compiled, name, cap):
    result = compiled[cap][name]
    assert result["ok"], f"{name} does not compile for sm_{cap}:\n{result['error']}"
    assert (result["name"], result["arch"]) == (VARIANTS[name][1], cap)  # the kernel's entry, for this GPU
    assert result["cubin_bytes"] > 0


if __name__ == "__main__":
    print(json.dumps(compile_all(int(sys.argv[1]))))
