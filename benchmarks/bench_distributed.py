"""randmask on several processes: one process against 2 (or more) ranks under torchrun, DDP-style (every rank keeps
the model; the deltas' gradients averaged) and FSDP2 (randmask.distributed.fully_shard: the frozen base sharded per
decoder layer, the deltas whole on every rank), on one Llama-shaped model built from a config, q,v at
trainable_ratio 0.01%, randmask.MaskedAdamW, the same global batch split across the ranks.

    python benchmarks/bench_distributed.py                        # 135M shape, fp32, CPU, ranks 1 and 2
    python benchmarks/bench_distributed.py --device cuda --dtype bfloat16 --ranks 1,2,4

Reports, per configuration, the step time (the slowest rank's median; on a CPU the ranks share its cores: each gets
cores / ranks threads), each rank's peak memory (the largest; on the CPU its peak RSS, which includes the full model
a rank builds before sharding it, so the base each rank holds afterwards is reported beside it) and the frozen base
bytes a rank holds after sharding. Appends a row per configuration to the results dataset (bench "distributed").
"""
import argparse
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_e2e import SHAPES, build_model  # noqa: E402
from harness import Run, add_results_argument, synchronize  # noqa: E402


def worker(args) -> None:
    """One rank (or the single process): build, mask, distribute, time the steps, print a JSON line."""
    import torch

    import randmask

    ranks, rank = 1, 0
    if args.mode != "single":
        import torch.distributed as dist

        import randmask.distributed

        dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
        ranks, rank = dist.get_world_size(), dist.get_rank()
        if args.device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if args.device == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // ranks))
    model = build_model(args)
    randmask.apply(model, randmask.RandMaskConfig(trainable_ratio=1e-4, target_modules=("q_proj", "v_proj")))
    if args.mode == "fsdp":
        randmask.distributed.fully_shard(model, model.model.layers)
    elif args.mode == "ddp":
        randmask.distributed.average_gradients([p for p in model.parameters() if p.requires_grad])
    held = sum((p.to_local() if hasattr(p, "to_local") else p).numel() * p.element_size()
               for p in model.parameters() if not p.requires_grad)
    opt = randmask.MaskedAdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    per_rank = args.batch // ranks
    gen = torch.Generator().manual_seed(1)
    batch = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=gen)
    batch = batch[rank * per_rank:(rank + 1) * per_rank].to(args.device)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(args.warmup + args.steps):
        synchronize(args.device)
        start = time.perf_counter()
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        synchronize(args.device)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if args.device == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with open(os.path.join(args.result_dir, f"rank{rank}.json"), "w") as f:  # ranks share torchrun's stdout
        json.dump({"rank": rank, "steps_s": times, "peak_bytes": peak, "base_bytes": held}, f)
    if args.mode != "single":
        del model, opt  # the FSDP state that holds the process group, freed before it is destroyed
        randmask.distributed.stop()


def launch(args, ranks: int, mode: str) -> list[dict]:
    """Run one configuration; the JSON line of every rank."""
    here = os.path.abspath(__file__)
    with tempfile.TemporaryDirectory() as result_dir:
        common = ["--worker", "--mode", mode, "--shape", args.shape, "--dtype", args.dtype, "--device", args.device,
                  "--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps),
                  "--warmup", str(args.warmup), "--result-dir", result_dir]
        command = [sys.executable, here, *common] if mode == "single" else \
            [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", here,
             *common]
        done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if done.returncode:
            raise SystemExit(f"{mode} on {ranks} ranks failed:\n{done.stderr[-12000:]}")
        return [json.loads(path.read_text()) for path in sorted(pathlib.Path(result_dir).glob("rank*.json"))]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=SHAPES, default="135m", help="model shape (LlamaConfig), default 135m")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch", type=int, default=4, help="global batch (sequences), split across the ranks")
    parser.add_argument("--seq", type=int, default=128, help="tokens a sequence (default 128)")
    parser.add_argument("--ranks", default="1,2", help="comma-separated rank counts; 1 is the plain single process")
    parser.add_argument("--modes", default="ddp,fsdp", help="comma-separated: ddp, fsdp (for rank counts above 1)")
    parser.add_argument("--one-rank-too", action="store_true",
                        help="also run --modes on one rank under torchrun (on one GPU: the FSDP path's cost over the "
                        "plain process)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="single", help=argparse.SUPPRESS)
    parser.add_argument("--result-dir", help=argparse.SUPPRESS)
    parser.add_argument("--quantize", default="none", help=argparse.SUPPRESS)  # build_model reads it
    add_results_argument(parser)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    run = Run("distributed", args.device, f"{args.shape}_{args.dtype}", args.results, tag=args.tag)
    print(f"{run.base['machine']}, {args.shape} {args.dtype}; run {run.id}", flush=True)
    for ranks in map(int, args.ranks.split(",")):
        modes = args.modes.split(",")
        for mode in (["single", *(modes if args.one_rank_too else [])] if ranks == 1 else modes):
            got = launch(args, ranks, mode)
            slowest = max(got, key=lambda r: statistics.median(r["steps_s"]))
            row = run.add({"shape": args.shape, "dtype": args.dtype, "batch": args.batch, "seq": args.seq,
                           "ranks": ranks, "steps": args.steps, "warmup": args.warmup}, mode, slowest["steps_s"],
                          peak_bytes=max(r["peak_bytes"] for r in got), base_bytes=max(r["base_bytes"] for r in got))
            print(f"{ranks} rank(s) {mode:6s} step {row['s'] * 1e3:8.1f} ms  peak {row['peak_bytes'] / 2**20:8.1f} "
                  f"MiB  base held {row['base_bytes'] / 2**20:8.1f} MiB", flush=True)
    run.report(not args.no_report)


if __name__ == "__main__":
    main()
