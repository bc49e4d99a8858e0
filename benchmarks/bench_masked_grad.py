"""Masked-gradient microbenchmark: every implementation side by side, per shape and density.

    python benchmarks/bench_masked_grad.py                   # CPU: torch twins vs native, SmolLM2-135M shapes
    python benchmarks/bench_masked_grad.py --device cuda --dtype bfloat16   # GPU: the Triton ways vs the baselines
    python benchmarks/bench_masked_grad.py --threads 1       # CPU, one thread (steadier on a shared machine)
    python benchmarks/bench_masked_grad.py --cold --native-lib OTHER.so --densities 2.3e-2   # two builds, cold

g[k] = sum_t grad_y[t, r_k] x[t, c_k] (fp32) for x (T, in) and grad_y (T, out) in --dtype. Variants:
  every implementation randmask.ops has for the device (ops.implementations("masked_grad", device), called through
        ops.run): torch-gather and torch-dense (the torch twins), native (the C++ gather) on a CPU; triton-gather
        (one dot over tokens per slot) and triton-matmul (cuBLAS blocks of grad_y^T x with an fp32 result, the
        masked entries kept by a Triton gather) on a GPU
  dispatch          randmask.ops.masked_grad, what training calls; its rows also record what the selector picks
  matmul-gather     the dense baseline: grad_y^T x as one matmul in the layer's dtype (cuBLAS / BLAS), then the
                    gather; what autograd does for SHiRA and SpIEL ("matmul / dispatch" is our speed-up over it)
  official-gather   the official Random Masking code's way: fp32 transposed copies of x and grad_y in every backward,
                    then one dot per entry
  official-sampled  the same copies, then torch.sparse.sampled_addmm over the stored CSR mask (the CSR indices are
                    built once outside the timing, as the official code stores them; the result is put back in slot
                    order inside it)
  native@NAME       with --native-lib PATH: another build of the native CPU library, timed in the same rounds (how a
                    change to kernels/csrc/native_cpu.cpp is measured against the previous build; reported as
                    native / native@NAME by round)
The default shapes are SmolLM2-135M's linear layers (q/o 576x576, k/v 192x576, gate/up 1536x576, down 576x1536)
with 512 tokens (4 x 128). The report shows, per shape, where the dense implementation first beats each gather: the
selector's crossovers (randmask/tuning.py) should sit near them.

Timing: the variants are interleaved round by round in a shuffled order (a load spike on a shared machine hits all
of them), then the median (or --stat min) of --repeats rounds; CUDA is synchronized around each call; a call under
20 ms is repeated untimed just before its timed call (warm caches, as in training where x and grad_y were just
touched). --cold instead reads 128 MiB before every timed call, so x and grad_y come from memory, as x does in a
training step's backward (the forward wrote it long before).
Appends a row per (shape, density, variant) to the results dataset, then writes the run's table and plot.
"""
import argparse
import os
import pathlib
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Run, add_matrix_arguments, add_results_argument, evict_caches, time_interleaved  # noqa: E402

from randmask import MatrixMask, layer_key, ops  # noqa: E402
from randmask.kernels import native  # noqa: E402

SHAPES = "576x576,192x576,1536x576,576x1536"
DENSITIES = "1e-4,1e-3,3e-3,1e-2,2.3e-2,5e-2,1e-1,2e-1,3e-1"
warnings.filterwarnings("ignore", message="Sparse")  # sampled_addmm: CSR is beta, invariant checks off
# Calls under this long get an untimed call just before the timed one: otherwise a variant measured right after one
# with big temporaries (official-*, torch-dense) starts from caches holding those, which measured up to 2x slower.
WARM_BELOW_S = 0.02
CHUNK_BYTES = 256 * 2**20  # official-gather's temporaries per chunk of entries


