"""Masked-gradient microbenchmark: every implementation side by side, per shape and density.

    python benchmarks/bench_masked_grad.py                   # CPU: torch twins vs native, SmolLM2-135M shapes
    python benchmarks/bench_masked_grad.py --device cuda     # GPU: Triton kernels vs the CUDA backend vs torch
    python benchmarks/bench_masked_grad.py --threads 1       # CPU, one thread (steadier on a shared machine)
    python benchmarks/bench_masked_grad.py --cold --native-lib OTHER.so --densities 2.3e-2   # two builds, cold

Columns (ms per call; "–" where an implementation is not available):
  CPU   torch-gather, torch-dense (the torch twins, kernels/masked_grad.py), native (the C++ gather,
        kernels/native.py), dispatch (randmask.functional.masked_grad as training calls it: the default backend)
  CUDA  triton-gather (the gather kernel), triton-matmul (the matmul way: cuBLAS blocks of grad_y^T x with an fp32
        result, the masked entries kept by a Triton gather), cuda (the CUDA C++ gather), dispatch
  both  torch-dense is the dense twin (fp32 upcasts, in blocks: the CPU path and test oracle); matmul-gather is the
        dense baseline: grad_y^T x as one matmul in the layer's dtype (cuBLAS / BLAS), then the gather, which is what
        autograd does for SHiRA and SpIEL; the "matmul / dispatch" column is our speed-up over it. The official
        Random Masking code's way: transposed fp32 copies of x and grad_y made in every backward, then either a
        per-entry gather (official-gather) or torch.sparse.sampled_addmm over the stored CSR mask (official-sampled;
        the CSR indices are built once outside the timing, as the official code stores them, and the result is put
        back in slot order inside it).
Per shape it reports where the dense variant (triton-matmul on a GPU, torch-dense on the CPU) first beats each
gather: the crossovers DENSE_DENSITY_CPU (kernels/masked_grad.py) and DENSE_DENSITY_NATIVE / DENSE_DENSITY_CUDA
(kernels/native.py) should sit near them; on a GPU the tables are what the dispatcher's cost model
(masked_grad_way_gpu, kernels/masked_grad.py) is fitted to.
The default shapes are SmolLM2-135M's linear layers (q/o 576x576, k/v 192x576, gate/up 1536x576, down 576x1536)
with 512 tokens (4 x 128).

Timing: the variants are interleaved round by round, in a shuffled order (a load spike on a shared machine hits all
of them), then the median (or --stat min) of --repeats rounds; CUDA is synchronized around each call; a call under
20 ms is repeated untimed just before its timed call (warm caches, as in training where x and grad_y were just
touched). --cold instead reads 128 MiB (4x a 32 MiB L3) before every timed call, so x and grad_y
come from memory, as x does in a training step's backward (the forward wrote it long before).
--native-lib PATH adds a column "native@NAME" for another build of the native CPU library, timed in the same
rounds (how a change to kernels/csrc/native_cpu.cpp is measured against the previous build).
Writes benchmarks/results/masked_grad_<device>_<dtype>[_T<tokens>][_<threads>t][_cold].{md,json,png} (--no-save: print
only).
"""
import argparse
import os
import pathlib
import statistics
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import load_average, machine_name, markdown_table, time_interleaved, write_results  # noqa: E402

from randmask import layer_key, mask_positions  # noqa: E402
from randmask.addressing import MatrixMask  # noqa: E402
from randmask.backend import HAS_TRITON, kernel_backend  # noqa: E402
from randmask.functional import masked_grad as dispatch_masked_grad  # noqa: E402
from randmask.kernels import masked_grad as op  # noqa: E402
from randmask.kernels import native  # noqa: E402

SHAPES = "576x576,192x576,1536x576,576x1536"
DENSITIES = "1e-4,1e-3,3e-3,1e-2,2.3e-2,5e-2,1e-1,2e-1,3e-1"
GATHERS = ("torch-gather", "native", "triton-gather", "cuda")
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


