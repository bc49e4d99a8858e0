"""Host cost per layer: what one layer's forward + backward and one optimizer step cost when the arithmetic is tiny.

    python benchmarks/bench_overhead.py                  # CPU
    python benchmarks/bench_overhead.py --device cuda    # GPU: Python + launch cost per op, the GPU nearly idle
    python benchmarks/bench_overhead.py --device cuda --backends triton,cuda   # Triton vs CUDA C++ launches

A 1B model at 4 x 128 tokens is host-bound on a GPU (measured on an H200: 11 ms of GPU work in a 74 ms step), so
every op's Python and launch cost decides the step time there. This measures it on one 64 x 64 layer with 8 tokens,
where the kernels themselves take microseconds:
  frozen             nn.Linear, weight frozen, input gradient computed (the floor)
  masked             MaskedLinear (n = 4): forward + backward (the masked-gradient kernel)
  lora               nn.Linear + B(A(x)) * scale, r = 8 (what PEFT's LoRA layer computes)
  masked_grad        the masked gradient alone (randmask.functional.masked_grad, the default backend)
  sync               the merged-weight write alone (MaskedLinear.sync: one sparse-update kernel)
  AdamW+sync         torch.optim.AdamW step on the delta, then randmask's step hook syncs the layer
  MaskedAdamW        randmask.optim.MaskedAdamW step (on a GPU one fused launch that also writes the weight)
  AdamW (lora)       torch.optim.AdamW step on LoRA's two matrices
  ... x32            the two randmask steps on 32 such layers at once (a 16-layer model's q and v): on a GPU one
                     launch for all the layers' writes where the single-layer cases make one each
Microseconds per call: the minimum over --rounds rounds of --calls calls each (synchronized once per round, so
launches overlap as they do in training). With --backends, the randmask cases are measured under each
RANDMASK_BACKEND in turn (frozen, lora and AdamW (lora) do not depend on it and are measured once).
Writes benchmarks/results/overhead_<device>.{md,json,png}.
"""
import argparse
import os
import sys
import textwrap
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_name, markdown_table, synchronize, write_results  # noqa: E402

from randmask import MaskedAdamW, MaskedLinear  # noqa: E402
from randmask.backend import kernel_backend  # noqa: E402
from randmask.functional import masked_grad  # noqa: E402


def per_call_us(fn, device, calls, rounds):
    fn()
    synchronize(device)
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        synchronize(device)
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e6


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
        "masked_grad": lambda: masked_grad(x2d, grad_y, masked.mask),
        "sync": masked.sync,
        "AdamW+sync": adamw.step,
        "MaskedAdamW": masked_adamw.step,
        "AdamW (lora)": lora_adamw.step,
        "AdamW+sync x32": adamw32.step,
        "MaskedAdamW x32": masked_adamw32.step,
    }


def plot(data, path):
    """Horizontal bars: µs per call of every case (and backend), the frozen layer's forward + backward marked."""
    import matplotlib.pyplot as plt

    names, values = list(data["us"]), list(data["us"].values())
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(names) + 1.2))
    ax.barh(names, values, color=["tab:gray" if name in BACKEND_FREE else "tab:red" for name in names])
    ax.axvline(data["us"]["frozen"], color="black", linewidth=0.8, linestyle="--", label="frozen fwd+bwd")
    ax.invert_yaxis()
    ax.set_xlabel("µs per call (host)")
    ax.legend(fontsize=8)
    ax.set_title("\n".join(textwrap.wrap(data["title"], 90)), fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--calls", type=int, default=300, help="calls per round")
    parser.add_argument("--rounds", type=int, default=7, help="rounds; the fastest one counts")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: steadier)")
    parser.add_argument("--backends", default="",
                        help="comma-separated RANDMASK_BACKEND values to compare (default: the default backend only)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows, us = [], {}
    for backend in args.backends.split(",") if args.backends else [None]:
        if backend:
            os.environ["RANDMASK_BACKEND"] = backend
        label = kernel_backend(device)  # raises here, before any timing, for a backend this machine lacks
        for name, fn in cases(device).items():
            if name in BACKEND_FREE and name in us:
                continue
            key = name if name in BACKEND_FREE else f"{name} [{label}]"
            us[key] = per_call_us(fn, device, args.calls, args.rounds)
            rows.append([name, "–" if name in BACKEND_FREE else label, f"{us[key]:.1f}",
                         f"{us[key] / us['frozen']:.2f}"])
    title = (f"Host cost per call, {machine_name(device)}; 64x64 layer, 8 tokens, n = 4; min over {args.rounds} "
             f"rounds of {args.calls} calls")
    markdown = f"{title}\n\n" + markdown_table(["case", "backend", "µs per call", "× frozen fwd+bwd"], rows)
    print(markdown)
    write_results(f"overhead_{device.type}", {"title": title, "us": us, "args": vars(args)}, markdown, plot)


if __name__ == "__main__":
    main()
