"""Tuning constants, one set per device, read only by randmask.ops's selector.

Every number names where it was measured: the benchmark (all under benchmarks/, `python benchmarks/<name>.py ...`)
and the rows of its table in BENCHMARKS.md it was read from. To refit one, rerun that benchmark on the machine in
question and read the same rows.
"""
import dataclasses


@dataclasses.dataclass(frozen=True)
class CpuTuning:
    # Masked gradient with the native library: above this density the dense torch twin (BLAS, then a gather) runs
    # instead of the native gather. bench_masked_grad, AMD EPYC, tables float32_T512_1t and float32_T512_2t
    # (BENCHMARKS.md "Masked gradient", CPU; SmolLM2-135M shapes, 512 tokens): native is faster than torch-dense on
    # every shape at 5e-1 (1.13-1.36x), torch-dense on every shape at 1.0 (1.19-1.74x).
    native_dense_density: float = 0.75
    # Masked gradient with the torch twins alone (no native library, or the torch backend forced): the dense twin
    # above this density, the gather twin below. bench_masked_grad, AMD EPYC, table float32_T512_2t: torch-gather
    # is faster on every shape at 1e-2, torch-dense on the three 576/1536-wide shapes at 2.3e-2 (192x576: at 5e-2).
    twin_dense_density: float = 0.02


@dataclasses.dataclass(frozen=True)
class GpuTuning:
    """A cost model (seconds) of the two Triton ways of the masked gradient, fitted to bench_masked_grad on an H200,
    bf16 (BENCHMARKS.md "Masked gradient", GPU; tables bfloat16_T8192: 4096x4096 and 4096x14336 at 8192 tokens, and
    bfloat16_T512: 4096x4096 at 512 tokens; the matmul way by its nearest measured twin, the matmul-gather column):
        gather  gather_fixed_s + n * T * gather_s
        matmul  matmul_fixed_s + out * in * T * matmul_s + n * matmul_slot_s
    The fixed parts are mostly the host's launch time. The selector takes the cheaper."""
    gather_fixed_s: float = 7e-5      # bfloat16_T512, triton-gather at 1e-5 (0.076 ms)
    gather_s: float = 1.7e-11         # bfloat16_T8192, triton-gather at 1e-4..3e-2 (the slope over n * T)
    matmul_fixed_s: float = 4.9e-5    # bfloat16_T512, matmul-gather (0.066-0.081 ms at every density)
    matmul_s: float = 2.45e-15        # bfloat16_T8192, matmul-gather on 4096x14336 (1.24-1.33 ms)
    matmul_slot_s: float = 3e-11      # bfloat16_T8192, matmul-gather's growth with n on 4096x4096 (0.377-0.393 ms)
    # fp32 operands: cuBLAS without tensor cores (torch's default) ~15x the bf16 time, with TF32 allowed ~2x. Taken
    # from the H100/H200 specs (989 / 495 / 67 TFLOP/s), not from a benchmark.
    matmul_fp32_factor: float = 15.0
    matmul_tf32_factor: float = 2.0


CPU = CpuTuning()
GPU = GpuTuning()
