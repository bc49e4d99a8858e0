"""Where the evaluation pass of `randmask finetune` spends its time, and which batch size suits it.

    python benchmarks/profile_eval.py                        # the default task and model, 256 test examples
    python benchmarks/profile_eval.py --max-eval 1000 --batch-sizes 16,32,64

Prepares the task exactly as `randmask finetune` does (randmask.recipes.finetune.prepare_task: model, dtype,
threads, encoded test split; --model and --data as there), times randmask.recipes.train.evaluate on the test items
at each batch size (--rounds interleaved rounds, the median reported), then profiles one pass at the finetune
default batch size and groups the ops' self CPU time: matrix products, attention, everything else. Prints a
markdown table and the machine; nothing is written.
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import machine_name  # noqa: E402

GROUPS = (("matrix products", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")),
          ("attention", ("aten::_scaled_dot_product",)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="local Hugging Face model directory (default: finetune's)")
    parser.add_argument("--data", help="data file (default: finetune's tweets)")
    parser.add_argument("--max-eval", type=int, default=256, help="test examples evaluated (default 256)")
    parser.add_argument("--batch-sizes", default="8,16,32,64,128", help="evaluation batch sizes to time")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds over the batch sizes")
    args = parser.parse_args(argv)
    import torch
    from torch.profiler import ProfilerActivity, profile

    from randmask.recipes import finetune as F
    from randmask.recipes import train as T

    settings = F.Settings(model=args.model, data=args.data, max_eval=args.max_eval, progress=False)
    task = F.prepare_task(settings, log=lambda *a: None)
    items, model = task.enc["test"], task.model
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    T.evaluate(model, items, sizes[0], task.pad)  # warm-up
    seconds = {b: [] for b in sizes}
    for _ in range(args.rounds):
        for b in sizes:
            t0 = time.perf_counter()
            T.evaluate(model, items, b, task.pad)
            seconds[b].append(time.perf_counter() - t0)
    default = F.Settings().eval_batch_size
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        T.evaluate(model, items, default, task.pad)
    totals = {}
    for event in prof.key_averages():
        group = next((g for g, prefixes in GROUPS if event.key.startswith(prefixes)), "everything else")
        totals[group] = totals.get(group, 0.0) + event.self_cpu_time_total
    whole = sum(totals.values()) or 1.0
    lengths = sorted(len(it["prompt"]) for it in items)
    print(f"machine: {machine_name(settings.device)}; {torch.get_num_threads()} threads; model "
          f"{os.path.basename(task.model_dir)} in {settings.dtype}; {len(items)} test examples, prompt tokens median "
          f"{lengths[len(lengths) // 2]}, at most {lengths[-1]}")
    print("\n| eval batch size | ms per example (median of rounds) | vs the default |")
    print("|---:|---:|---:|")
    base = statistics.median(seconds[default]) if default in seconds else None
    for b in sizes:
        med = statistics.median(seconds[b])
        print(f"| {b}{' (default)' if b == default else ''} | {1000 * med / len(items):.1f} | "
              + (f"{med / base:.2f}x |" if base else "- |"))
    print(f"\n| one pass at batch {default}: self CPU time | share |")
    print("|---|---:|")
    for group, _ in (*GROUPS, ("everything else", ())):
        print(f"| {group} | {100 * totals.get(group, 0.0) / whole:.0f}% |")


if __name__ == "__main__":
    main()
