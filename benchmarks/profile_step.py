"""Where one training step's time goes: torch.profiler over a few steps of one method of bench_e2e.py.

    python benchmarks/profile_step.py --method randmask --setting qv                       # CPU, 135M shape
    python benchmarks/profile_step.py --device cuda --shape 1b --dtype bfloat16 --method randmask --setting qv
    python benchmarks/profile_step.py --method randmask --setting all-linear --masked-grad-calls

Builds the same model, batch and optimizer as bench_e2e.py (benchmarks/bench_e2e.py's prepare), runs --warmup
steps, then profiles --steps steps and prints the ops by self time (device time on a GPU, CPU time otherwise) and the
step's wall time; the profile is printed only. --masked-grad-calls (randmask) instead times each masked-gradient
call inside the unprofiled steps, per matrix shape: a kernel called inside a training step can run slower than the
same call in a microbenchmark (cold inputs, the machine's load). Those times are appended to the results dataset
(bench step_masked_grad, a row per shape: every call's seconds) and reported.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_e2e import METHODS, SETTINGS, add_step_arguments, prepare  # noqa: E402
from harness import Run, add_results_argument, machine_name, synchronize  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_step_arguments(parser)
    parser.add_argument("--method", default="randmask", choices=METHODS)
    parser.add_argument("--setting", default="qv", choices=SETTINGS)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rows", type=int, default=20, help="ops to list")
    parser.add_argument("--masked-grad-calls", action="store_true",
                        help="time the masked-gradient calls inside the steps (per shape) instead of profiling")
    add_results_argument(parser)
    args = parser.parse_args()
    from torch.profiler import ProfilerActivity, profile

    if args.masked_grad_calls and args.method != "randmask":
        parser.error("--masked-grad-calls times randmask's masked gradient: use it with --method randmask")
    model, step, trainable = prepare(args)
    if args.masked_grad_calls:
        time_masked_grad_calls(args, step)
        return
    wall = timed_steps(args, step)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            step()
        synchronize(args.device)
    key = "self_cuda_time_total" if args.device.startswith("cuda") else "self_cpu_time_total"
    print(f"{machine_name(args.device)}; {args.shape} {args.dtype}, {args.method} {args.setting}, "
          f"{sum(p.numel() for p in trainable):,} trainable; {wall * 1e3:.1f} ms per step (unprofiled); "
          f"profile of {args.steps} steps:")
    print(prof.key_averages().table(sort_by=key, row_limit=args.rows, max_name_column_width=60))
    if args.device.startswith("cuda"):  # launch-bound steps: the host side shows where the Python time goes
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows,
                                        max_name_column_width=60))


def timed_steps(args, step, after_warmup=None) -> float:
    """Seconds per step over --steps steps, after --warmup untimed ones (and after_warmup(), if given)."""
    for _ in range(args.warmup):
        step()
    if after_warmup is not None:
        after_warmup()
    synchronize(args.device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    synchronize(args.device)
    return (time.perf_counter() - start) / args.steps


def time_masked_grad_calls(args, step):
    """Wall time of every masked-gradient call in --steps steps (after --warmup), per (out, in) shape."""
    import randmask.layer as layer

    eager = layer._masked_grad_eager  # what MaskedLinearFunction.backward calls in eager mode
    seconds = {}

    def timed(x, grad_y, n, signed_key):
        start = time.perf_counter()
        g = eager(x, grad_y, n, signed_key)
        synchronize(args.device)
        seconds.setdefault((grad_y.shape[1], x.shape[1]), []).append(time.perf_counter() - start)
        return g

    layer._masked_grad_eager = timed
    try:
        wall = timed_steps(args, step, after_warmup=seconds.clear)
    finally:
        layer._masked_grad_eager = eager
    run = Run("step_masked_grad", args.device, f"{args.shape}_{args.dtype}_{args.setting}", args.results, tag=args.tag)
    for shape in sorted(seconds):
        run.add({"shape": f"{shape[0]}x{shape[1]}", "model": args.shape, "dtype": args.dtype, "setting": args.setting,
                 "batch": args.batch, "seq": args.seq, "calls_per_step": len(seconds[shape]) // args.steps},
                "in-step call", seconds[shape], step_s=wall)
    print(f"{machine_name(args.device)}; {args.shape} {args.dtype}, randmask {args.setting}: {wall * 1e3:.1f} ms per "
          f"step, of which masked-gradient calls {sum(map(sum, seconds.values())) / args.steps * 1e3:.1f} ms")
    print("| shape (out x in) | calls per step | ms per call (median) |\n|---|---|---|")
    for row in run.rows:
        print(f"| {row['params']['shape']} | {row['params']['calls_per_step']} | {row['s'] * 1e3:.3f} |")
    run.report(not args.no_report)


if __name__ == "__main__":
    main()
