"""End-to-end training step: randmask against full fine-tuning, the frozen floor, PEFT LoRA, PEFT SHiRA and the naive
dense-masked model, on one Llama-shaped model built from a config, same batch, same targets, equal trainable counts.

    python benchmarks/bench_e2e.py                       # SmolLM2-135M shape, fp32, CPU, batch 4 x 128
    python benchmarks/bench_e2e.py --shape 1b --dtype bfloat16 --device cuda

Each method runs in its own process (so peak memory is its own): warm-up steps, then the median of timed steps of
forward + backward + AdamW step (randmask: randmask.MaskedAdamW, the README's optimizer, AdamW with the merged-weight
write fused in; every other method: torch.optim.AdamW with its defaults); --rounds repeats all methods interleaved
and keeps each one's fastest round. The
frozen floor (every weight frozen, input gradients still computed: the work no method can avoid) and full
fine-tuning do not depend on the targets: each round runs them once and every setting's table shows that run.
Reports step time and peak memory as ratios to LoRA and to the frozen floor, and the adapter file size.
Appends a row per (setting, method, round) to the results dataset (frozen and full with setting null: they belong to
every setting), then writes the run's tables and plot.

    python benchmarks/bench_e2e.py --one-process --methods frozen,randmask,lora,shira --steps 30 --warmup 3

builds the methods in this one process instead and interleaves their steps, one step of each per round in a
shuffled order, so that a shared machine's drift (on the 2-core CPU a step moves by 10-30% between processes)
hits them alike: step time only (peak memory needs a process each), the "by round" columns then per step; a row
per (setting, method) holds every step.
"""
import argparse
import json
import os
import pathlib
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Run, add_results_argument, synchronize  # noqa: E402

SHAPES = {  # LlamaConfig arguments
    "135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
}
SETTINGS = {  # name: (targets, what sets the trainable count)
    "qv": (["q_proj", "v_proj"], "randmask at trainable_ratio 0.01% of the model; LoRA/SHiRA r=8"),
    "all-linear": (["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                   "every method at LoRA r=8's count per matrix"),
}
METHODS = ["frozen", "randmask", "lora", "shira", "naive", "full"]
SETTING_FREE = ("frozen", "full")  # train nothing / everything whatever the targets: run once per round


def build_model(args):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**SHAPES[args.shape], max_position_embeddings=max(2048, args.seq))
    with torch.device(args.device):
        model = LlamaForCausalLM(config).to(getattr(torch, args.dtype))
    model.requires_grad_(False)
    return model


class NaiveMasked:
    """The official code's naive algorithm: W0 + D * M with D dense and trainable, M a dense 0/1 mask."""

    @staticmethod
    def apply(model, targets, counts):
        import torch
        import torch.nn as nn
        import torch.nn.utils.parametrize as parametrize

        from randmask import layer_key, mask_positions

        class AddMasked(nn.Module):
            def __init__(self, weight, n, key):
                super().__init__()
                mask = torch.zeros_like(weight, dtype=torch.bool)
                mask[mask_positions(tuple(weight.shape), n, key, weight.device)] = True
                self.register_buffer("mask", mask)
                self.dense = nn.Parameter(torch.zeros_like(weight))

            def forward(self, weight):
                return weight + self.dense * self.mask

        for name, module in list(model.named_modules()):
            if name in counts:
                parametrize.register_parametrization(module, "weight", AddMasked(module.weight, counts[name],
                                                                                 layer_key(0, name)))


def prepare(args):
    """(model, step, trainable parameters) for args.method / args.setting, on a fresh model."""
    import torch

    model = build_model(args)
    targets, _ = SETTINGS[args.setting]
    total = sum(p.numel() for p in model.parameters())
    linear = {name: m for name, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and name.split(".")[-1] in targets}
    lora_count = sum(8 * (m.in_features + m.out_features) for m in linear.values())
    adamw = torch.optim.AdamW
    if args.method == "frozen":
        model.enable_input_require_grads()  # the backward through every layer still runs
    elif args.method == "full":
        model.requires_grad_(True)
    elif args.method in ("lora", "shira"):
        from peft import LoraConfig, ShiraConfig, get_peft_model

        config = (LoraConfig(r=8, lora_alpha=16, target_modules=targets) if args.method == "lora"
                  else ShiraConfig(r=8, target_modules=targets, random_seed=0))
        model = get_peft_model(model, config)
    else:
        import randmask

        if args.setting == "qv":
            config = randmask.RandMaskConfig(trainable_ratio=1e-4, target_modules=targets)
        else:
            config = randmask.RandMaskConfig(trainable_ratio=lora_count / total, target_modules=targets)
        if args.method == "randmask":
            randmask.apply(model, config)
            adamw = randmask.MaskedAdamW
        else:
            NaiveMasked.apply(model, targets, {name: n for name, _, n in randmask.plan(model, config)})
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = adamw(trainable, lr=1e-4) if trainable else None
    gen = torch.Generator().manual_seed(1)
    batch = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=gen).to(args.device)

    forward = model if args.compile == "none" else torch.compile(model, mode=args.compile)

    def step():
        loss = forward(input_ids=batch, labels=batch).loss
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)

    return model, step, trainable


