"""Where one training step's time goes: torch.profiler over a few steps of one method of bench_e2e.py.

    python benchmarks/profile_step.py --method randmask --setting qv                       # CPU, 135M shape
    python benchmarks/profile_step.py --device cuda --shape 1b --dtype bfloat16 --method randmask --setting qv

Builds the same model, batch and optimizer as bench_e2e.py (benchmarks/bench_e2e.py's prepare), runs --warmup
steps, then profiles --steps steps and prints the ops by self time (device time on a GPU, CPU time otherwise) and the
step's wall time. Prints only; nothing is written.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_e2e import METHODS, SETTINGS, add_step_arguments, prepare  # noqa: E402
from common import machine_name, synchronize  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_step_arguments(parser)
    parser.add_argument("--method", default="randmask", choices=METHODS)
    parser.add_argument("--setting", default="qv", choices=SETTINGS)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rows", type=int, default=20, help="ops to list")
    args = parser.parse_args()
    import torch
    from torch.profiler import ProfilerActivity, profile

    model, step, trainable = prepare(args)
    for _ in range(args.warmup):
        step()
    synchronize(args.device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    synchronize(args.device)
    wall = (time.perf_counter() - start) / args.steps
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


if __name__ == "__main__":
    main()