def variants(device, x, grad_y, shape, n, key, other_libs=None):
    """name -> zero-argument callable, for the implementations available here (other_libs: {name: CDLL} of
    other native CPU builds)."""
    mask = MatrixMask(shape, n, key)
    rows, cols = mask_positions(shape, n, key, device)
    found = {"dispatch": lambda: dispatch_masked_grad(x, grad_y, mask)}  # first in each round: no ordering favour
    if device.type == "cuda":
        if HAS_TRITON:
            found["triton-gather"] = lambda: op.masked_grad_gather_triton(x, grad_y, n, key)
            found["triton-matmul"] = lambda: op.masked_grad_matmul_triton(x, grad_y, n, key)
        if native.has_cuda_native():
            found["cuda"] = lambda: native.masked_grad_cuda(x, grad_y, n, key)
    else:
        found["torch-gather"] = lambda: op.masked_grad_gather_torch(x, grad_y, rows, cols)
        if native.HAS_NATIVE:
            found["native"] = lambda: native.masked_grad_native(x, grad_y, n, key)
        for name, library in (other_libs or {}).items():
            found[name] = lambda library=library: native.masked_grad_native(x, grad_y, n, key, library)
    found["torch-dense"] = lambda: op.masked_grad_dense_torch(x, grad_y, rows, cols)
    found["matmul-gather"] = lambda: (grad_y.t() @ x)[rows, cols].float()
    found["official-gather"] = lambda: official_gather(x, grad_y, rows, cols)
    if n:
        found["official-sampled"] = official_sampled(x, grad_y, shape, rows, cols)
    return found


def interleaved_ms(found, device, repeats, stat, evict=None):
    """Per variant, the median (or min) over `repeats` interleaved rounds (common.time_interleaved), ms; with
    evict, caches are evicted before every timed call instead of warmed. Also {native@NAME: the median over the
    rounds of native's time / native@NAME's in that round} (a ratio by round: this machine's load moves every call
    of a round alike, up to 2x between minutes)."""
    for fn in found.values():
        fn()  # warm-up (Triton compiles, the dispatch column's positions cache)
    times = time_interleaved(found, device, repeats, warm_below_s=0.0 if evict else WARM_BELOW_S, before=evict)
    pick = min if stat == "min" else statistics.median
    by_round = {name: statistics.median(a / b for a, b in zip(times["native"], t))
                for name, t in times.items() if name.startswith("native@")}
    return {name: 1e3 * pick(t) for name, t in times.items()}, by_round


