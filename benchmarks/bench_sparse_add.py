"""Sparse-add microbenchmark: every implementation of the additive path's product with S(delta), and a dense baseline.

    python benchmarks/bench_sparse_add.py                  # CPU: torch twin vs native, SmolLM2-135M shapes
    python benchmarks/bench_sparse_add.py --threads 1      # one thread (steadier on a shared machine)

sparse_add   out[t, r_k] += delta[k] x[t, c_k]        out (T, out), x (T, in)      the forward's y += x S(delta)^T
sparse_add_t out[t, c_k] += delta[k] grad_y[t, r_k]   out (T, in), grad_y (T, out) the backward's grad_x += grad_y S
in --dtype, in place. Variants: every implementation randmask.ops has for the device (ops.implementations(op,
device), called through ops.run: torch, the twin, and native on a CPU), and dense: the same product as one addmm
with a dense S built once outside the timing (out.addmm_(x, S.t()) / out.addmm_(grad_y, S)), what an adapter that
materialises its sparse delta would pay. The twin's positions are cached in the mask (as in training); native
computes them from the key in every call. Shapes: SmolLM2-135M's linear layers (q/o 576x576, k/v 192x576, gate/up
1536x576, down 576x1536), 512 tokens.

Timing as bench_masked_grad.py: variants interleaved round by round in a shuffled order, the median (or --stat min)
of --repeats rounds, a call under 20 ms repeated untimed just before its timed one. Appends a row per (op, shape,
density, variant) to the results dataset (with its ratio to the fastest variant, `x_fastest`), prints a table with
those ratios, then writes the run's generated table.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Run, add_matrix_arguments, add_results_argument, fmt_ms, markdown_table, pick, time_interleaved  # noqa: E402

from randmask import MatrixMask, layer_key, ops  # noqa: E402
from randmask.kernels import native  # noqa: E402

SHAPES = "576x576,192x576,1536x576,576x1536"
DENSITIES = "1e-4,1e-3,1e-2,2.3e-2"
OPS = ("sparse_add", "sparse_add_t")
WARM_BELOW_S = 0.02


def variants(op, device, out, src, delta, mask):
    """name -> zero-argument callable: the implementations runnable here, then the dense baseline."""
    found = {name: (lambda name=name: ops.run(op, name, out, src, delta, mask))
             for name in ops.implementations(op, device)}
    rows, cols = mask.positions(device)
    dense = torch.zeros(mask.shape, dtype=out.dtype, device=device)
    dense[rows, cols] = delta.to(out.dtype)
    found["dense"] = (lambda: out.addmm_(src, dense)) if op == "sparse_add_t" else (lambda: out.addmm_(src, dense.t()))
    return found


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_matrix_arguments(parser, shapes=SHAPES, densities=DENSITIES, repeats=15)
    parser.add_argument("--ops", default=",".join(OPS), help="comma-separated, of " + ", ".join(OPS))
    add_results_argument(parser)
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads() if device.type == "cpu" else None
    table = f"{args.dtype}_T{args.tokens}" + (f"_{threads}t" if threads else "")
    run = Run("sparse_add", device, table, args.results, tag=args.tag)
    isa = native.cpu_info()["isa"] if device.type == "cpu" and native.status()[0] is not None else None
    print(f"{run.base['machine']}, {run.base['table']}, backend {ops.backend_for(device)}"
          + (f" (native ISA {isa})" if isa else "") + f"; run {run.id}", flush=True)
    key = layer_key(0, "bench")
    lines = []
    for op in args.ops.split(","):
        for shape_text in args.shapes.split(","):
            shape = tuple(int(v) for v in shape_text.lower().split("x"))
            dst, width = shape if op == "sparse_add" else shape[::-1]
            generator = torch.Generator(device=device).manual_seed(0)
            out = torch.randn(args.tokens, dst, device=device, generator=generator).to(dtype)
            src = torch.randn(args.tokens, width, device=device, generator=generator).to(dtype)
            for density in map(float, args.densities.split(",")):
                n = round(density * shape[0] * shape[1])
                mask = MatrixMask(shape, n, key)
                delta = 1e-3 * torch.randn(n, device=device, generator=generator)  # small: repeated calls stay finite
                found = variants(op, device, out, src, delta, mask)
                for fn in found.values():
                    fn()  # warm-up: lazy loads, cached positions
                times = time_interleaved(found, device, args.repeats, warm_below_s=WARM_BELOW_S)
                stats = {name: pick(t, args.stat) for name, t in times.items()}
                fastest = min(stats.values())
                params = {"op": op, "shape": shape_text, "tokens": args.tokens, "dtype": args.dtype,
                          "density": density, "n": n, "threads": threads, "backend": ops.backend_for(device),
                          "isa": isa}
                for name, t in times.items():
                    run.add(params, name, t, args.stat, x_fastest=round(stats[name] / fastest, 3))
                cells = [f"{fmt_ms(s)} ({s / fastest:.2f}×)" for s in stats.values()]
                lines.append([op, shape_text, f"{density:.1e}", f"{n:,}", *cells])
                print("  ".join(map(str, lines[-1])), flush=True)
    names = list(found)
    print(f"\n{args.stat} ms of {args.repeats} interleaved rounds (× the fastest variant)\n")
    print(markdown_table(["op", "shape", "density", "n", *names], lines))
    run.report(not args.no_report)


if __name__ == "__main__":
    main()
