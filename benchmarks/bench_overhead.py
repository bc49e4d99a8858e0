"""Host cost per layer: what one layer's forward + backward and one optimizer step cost when the arithmetic is tiny.

    python benchmarks/bench_overhead.py                  # CPU
    python benchmarks/bench_overhead.py --device cuda    # GPU: Python + launch cost per op, the GPU nearly idle
    python benchmarks/bench_overhead.py --backends native,torch   # the randmask cases on each backend in turn

A 1B model at 4 x 128 tokens is host-bound on a GPU (11 ms of GPU work in a 74 ms step, BENCHMARKS.md), so every
op's Python and launch cost decides the step time there. This measures it on one 64 x 64 layer with 8 tokens, where
the kernels themselves take microseconds:
  frozen             nn.Linear, weight frozen, input gradient computed (the floor)
  masked             MaskedLinear (n = 4): forward + backward (the masked-gradient kernel)
  lora               nn.Linear + B(A(x)) * scale, r = 8 (what PEFT's LoRA layer computes)
  masked_grad        the masked gradient alone (randmask.ops.masked_grad, as the backward calls it)
  sync               the merged-weight write alone (MaskedLinear.sync: one sparse-update kernel)
  AdamW+sync         torch.optim.AdamW step on the delta, then randmask's step hook syncs the layer
  MaskedAdamW        randmask.optim.MaskedAdamW step (on a GPU one fused launch that also writes the weight)
  AdamW (lora)       torch.optim.AdamW step on LoRA's two matrices
  ... x32            the two randmask steps on 32 such layers at once (a 16-layer model's q and v): on a GPU one
                     launch for all the layers' writes where the single-layer cases make one each
Microseconds per call: the minimum over --rounds rounds of --calls calls each (synchronized once per round, so
launches overlap as they do in training). With --backends, the randmask cases are measured under each backend in
turn (randmask.use_backend; frozen, lora and AdamW (lora) call no randmask kernel and are measured once).
Appends a row per (case, backend) to the results dataset, then writes the run's table and plot.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Run, add_results_argument, synchronize  # noqa: E402

import randmask  # noqa: E402
from randmask import MaskedAdamW, MaskedLinear, ops  # noqa: E402


def per_call_seconds(fn, device, calls, rounds) -> list:
    """Seconds per call of each round of `calls` calls (one synchronization per round)."""
    fn()
    synchronize(device)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        synchronize(device)
        times.append((time.perf_counter() - start) / calls)
    return times


BACKEND_FREE = ("frozen", "lora", "AdamW (lora)")  # cases that call no randmask kernel


def cases(device):
    """name -> zero-argument callable."""
    torch.manual_seed(0)
    x = torch.randn(8, 64, device=device, requires_grad=True)
    frozen = torch.nn.Linear(64, 64, device=device).requires_grad_(False)
    masked = MaskedLinear.from_linear(torch.nn.Linear(64, 64, device=device), n=4, name="bench.overhead")
    lora_a = torch.nn.Linear(64, 8, bias=False, device=device)
    lora_b = torch.nn.Linear(8, 64, bias=False, device=device)
    adamw = torch.optim.AdamW([masked.delta], lr=1e-3)
    masked_adamw = MaskedAdamW([masked.delta], lr=1e-3)
    lora_adamw = torch.optim.AdamW([lora_a.weight, lora_b.weight], lr=1e-3)
    masked.delta.grad = torch.randn(4, device=device)
    lora_a.weight.grad, lora_b.weight.grad = torch.randn_like(lora_a.weight), torch.randn_like(lora_b.weight)
    x2d, grad_y = torch.randn(8, 64, device=device), torch.randn(8, 64, device=device)
    layers = [MaskedLinear.from_linear(torch.nn.Linear(64, 64, device=device), n=4, name=f"bench.overhead.{i}")
              for i in range(32)]
    for layer in layers:
        layer.delta.grad = torch.randn(4, device=device)
    adamw32 = torch.optim.AdamW([layer.delta for layer in layers], lr=1e-3)
    masked_adamw32 = MaskedAdamW([layer.delta for layer in layers], lr=1e-3)

    def backward(y):
        y.sum().backward()

    return {
        "frozen": lambda: backward(frozen(x)),
        "masked": lambda: backward(masked(x)),
        "lora": lambda: backward(frozen(x) + lora_b(lora_a(x)) * 2.0),
        "masked_grad": lambda: ops.masked_grad(x2d, grad_y, masked.mask),
        "sync": masked.sync,
        "AdamW+sync": adamw.step,
        "MaskedAdamW": masked_adamw.step,
        "AdamW (lora)": lora_adamw.step,
        "AdamW+sync x32": adamw32.step,
        "MaskedAdamW x32": masked_adamw32.step,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--calls", type=int, default=300, help="calls per round")
    parser.add_argument("--rounds", type=int, default=7, help="rounds; the fastest one counts")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: steadier)")
    parser.add_argument("--backends", default="",
                        help="comma-separated randmask backends (torch, triton, native) to compare; default: the "
                             "device's default backend only")
    add_results_argument(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    backends = [b for b in args.backends.split(",") if b] or [None]
    for backend in backends:  # fail here, before any timing, on a backend this machine cannot run
        if backend and ops.available_backends(device)[backend]:
            parser.error(f"backend {backend}: {ops.available_backends(device)[backend]}")
    run = Run("overhead", device, f"{args.threads}t" if device.type == "cpu" else "", args.results, tag=args.tag)
    print(f"{run.base['machine']}; run {run.id}", flush=True)
    done = set()
    for backend in backends:
        with randmask.use_backend(backend):
            label = ops.backend_for(device)
            for name, fn in cases(device).items():
                if name in BACKEND_FREE and name in done:
                    continue
                done.add(name)
                params = {"layer": "64x64", "tokens": 8, "n": 4, "calls": args.calls, "rounds": args.rounds,
                          "threads": args.threads, "backend": None if name in BACKEND_FREE else label}
                row = run.add(params, name, per_call_seconds(fn, device, args.calls, args.rounds), "min")
                print(f"  {name:16s} {params['backend'] or '–':7s} {row['s'] * 1e6:9.1f} µs", flush=True)
    run.report(not args.no_report)


if __name__ == "__main__":
    main()