def plot(data, path):
    import matplotlib.pyplot as plt

    shapes = data["shapes"]
    fig, axes = plt.subplots(1, len(shapes), figsize=(4.2 * len(shapes), 3.6), squeeze=False)
    for ax, (shape, rows) in zip(axes[0], shapes.items()):
        densities = [row["density"] for row in rows]
        for name in data["variants"]:
            ms = [row["ms"].get(name) for row in rows]
            if any(v is not None for v in ms):
                ax.plot(densities, ms, marker="o", ms=3, label=name, ls="--" if name == "dispatch" else "-")
        ax.set(xscale="log", yscale="log", title=shape, xlabel="density")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("ms per call")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(data["title"], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=SHAPES, help="comma-separated OUTxIN (default: SmolLM2-135M's)")
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--densities", default=DENSITIES)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--stat", default="median", choices=["median", "min"],
                        help="min is steadier on a shared machine")
    parser.add_argument("--threads", type=int, default=0, help="torch (and native) CPU threads; 0: torch's default")
    parser.add_argument("--cold", action="store_true",
                        help="evict the caches before every timed call (inputs from memory, as in a training step)")
    parser.add_argument("--native-lib", action="append", default=[], metavar="PATH",
                        help="another build of the native CPU library, timed as column native@NAME (repeatable)")
    parser.add_argument("--no-save", action="store_true", help="print only, write nothing under results/")
    args = parser.parse_args()
    if args.native_lib and (args.device != "cpu" or not native.HAS_NATIVE):
        parser.error("--native-lib compares builds of the native CPU library: it needs --device cpu and the "
                     f"installed library ({native.NATIVE_REASON or 'not built'})")
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    key = layer_key(0, "bench")
    other_libs = {f"native@{pathlib.Path(path).stem}": native.load_library(path) for path in args.native_lib}
    evict = None
    if args.cold:  # reading 128 MiB (4x a 32 MiB L3) leaves none of the operands in any cache level
        flush = torch.ones(4 * 32 * 2**20 // 4, device=device)
        evict = flush.sum
    isa = f", native ISA {native.cpu_info()['isa']}" if device.type == "cpu" and native.HAS_NATIVE else ""
    load_before = load_average()
    title = (f"masked gradient, {machine_name(device)}{isa}; tokens={args.tokens}, {args.dtype}, "
             f"{args.stat} of {args.repeats} interleaved rounds{', cold caches' if args.cold else ''}; "
             f"dispatch = {kernel_backend(device)} backend")
    print(title)
    data = {"title": title, "args": vars(args), "variants": [], "shapes": {}, "crossovers": {}}
    markdown = [f"# Masked gradient, ms per call\n\n{title}\n"]
    for shape_text in args.shapes.split(","):
        shape = tuple(int(v) for v in shape_text.lower().split("x"))
        generator = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(args.tokens, shape[1], device=device, dtype=dtype, generator=generator)
        grad_y = torch.randn(args.tokens, shape[0], device=device, dtype=dtype, generator=generator)
        rows, crossovers = [], {}
        for density in map(float, args.densities.split(",")):
            n = round(density * shape[0] * shape[1])
            found = variants(device, x, grad_y, shape, n, key, other_libs)
            ms, native_over_other = interleaved_ms(found, device, args.repeats, args.stat, evict)
            for name in found:
                if name not in data["variants"]:
                    data["variants"].append(name)
            dense = "triton-matmul" if "triton-matmul" in ms else "torch-dense"
            for gather in (g for g in GATHERS if g in ms):
                if ms[dense] < ms[gather] and gather not in crossovers:
                    crossovers[gather] = density
            ours = [ms[k] for k in (*GATHERS, "torch-dense", "triton-matmul") if k in ms]
            ratio = ms["dispatch"] / min(ours)  # the dispatcher against the best of our variants
            speedup = ms["matmul-gather"] / ms["dispatch"]
            rows.append({"density": density, "n": n, "ms": ms, "dispatch_over_best": ratio,
                         "matmul_over_dispatch": speedup, "native_over_other_by_round": native_over_other})
            print(f"{shape_text:>9} {density:8.1e} {n:8d}  " + "  ".join(f"{k}={v:.3f}" for k, v in ms.items())
                  + f"  dispatch/best={ratio:.2f}  matmul/dispatch={speedup:.1f}"
                  + "".join(f"  native/{k} by round={v:.3f}" for k, v in native_over_other.items()), flush=True)
        names = [v for v in data["variants"] if any(v in row["ms"] for row in rows)]
        others = list(other_libs)
        markdown += [f"\n## {shape_text}\n", markdown_table(
            ["density", "n", *names, "dispatch / best", "matmul / dispatch",
             *(f"native / {k} by round" for k in others)],
            [[f"{row['density']:.1e}", row["n"], *(f"{row['ms'][v]:.3f}" if v in row["ms"] else "–" for v in names),
              f"{row['dispatch_over_best']:.2f}", f"{row['matmul_over_dispatch']:.1f}",
              *(f"{row['native_over_other_by_round'][k]:.2f}" for k in others)] for row in rows])]
        notes = []
        for gather in (g for g in GATHERS if g in names):
            if gather in crossovers:
                notes.append(f"{dense} first beats {gather} at density {crossovers[gather]:g}")
            else:
                notes.append(f"{gather} beats {dense} at every density measured")
        print("  " + "; ".join(notes))
        markdown.append("\n" + "; ".join(notes) + ".")
        data["shapes"][shape_text] = rows
        data["crossovers"][shape_text] = crossovers
    worst = max(row["dispatch_over_best"] for rows in data["shapes"].values() for row in rows)
    data["worst_dispatch_over_best"] = worst
    markdown.append(f"\nDispatcher against the better of our variants, worst case: {worst:.2f}x "
                    f"(dispatch / best; target <= 1.10).")
    print(f"worst dispatch / best: {worst:.2f}")
    speedups = [f"{shape} {row['matmul_over_dispatch']:.1f}x" for shape, rows in data["shapes"].items()
                for row in rows if row["density"] == 1e-4]
    if speedups:  # the GPU target: >= 10x at density 1e-4 and 8192 tokens
        markdown.append(f"\nAt density 1e-4, the dense baseline (matmul-gather) over the dispatcher: "
                        f"{', '.join(speedups)}.")
        print("matmul-gather / dispatch at density 1e-4: " + ", ".join(speedups))
    data["load_average"] = [load_before, load_average()]
    markdown.append(f"\n1-minute load average before / after: {load_before} / {load_average()}")
    print(f"load average before / after: {load_before} / {load_average()}")
    if not args.no_save:
        threads = f"_{args.threads}t" if args.threads else ""
        tokens = f"_T{args.tokens}" if args.tokens != 512 else ""
        stem = f"masked_grad_{device.type}_{args.dtype}{tokens}{threads}{'_cold' if args.cold else ''}"
        path = write_results(stem, data, "\n".join(markdown), plot)
        print(f"wrote {path}.md / .json / .png")


if __name__ == "__main__":
    main()
