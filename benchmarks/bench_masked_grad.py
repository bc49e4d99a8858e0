"""Masked-gradient microbenchmark: every implementation side by side, per shape and density.

    python benchmarks/bench_masked_grad.py                   # CPU: torch twins vs native, SmolLM2-135M shapes
    python benchmarks/bench_masked_grad.py --device cuda     # GPU: Triton kernels vs the CUDA backend vs torch
    python benchmarks/bench_masked_grad.py --threads 1       # CPU, one thread (steadier on a shared machine)

Columns (ms per call; "–" where an implementation is not available):
  CPU   torch-gather, torch-dense (the torch twins, kernels/masked_grad.py), native (the C++ gather,
        kernels/native.py), dispatch (randmask.functional.masked_grad as training calls it: the default backend)
  CUDA  triton-gather, triton-dense, cuda (the CUDA C++ gather), torch-dense (cuBLAS twin), dispatch
Per shape it reports where the dense variant first beats each gather: the crossovers DENSE_DENSITY_CPU
(kernels/masked_grad.py), DENSE_DENSITY_NATIVE / DENSE_DENSITY_CUDA (kernels/native.py) and DENSE_DENSITY_GPU
(kernels/masked_grad.py) should sit near them. The default shapes are SmolLM2-135M's linear layers (q/o 576x576,
k/v 192x576, gate/up 1536x576, down 576x1536) with 512 tokens (4 x 128).

Timing: the variants are interleaved round by round (a load spike on a shared machine hits all of them), then the
median (or --stat min) of --repeats rounds; CUDA is synchronized around each call. Writes
benchmarks/results/masked_grad_<device>_<dtype>[_<threads>t].{md,json,png} (--no-save: print only).
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import load_average, machine_name, markdown_table, synchronize, write_results  # noqa: E402

from randmask import layer_key, mask_positions  # noqa: E402
from randmask.addressing import MatrixMask  # noqa: E402
from randmask.backend import HAS_TRITON, kernel_backend  # noqa: E402
from randmask.functional import masked_grad as dispatch_masked_grad  # noqa: E402
from randmask.kernels import masked_grad as op  # noqa: E402
from randmask.kernels import native  # noqa: E402

SHAPES = "576x576,192x576,1536x576,576x1536"
DENSITIES = "1e-4,1e-3,3e-3,1e-2,2.3e-2,5e-2,1e-1,2e-1,3e-1"
GATHERS = ("torch-gather", "native", "triton-gather", "cuda")


def variants(device, x, grad_y, shape, n, key):
    """name -> zero-argument callable, for the implementations available here."""
    mask = MatrixMask(shape, n, key)
    rows, cols = mask_positions(shape, n, key, device)
    found = {}
    if device.type == "cuda":
        if HAS_TRITON:
            found["triton-gather"] = lambda: op.masked_grad_gather_triton(x, grad_y, n, key)
            found["triton-dense"] = lambda: op.masked_grad_dense_triton(x, grad_y, n, key)
        if native.has_cuda_native():
            found["cuda"] = lambda: native.masked_grad_cuda(x, grad_y, n, key)
    else:
        found["torch-gather"] = lambda: op.masked_grad_gather_torch(x, grad_y, rows, cols)
        if native.HAS_NATIVE:
            found["native"] = lambda: native.masked_grad_native(x, grad_y, n, key)
    found["torch-dense"] = lambda: op.masked_grad_dense_torch(x, grad_y, rows, cols)
    found["dispatch"] = lambda: dispatch_masked_grad(x, grad_y, mask)
    return found


def interleaved_ms(found, device, repeats, stat):
    """Per variant, the median (or min) over `repeats` rounds of one call each, the variants interleaved."""
    for fn in found.values():
        fn()  # warm-up (Triton compiles, the dispatch column's positions cache)
    times = {name: [] for name in found}
    for _ in range(repeats):
        for name, fn in found.items():
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    pick = min if stat == "min" else statistics.median
    return {name: 1e3 * pick(t) for name, t in times.items()}


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
    parser.add_argument("--no-save", action="store_true", help="print only, write nothing under results/")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    key = layer_key(0, "bench")
    isa = f", native ISA {native.cpu_info()['isa']}" if device.type == "cpu" and native.HAS_NATIVE else ""
    load_before = load_average()
    title = (f"masked gradient, {machine_name(device)}{isa}; tokens={args.tokens}, {args.dtype}, "
             f"{args.stat} of {args.repeats} interleaved rounds; dispatch = {kernel_backend(device)} backend")
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
            found = variants(device, x, grad_y, shape, n, key)
            ms = interleaved_ms(found, device, args.repeats, args.stat)
            for name in found:
                if name not in data["variants"]:
                    data["variants"].append(name)
            dense = "triton-dense" if "triton-dense" in ms else "torch-dense"
            for gather in (g for g in GATHERS if g in ms):
                if ms[dense] < ms[gather] and gather not in crossovers:
                    crossovers[gather] = density
            rows.append({"density": density, "n": n, "ms": ms})
            print(f"{shape_text:>9} {density:8.1e} {n:8d}  " + "  ".join(f"{k}={v:.3f}" for k, v in ms.items()),
                  flush=True)
        names = [v for v in data["variants"] if any(v in row["ms"] for row in rows)]
        markdown += [f"\n## {shape_text}\n", markdown_table(
            ["density", "n", *names],
            [[f"{row['density']:.1e}", row["n"], *(f"{row['ms'][v]:.3f}" if v in row["ms"] else "–" for v in names)]
             for row in rows])]
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
    data["load_average"] = [load_before, load_average()]
    markdown.append(f"\n1-minute load average before / after: {load_before} / {load_average()}")
    print(f"load average before / after: {load_before} / {load_average()}")
    if not args.no_save:
        threads = f"_{args.threads}t" if args.threads else ""
        path = write_results(f"masked_grad_{device.type}_{args.dtype}{threads}", data, "\n".join(markdown), plot)
        print(f"wrote {path}.md / .json / .png")


if __name__ == "__main__":
    main()
