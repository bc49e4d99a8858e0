"""The sparse update step: one optimizer step on the n trainable values of one weight, plus the merged weight write.

    python benchmarks/bench_update.py                               # CPU, fp32, 4096x14336, n = 1e3 .. 1e7
    python benchmarks/bench_update.py --device cuda                 # GPU: fp32 and bf16 weights
    python benchmarks/bench_update.py --ns 1e5,1e6 --dtypes bfloat16

Methods (all do the same math: AdamW with decoupled weight decay on the fp32 delta, then
weight[r_k, c_k] = weight dtype(fp32(base_k) + delta_k) for the n masked positions):
  MaskedAdamW          randmask.optim.MaskedAdamW.step(): on CUDA one fused Triton pass (AdamW + the weight write,
                       positions computed from the key, no index tensors); on CPU torch's fused AdamW kernel (the
                       one AdamW(fused=True) runs), then the native sparse write (or, without the native library,
                       torch's single-tensor AdamW ops and an index_put with the layer's cached positions).
  AdamW(fused)+index   torch.optim.AdamW(fused=True) on the deltas, then weight.index_put_((rows, cols), merged) with
                       cached int64 positions: what one would write without the fused kernel.
  AdamW(foreach)+index torch.optim.AdamW(foreach=True), then the same index_put_.
  AdamW(fused)+sync    torch.optim.AdamW(fused=True) on a MaskedLinear's delta; randmask's optimizer step hook then
                       syncs the layer (randmask.ops.sparse_update_many: Triton / native kernel with positions
                       inline, or the torch twin), which is what a randmask user gets with a stock optimizer.
The index_put methods' cached positions cost 16 bytes per value of extra memory; the fused Triton kernel needs none.

One weight of --shape (default 4096x14336, Llama-3-8B's down_proj), grad fixed, lr 1e-3, weight decay 0.01.
Timing: methods are interleaved round by round in a shuffled order (a load spike on a shared machine hits all of them
alike), median of --repeats rounds (at least 30 when a step is under 5 ms), after --warmup steps; CUDA is synchronized
around each step.
Appends a row per (dtype, n, method) to the results dataset, then writes the run's table and plot.
"""
import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Run, add_results_argument, time_interleaved  # noqa: E402

METHODS = ["MaskedAdamW", "AdamW(fused)+index", "AdamW(foreach)+index", "AdamW(fused)+sync"]
HYPER = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
FAST_STEP_S = 0.005
FAST_ROUNDS = 30


def build_steps(weight, n, device):
    """method name -> a zero-argument callable doing one step, for a MaskedLinear with n values over `weight`."""
    import torch
    import torch.nn as nn

    from randmask import MaskedLinear
    from randmask.optim import MaskedAdamW

    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=False)
    generator = torch.Generator(device=device).manual_seed(n)
    grad = torch.randn(n, device=device, generator=generator) * 1e-3
    steps, keep = {}, []

    # ours: the fused step
    layer = MaskedLinear.from_linear(linear, n=n, name="model.layers.0.mlp.down_proj")
    layer.delta.grad = grad.clone()
    opt = MaskedAdamW([layer.delta], **HYPER)
    steps["MaskedAdamW"] = opt.step
    keep += [layer, opt]

    # a stock AdamW on a plain delta, then index_put_ with cached positions
    rows, cols = layer.mask.positions(weight.device)
    base = layer.base
    for name, flags in (("AdamW(fused)+index", {"fused": True}), ("AdamW(foreach)+index", {"foreach": True})):
        delta = nn.Parameter(torch.zeros(n, device=device))
        delta.grad = grad.clone()
        stock = torch.optim.AdamW([delta], **HYPER, **flags)

        def step(stock=stock, delta=delta):
            stock.step()
            with torch.no_grad():
                weight.index_put_((rows, cols), (base.float() + delta).to(weight.dtype))

        steps[name] = step
        keep += [delta, stock]

    # a stock fused AdamW on a MaskedLinear's delta: randmask's step hook syncs the layer
    hooked = MaskedLinear.from_linear(linear, n=n, name="model.layers.0.mlp.down_proj")
    hooked.delta.grad = grad.clone()
    fused = torch.optim.AdamW([hooked.delta], **HYPER, fused=True)
    steps["AdamW(fused)+sync"] = fused.step
    keep += [hooked, fused]
    return steps, keep


def step_times(steps, device, warmup, repeats) -> dict:
    """{method: [seconds per round]}: the methods interleaved round by round in a shuffled order
    (harness.time_interleaved); when every step takes under FAST_STEP_S, at least FAST_ROUNDS rounds."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    times = time_interleaved(steps, device, min(3, repeats))
    if max(statistics.median(t) for t in times.values()) < FAST_STEP_S:
        repeats = max(repeats, FAST_ROUNDS)
    for name, more in time_interleaved(steps, device, repeats - min(3, repeats), seed=1).items():
        times[name] += more
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cuda: MaskedAdamW runs its Triton kernel)")
    parser.add_argument("--shape", default="4096x14336", help="OUTxIN of the weight")
    parser.add_argument("--ns", default="1e3,1e4,1e5,1e6,1e7", help="comma-separated trainable counts")
    parser.add_argument("--dtypes", default=None,
                        help="comma-separated weight dtypes (default: float32 on cpu, float32,bfloat16 on cuda)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps of each method first")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds (one step of each method per round)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (and the native kernels'); 0: torch's default. On a shared machine "
                             "--threads 1 avoids OpenMP barriers stalling on a descheduled thread")
    add_results_argument(parser)
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    from randmask import ops

    device = torch.device(args.device)
    dtypes = (args.dtypes or ("float32,bfloat16" if device.type == "cuda" else "float32")).split(",")
    shape = tuple(int(v) for v in args.shape.lower().split("x"))
    threads = torch.get_num_threads() if device.type == "cpu" else None
    backend = ops.backend_for(device)
    path = {"triton": "the fused Triton kernel (one launch per weight dtype)",
            "native": "torch's fused AdamW kernel, then the native sparse write",
            "torch": "the torch twin (AdamW ops + index_put, cached positions)"}[backend]
    run = Run("update", device, f"{args.shape}" + (f"_{threads}t" if threads else ""), args.results, tag=args.tag)
    print(f"{run.base['machine']}, backend {backend}; run {run.id}", flush=True)
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        weight = torch.randn(shape, device=device, generator=torch.Generator(device=device).manual_seed(0)).to(dtype)
        for n in (int(float(v)) for v in args.ns.split(",")):
            steps, keep = build_steps(weight, n, device)
            times = step_times(steps, device, args.warmup, args.repeats)
            params = {"shape": args.shape, "dtype": dtype_name, "n": n, "threads": threads, "backend": backend,
                      "path": path, "hyper": HYPER}
            rows = {m: run.add(params, m, times[m]) for m in METHODS}
            print(f"  {dtype_name:8s} n {n:>10,} " + "  ".join(f"{m} {rows[m]['s'] * 1e3:.3f} ms" for m in METHODS),
                  flush=True)
            del steps, keep
    run.report(not args.no_report)


if __name__ == "__main__":
    main()