def official_gather(x, grad_y, rows, cols):
    """The official code's SDDMM as plain torch: fp32 transposed copies, then one dot per entry (chunked)."""
    xt, gyt = x.t().float().contiguous(), grad_y.t().float().contiguous()
    g = torch.empty(rows.numel(), device=x.device)
    step = max(1, CHUNK_BYTES // (4 * max(1, x.shape[0])))
    for s in range(0, rows.numel(), step):
        g[s:s + step] = (gyt[rows[s:s + step]] * xt[cols[s:s + step]]).sum(1)
    return g


def official_sampled(x, grad_y, shape, rows, cols):
    """The official code's SDDMM through torch.sparse.sampled_addmm; returns a callable (CSR built here, once)."""
    flat = rows * shape[1] + cols
    sorted_flat, order = flat.sort()
    crow = torch.zeros(shape[0] + 1, dtype=torch.int64, device=x.device)
    crow[1:] = torch.bincount(sorted_flat // shape[1], minlength=shape[0]).cumsum(0)
    mask = torch.sparse_csr_tensor(crow, sorted_flat % shape[1], torch.ones(flat.numel(), device=x.device), shape)

    def run():
        xt, gyt = x.t().float().contiguous(), grad_y.t().float().contiguous()
        values = torch.sparse.sampled_addmm(mask, gyt, xt.t(), beta=0.0).values()
        return torch.empty_like(values).index_copy_(0, order, values)  # back to slot order

    return run


def variants(device, x, grad_y, mask, other_libs=None):
    """name -> zero-argument callable: the implementations runnable here, dispatch, the baselines, other builds."""
    rows, cols = mask.positions(device)  # cached in the mask: the torch twins' calls find them there
    found = {"dispatch": lambda: ops.masked_grad(x, grad_y, mask)}
    for name in ops.implementations("masked_grad", device):
        found[name] = lambda name=name: ops.run("masked_grad", name, x, grad_y, mask)
    for name, library in (other_libs or {}).items():
        found[name] = lambda library=library: native.masked_grad_native(x, grad_y, mask.n, mask.key, library)
    found["matmul-gather"] = lambda: (grad_y.t() @ x)[rows, cols].float()
    found["official-gather"] = lambda: official_gather(x, grad_y, rows, cols)
    if mask.n:
        found["official-sampled"] = official_sampled(x, grad_y, mask.shape, rows, cols)
    return found


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_matrix_arguments(parser, shapes=SHAPES, densities=DENSITIES, repeats=9)
    parser.add_argument("--cold", action="store_true",
                        help="evict the caches before every timed call (inputs from memory, as in a training step)")
    parser.add_argument("--native-lib", action="append", default=[], metavar="PATH",
                        help="another build of the native CPU library, timed as variant native@NAME (repeatable)")
    add_results_argument(parser)
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.native_lib and (device.type != "cpu" or native.status()[0] is None):
        parser.error("--native-lib compares builds of the native CPU library: it needs --device cpu and the "
                     f"installed library ({native.status()[1] or 'it is loaded'})")
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads() if device.type == "cpu" else None
    other_libs = {f"native@{pathlib.Path(path).stem}": native.load_library(path) for path in args.native_lib}
    evict = evict_caches(device) if args.cold else None
    table = f"{args.dtype}_T{args.tokens}" + (f"_{threads}t" if threads else "") + ("_cold" if args.cold else "")
    run = Run("masked_grad", device, table, args.results, tag=args.tag)
    isa = native.cpu_info()["isa"] if device.type == "cpu" and native.status()[0] is not None else None
    print(f"{run.base['machine']}, {run.base['table']}, backend {ops.backend_for(device)}; run {run.id}", flush=True)
    key = layer_key(0, "bench")
    for shape_text in args.shapes.split(","):
        shape = tuple(int(v) for v in shape_text.lower().split("x"))
        generator = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(args.tokens, shape[1], device=device, generator=generator).to(dtype)
        grad_y = torch.randn(args.tokens, shape[0], device=device, generator=generator).to(dtype)
        for density in map(float, args.densities.split(",")):
            n = round(density * shape[0] * shape[1])
            mask = MatrixMask(shape, n, key)
            found = variants(device, x, grad_y, mask, other_libs)
            for fn in found.values():
                fn()  # warm-up: Triton compiles, lazy loads
            times = time_interleaved(found, device, args.repeats, warm_below_s=0.0 if evict else WARM_BELOW_S,
                                     before=evict)
            picks = ops.select("masked_grad", device, (dtype, dtype), n=n, tokens=args.tokens,
                               out_features=shape[0], in_features=shape[1])
            params = {"shape": shape_text, "tokens": args.tokens, "dtype": args.dtype, "density": density, "n": n,
                      "threads": threads, "cold": args.cold, "backend": ops.backend_for(device), "isa": isa}
            cells = []
            for name, t in times.items():
                extra = {"picks": picks} if name == "dispatch" else {}
                row = run.add(params, name, t, args.stat, **extra)
                cells.append(f"{name}={row['s'] * 1e3:.3f}")
            print(f"{shape_text:>9} {density:8.1e} {n:8d}  picks {picks:<13} " + "  ".join(cells), flush=True)
    run.report(not args.no_report)


if __name__ == "__main__":
    main()