def run_method(args):
    """One method in this process: prints a JSON line with its measurements."""
    import torch

    model, step, trainable = prepare(args)
    adapter_bytes = None
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.steps):
        synchronize(args.device)
        start = time.perf_counter()
        step()
        synchronize(args.device)
        times.append(time.perf_counter() - start)
    if args.device == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if args.method in ("lora", "shira", "randmask"):
        with tempfile.TemporaryDirectory() as tmp:
            if args.method == "randmask":
                from randmask.adapter import save_adapter

                save_adapter(model, os.path.join(tmp, "adapter.safetensors"))
            else:
                model.save_pretrained(tmp)
            adapter_bytes = sum(f.stat().st_size for f in pathlib.Path(tmp).rglob("*.safetensors"))
    # every timed step too: whether a host-bound GPU step drifts within a process (the H200 read one method 1.7x
    # apart in two processes minutes apart) shows there
    print(json.dumps({"method": args.method, "step_s": statistics.median(times), "steps_s": times, "peak_bytes": peak,
                      "rss_growth_bytes": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) * 1024,
                      "trainable": sum(p.numel() for p in trainable), "adapter_bytes": adapter_bytes}))


def add_step_arguments(parser) -> None:
    """The options that define one training step (shared with profile_step.py)."""
    parser.add_argument("--shape", choices=SHAPES, default="135m", help="model shape (LlamaConfig), default 135m")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=4, help="sequences per step")
    parser.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--compile", default="none", choices=["none", "default", "reduce-overhead"],
                        help="torch.compile every method's forward + backward with this mode (reduce-overhead: CUDA "
                             "graphs; compile time falls in the warm-up steps): how much of a host-bound GPU step is "
                             "Python and launch cost. The AdamW step stays eager. Default none")


def run_one_process(args, setting, methods) -> dict:
    """{method: (trainable, [seconds per step])} for `methods` built in this process, their timed steps interleaved
    round by round."""
    steps, trainable, times = {}, {}, {}
    for method in methods:
        _, step, params = prepare(argparse.Namespace(**{**vars(args), "method": method, "setting": setting}))
        steps[method], trainable[method], times[method] = step, sum(p.numel() for p in params), []
    for _ in range(args.warmup):
        for method in methods:
            steps[method]()
    order, shuffle = list(methods), random.Random(0).shuffle
    for _ in range(args.steps):
        shuffle(order)
        for method in order:
            synchronize(args.device)
            start = time.perf_counter()
            steps[method]()
            synchronize(args.device)
            times[method].append(time.perf_counter() - start)
    return {method: (trainable[method], times[method]) for method in methods}


def run_in_process(args, method, setting):
    """One method's measurements from a fresh process (so its peak memory is its own), or None if it failed."""
    cmd = [sys.executable, __file__, "--method", method, "--setting", setting, "--shape", args.shape,
           "--dtype", args.dtype, "--device", args.device, "--batch", str(args.batch), "--seq", str(args.seq),
           "--warmup", str(args.warmup), "--steps", str(args.steps), "--compile", args.compile]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        print(f"{setting}/{method} failed:\n{out.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_step_arguments(parser)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2,
                        help="repeat every method this many times, interleaved; keep each method's fastest round")
    parser.add_argument("--settings", default="qv,all-linear", help="comma-separated: " + ", ".join(SETTINGS))
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated: " + ", ".join(METHODS))
    parser.add_argument("--one-process", action="store_true",
                        help="build every method in this process and interleave their steps (a round is one step "
                             "of each, in a shuffled order): steadier step-time ratios, no peak memory")
    parser.add_argument("--method", help=argparse.SUPPRESS)  # internal: run one method in this process
    parser.add_argument("--setting", help=argparse.SUPPRESS)
    add_results_argument(parser)
    args = parser.parse_args()
    if args.method:
        return run_method(args)
    table = (f"{args.shape}_{args.dtype}" + ("" if args.compile == "none" else f"_compile-{args.compile}")
             + ("_one-process" if args.one_process else ""))
    run = Run("e2e", args.device, table, args.results, tag=args.tag)
    print(f"{run.base['machine']}, {table}; run {run.id}", flush=True)
    base = {"shape": args.shape, "dtype": args.dtype, "batch": args.batch, "seq": args.seq, "compile": args.compile,
            "mode": "one-process" if args.one_process else "processes", "warmup": args.warmup, "steps": args.steps}
    settings, methods = args.settings.split(","), args.methods.split(",")
    if args.one_process:
        for setting in settings:
            for method, (trainable, times) in run_one_process(args, setting, methods).items():
                row = run.add({**base, "setting": setting}, method, times, trainable=trainable)
                print(f"{setting:10s} {method:9s} {row['s'] * 1e3:9.1f} ms (median of {len(times)} interleaved "
                      f"steps)", flush=True)
        run.report(not args.no_report)
        return
    # Rounds outermost, so that within a round every method of every setting runs minutes apart: drift on a shared
    # machine then hits a round's methods alike, and the by-round ratios cancel it.
    for round_ in range(args.rounds):
        shared = set()  # the frozen floor and full fine-tuning do not depend on the targets: once per round
        for setting in settings:
            for method in methods:
                if method in shared:
                    continue
                got = run_in_process(args, method, setting)
                if got is None:
                    continue
                if method in SETTING_FREE:
                    shared.add(method)
                params = {**base, "setting": None if method in SETTING_FREE else setting, "round": round_}
                run.add(params, method, got["steps_s"], peak_bytes=got["peak_bytes"],
                        rss_growth_bytes=got["rss_growth_bytes"], trainable=got["trainable"],
                        adapter_bytes=got["adapter_bytes"])
                print(f"{setting:10s} {method:9s} round {round_}: {got['step_s'] * 1e3:9.1f} ms "
                      f"(steps {min(got['steps_s']) * 1e3:.1f}-{max(got['steps_s']) * 1e3:.1f}) "
                      f"{got['peak_bytes'] / 2**20:9.1f} MiB  trainable {got['trainable']:,}", flush=True)
    run.report(not args.no_report)


if __name__ == "__main__":
    main()
