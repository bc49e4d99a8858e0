"""Which attention implementation `randmask finetune` should run on this device: torch's fused SDPA kernel or the
plain matrix products transformers calls "eager", for the recipe's training step and its evaluation pass.

    python benchmarks/bench_attention.py                       # the default task and model, bf16 and fp32
    python benchmarks/bench_attention.py --dtypes bfloat16 --steps 16 --rounds 5

Prepares the task as `randmask finetune` does (randmask.recipes.finetune.prepare_task at each --dtypes), applies
randmask at the default trainable ratio and, per round, times --steps training steps (the recipe's batches, loss and
MaskedAdamW) and one evaluation pass over --max-eval test examples under each implementation in turn (the order
alternates by round; the first round is a warm-up and not counted). Prints a markdown table of the medians and the
ratio eager / sdpa, with the machine; nothing is written.
"""
import argparse
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import machine_name  # noqa: E402

IMPLEMENTATIONS = ("sdpa", "eager")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="local Hugging Face model directory (default: finetune's)")
    parser.add_argument("--data", help="data file (default: finetune's tweets)")
    parser.add_argument("--dtypes", default="bfloat16,float32", help="compute dtypes to compare at (default both)")
    parser.add_argument("--steps", type=int, default=8, help="training steps timed per round (default 8)")
    parser.add_argument("--max-eval", type=int, default=128, help="test examples in the evaluation pass (default 128)")
    parser.add_argument("--rounds", type=int, default=4, help="rounds, the first a warm-up (default 4)")
    args = parser.parse_args(argv)
    if args.rounds < 2 or args.steps < 1:
        parser.error("--rounds must be at least 2 (the first is a warm-up) and --steps at least 1")
    import torch

    from randmask.recipes import finetune as F
    from randmask.recipes import train as T

    rows = []
    for dtype in args.dtypes.split(","):
        settings = F.Settings(model=args.model, data=args.data, dtype=dtype, max_eval=args.max_eval, progress=False)
        task = F.prepare_task(settings, log=lambda *a: None)
        model, params, _ = T.apply_method(task.model, "randmask", task.settings, log=lambda *a: None)
        optimizer = T.make_optimizer("randmask", params, 1e-3)
        order = T.train_batches(task.enc["train"], settings.batch_size, random.Random(0), True)
        batches = [[task.enc["train"][i] for i in batch] for batch in order[:args.steps]]
        seconds = {(impl, part): [] for impl in IMPLEMENTATIONS for part in ("step", "eval")}
        for round_ in range(args.rounds):
            for impl in IMPLEMENTATIONS[::1 if round_ % 2 else -1]:
                model.set_attn_implementation(impl)
                t0 = time.perf_counter()
                for batch in batches:
                    T.batch_loss(model, batch, task.pad).backward()
                    optimizer.step()
                    optimizer.zero_grad()
                t1 = time.perf_counter()
                T.evaluate(model, task.enc["test"], settings.eval_batch_size, task.pad)
                if round_:
                    seconds[impl, "step"].append((t1 - t0) / len(batches))
                    seconds[impl, "eval"].append(time.perf_counter() - t1)
        median = {key: statistics.median(values) for key, values in seconds.items()}
        rows.append((task.settings.dtype, median))
        device = task.settings.device
        del model, task
    print(f"machine: {machine_name(device)}; "
          f"{torch.get_num_threads()} threads; {args.steps} training steps (batch {F.Settings().batch_size}) and "
          f"{args.max_eval} test examples per round; median of {args.rounds - 1} rounds")
    print("\n| dtype | training step, sdpa | eager | eager / sdpa | evaluation pass, sdpa | eager | eager / sdpa |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for dtype, m in rows:
        print(f"| {dtype} | {1000 * m['sdpa', 'step']:.0f} ms | {1000 * m['eager', 'step']:.0f} ms | "
              f"{m['eager', 'step'] / m['sdpa', 'step']:.2f}x | {m['sdpa', 'eval']:.2f} s | "
              f"{m['eager', 'eval']:.2f} s | {m['eager', 'eval'] / m['sdpa', 'eval']:.2f}x |")


if __name__ == "__main__":
    main()
