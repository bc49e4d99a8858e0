"""Masked-gradient microbenchmark: the gather and dense variants (and the dispatcher) side by side, per density.

    python benchmarks/bench_masked_grad.py                  # CPU torch twins, SmolLM2-135M MLP shape, 512 tokens
    python benchmarks/bench_masked_grad.py --device cuda    # Triton kernels

Reports each variant's median time and the crossover density where dense starts to win; the dispatcher's constant
(DENSE_DENSITY_CPU / DENSE_DENSITY_GPU in kernels/masked_grad.py) should sit near it.
"""
import argparse
import statistics
import time

import torch

from randmask import layer_key, mask_positions
from randmask.kernels import masked_grad as op


def median_seconds(fn, device, repeats):
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-features", type=int, default=1536)
    parser.add_argument("--in-features", type=int, default=576)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--densities", default="1e-4,1e-3,3e-3,1e-2,2e-2,3e-2,5e-2,1e-1,2e-1")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    shape = (args.out_features, args.in_features)
    x = torch.randn(args.tokens, args.in_features, device=device, dtype=dtype)
    grad_y = torch.randn(args.tokens, args.out_features, device=device, dtype=dtype)
    key = layer_key(0, "bench")
    print(f"{device} {shape} tokens={args.tokens} {args.dtype}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'density':>8} {'n':>9} {'gather ms':>10} {'dense ms':>9} {'dispatch ms':>11}  winner")
    crossover = None
    for density in map(float, args.densities.split(",")):
        n = round(density * shape[0] * shape[1])
        if device.type == "cuda":
            variants = {"gather": lambda: op.masked_grad_gather_triton(x, grad_y, n, key),
                        "dense": lambda: op.masked_grad_dense_triton(x, grad_y, n, key),
                        "dispatch": lambda: op.masked_grad_triton(x, grad_y, n, key)}
        else:
            rows, cols = mask_positions(shape, n, key, device)
            variants = {"gather": lambda: op.masked_grad_gather_torch(x, grad_y, rows, cols),
                        "dense": lambda: op.masked_grad_dense_torch(x, grad_y, rows, cols),
                        "dispatch": lambda: op.masked_grad_torch(x, grad_y, rows, cols)}
        ms = {name: 1e3 * median_seconds(fn, device, args.repeats) for name, fn in variants.items()}
        winner = min(("gather", "dense"), key=ms.get)
        if winner == "dense" and crossover is None:
            crossover = density
        print(f"{density:8.0e} {n:9d} {ms['gather']:10.2f} {ms['dense']:9.2f} {ms['dispatch']:11.2f}  {winner}")
    print(f"dense first wins at density {crossover}")


if __name__ == "__main__":
    main()
