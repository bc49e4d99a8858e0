"""End-to-end training step: randmask against full fine-tuning, the frozen floor, PEFT LoRA, PEFT SHiRA and the naive
dense-masked model, on one Llama-shaped model built from a config, same batch, same targets, equal trainable counts.

    python benchmarks/bench_e2e.py                       # SmolLM2-135M shape, fp32, CPU, batch 4 x 128
    python benchmarks/bench_e2e.py --shape 1b --dtype bfloat16 --device cuda
    python benchmarks/bench_e2e.py --quantize 4bit --methods frozen,randmask,lora,shira
    python benchmarks/bench_e2e.py --one-process --methods frozen,randmask,randmask-additive

randmask is randmask.apply with mode "auto" (merged on a plain base), randmask-additive the same values kept beside
the weight (mode "additive": y = base(x) + S(delta) x), randmask-peft the same config through peft.get_peft_model
(randmask.peft). --quantize 4bit / 8bit makes every linear layer but the head a
bitsandbytes Linear4bit (nf4, double quantization) / Linear8bitLt computing in --dtype, built on "meta" and
materialized a layer at a time (a 70B shape never exists densely): frozen is then the 4-bit floor, randmask runs
additive (auto), lora is QLoRA (PEFT's bitsandbytes LoRA layers) and shira PEFT SHiRA on the same base; naive and
full cannot train a quantized base and are skipped.

Each method runs in its own process (so peak memory is its own): warm-up steps, then the median of timed steps of
forward + backward + AdamW step (randmask: randmask.MaskedAdamW, the README's optimizer, AdamW with the merged-weight
write fused in; every other method: torch.optim.AdamW with its defaults); --rounds repeats all methods interleaved
and keeps each one's fastest round. The
frozen floor (every weight frozen, input gradients still computed: the work no method can avoid) and full
fine-tuning do not depend on the targets: each round runs them once and every setting's table shows that run.
Reports step time and peak memory as ratios to LoRA and to the frozen floor, and the adapter file size.
Appends a row per (setting, method, round) to the results dataset (frozen and full with setting null: they belong to
every setting), then writes the run's tables and plot.

    python benchmarks/bench_e2e.py --device cuda --dtype bfloat16 --quantize 4bit --fits 8b,13b,34b,70b

finds the largest of the shapes (tried largest first) whose q,v randmask step fits on the device (a process each:
an out-of-memory error is a "does not fit"), and runs QLoRA at that shape for its peak memory beside randmask's
(bench "fits": a row per shape and method tried).

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
    "13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                num_key_value_heads=40, vocab_size=32000, tie_word_embeddings=False),  # Llama-2-13B
    "34b": dict(hidden_size=8192, intermediate_size=22016, num_hidden_layers=48, num_attention_heads=64,
                num_key_value_heads=8, vocab_size=32000, tie_word_embeddings=False),  # CodeLlama-34B
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),  # Llama-3-70B
    # for the tests; 64 wide: bitsandbytes' CPU 4-bit dequantization is wrong for an in_features that is a multiple
    # of 16 but not of 64
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256, tie_word_embeddings=True),
}
SETTINGS = {  # name: (targets, what sets the trainable count)
    "qv": (["q_proj", "v_proj"], "randmask at trainable_ratio 0.01% of the model; LoRA/SHiRA r=8"),
    "all-linear": (["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                   "every method at LoRA r=8's count per matrix"),
}
METHODS = ["frozen", "randmask", "randmask-additive", "randmask-peft", "lora", "shira", "naive", "full"]
SETTING_FREE = ("frozen", "full")  # train nothing / everything whatever the targets: run once per round
DENSE_ONLY = ("naive", "full")  # they write the weights: not on a quantized base


def build_model(args):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**SHAPES[args.shape], max_position_embeddings=max(2048, args.seq))
    if args.quantize != "none":
        model = build_quantized(config, args)
    else:
        with torch.device(args.device):
            model = LlamaForCausalLM(config).to(getattr(torch, args.dtype))
    model.requires_grad_(False)
    return model


def build_quantized(config, args):
    """The model with every linear layer but the head quantized (args.quantize), built on "meta" and materialized on
    the device one layer at a time, each Linear quantized as soon as it is filled: the dense model never exists."""
    import torch
    from accelerate import init_empty_weights
    from transformers import LlamaForCausalLM

    from randmask.recipes.models import quantize_linears

    dtype, default = getattr(torch, args.dtype), torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # the meta parameters take the dtype the real ones will have
    try:
        # parameters on meta; buffers (the rotary frequencies) computed on the device
        with torch.device(args.device), init_empty_weights(include_buffers=False):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    std = config.initializer_range
    quantize_linears(model, int(args.quantize[0]), device=args.device, compute_dtype=dtype,
                     init=lambda weight: weight.normal_(0.0, std))
    model.tie_weights()  # a tied head shares the embedding's parameter (built on meta, they came apart)
    made = {}  # so a shared parameter is materialized once
    with torch.no_grad():
        for module in model.modules():
            for name, param in list(module.named_parameters(recurse=False)):
                if param.is_meta:
                    if id(param) not in made:
                        value = torch.empty_like(param, device=args.device)
                        # Llama's only 1-D parameters are RMSNorm weights
                        made[id(param)] = torch.nn.Parameter(value.normal_(0.0, std) if value.dim() > 1
                                                             else value.fill_(1.0), requires_grad=False)
                    setattr(module, name, made[id(param)])
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

    import randmask

    if args.quantize != "none" and args.method in DENSE_ONLY:
        raise ValueError(f"{args.method} writes the weights, which a --quantize {args.quantize} base cannot hold")
    model = build_model(args)
    targets, _ = SETTINGS[args.setting]
    total = randmask.count_parameters(model)  # a 4-bit weight's values, not its packed bytes
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

        mode = "additive" if args.method == "randmask-additive" else "auto"
        ratio = 1e-4 if args.setting == "qv" else lora_count / total
        config = randmask.RandMaskConfig(trainable_ratio=ratio, target_modules=targets, mode=mode)
        if args.method == "randmask-peft":  # the same masks and kernels, through peft.get_peft_model
            from peft import get_peft_model

            import randmask.peft

            model = get_peft_model(model, randmask.RandMaskConfig.from_dict(randmask.RandMaskConfig.to_dict(config)))
            adamw = randmask.MaskedAdamW
        elif args.method.startswith("randmask"):
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
    """One method in this process: prints a JSON line with its measurements ({"oom": true} when the device ran out
    of memory: the step does not fit)."""
    import torch

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        model, step, trainable = prepare(args)
        adapter_bytes = None
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
    except torch.OutOfMemoryError as exc:
        print(json.dumps({"method": args.method, "oom": True, "error": str(exc).splitlines()[0],
                          "peak_bytes": torch.cuda.max_memory_allocated() if args.device == "cuda" else None}))
        return
    if args.device == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if args.method in ("lora", "shira", "randmask", "randmask-additive", "randmask-peft"):
        with tempfile.TemporaryDirectory() as tmp:
            if args.method in ("randmask", "randmask-additive"):
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
    parser.add_argument("--quantize", default="none", choices=["none", "4bit", "8bit"],
                        help="the base's linear layers but the head: none (default, --dtype), 4bit (bitsandbytes nf4 "
                             "with double quantization, computing in --dtype: QLoRA's base) or 8bit (LLM.int8())")
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
           "--warmup", str(args.warmup), "--steps", str(args.steps), "--compile", args.compile,
           "--quantize", args.quantize]
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
    parser.add_argument("--methods", default=",".join(m for m in METHODS if m not in ("randmask-additive",
                                                                                     "randmask-peft")),
                        help="comma-separated: " + ", ".join(METHODS) + " (default all but randmask-additive and "
                        "randmask-peft)")
    parser.add_argument("--one-process", action="store_true",
                        help="build every method in this process and interleave their steps (a round is one step "
                             "of each, in a shuffled order): steadier step-time ratios, no peak memory")
    parser.add_argument("--fits", metavar="SHAPES",
                        help="comma-separated shapes: find the largest whose q,v randmask step fits on the device "
                             "(largest first, a process each), with QLoRA's peak memory beside it; use with "
                             "--quantize")
    parser.add_argument("--method", help=argparse.SUPPRESS)  # internal: run one method in this process
    parser.add_argument("--setting", help=argparse.SUPPRESS)
    add_results_argument(parser)
    args = parser.parse_args()
    if args.method:
        return run_method(args)
    if args.fits:
        unknown = [shape for shape in args.fits.split(",") if shape not in SHAPES]
        if unknown:
            parser.error(f"--fits: unknown shapes {unknown}; choose from {', '.join(SHAPES)}")
        return find_largest_fit(args)
    quantized = "" if args.quantize == "none" else f"_{args.quantize}"
    table = (f"{args.shape}_{args.dtype}{quantized}" + ("" if args.compile == "none" else f"_compile-{args.compile}")
             + ("_one-process" if args.one_process else ""))
    run = Run("e2e", args.device, table, args.results, tag=args.tag)
    print(f"{run.base['machine']}, {table}; run {run.id}", flush=True)
    base = {"shape": args.shape, "dtype": args.dtype, "quantize": args.quantize, "batch": args.batch,
            "seq": args.seq, "compile": args.compile, "mode": "one-process" if args.one_process else "processes",
            "warmup": args.warmup, "steps": args.steps}
    settings, methods = args.settings.split(","), args.methods.split(",")
    if args.quantize != "none" and set(methods) & set(DENSE_ONLY):
        print(f"skipped on a {args.quantize} base (they write the weights): "
              f"{', '.join(m for m in methods if m in DENSE_ONLY)}", flush=True)
        methods = [m for m in methods if m not in DENSE_ONLY]
    if args.one_process:
        for setting in settings:
            for method, (trainable, times) in run_one_process(args, setting, methods).items():
                row = run.add({**base, "setting": setting}, method, times, trainable=trainable)
                print(f"{setting:10s} {method:17s} {row['s'] * 1e3:9.1f} ms (median of {len(times)} interleaved "
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
                if got is None or got.get("oom"):
                    continue
                if method in SETTING_FREE:
                    shared.add(method)
                params = {**base, "setting": None if method in SETTING_FREE else setting, "round": round_}
                run.add(params, method, got["steps_s"], peak_bytes=got["peak_bytes"],
                        rss_growth_bytes=got["rss_growth_bytes"], trainable=got["trainable"],
                        adapter_bytes=got["adapter_bytes"])
                print(f"{setting:10s} {method:17s} round {round_}: {got['step_s'] * 1e3:9.1f} ms "
                      f"(steps {min(got['steps_s']) * 1e3:.1f}-{max(got['steps_s']) * 1e3:.1f}) "
                      f"{got['peak_bytes'] / 2**20:9.1f} MiB  trainable {got['trainable']:,}", flush=True)
    run.report(not args.no_report)


def shape_parameters(shape) -> int:
    """A shape's parameter count, from a model built on "meta" (nothing allocated)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        return sum(p.numel() for p in LlamaForCausalLM(LlamaConfig(**SHAPES[shape])).parameters())


def find_largest_fit(args) -> None:
    """--fits: the shapes largest first; each one's q,v randmask step in a process of its own until one fits, then
    QLoRA's step at that shape. A row per (shape, method) tried: s null and oom true where it did not fit."""
    sizes = {shape: shape_parameters(shape) for shape in args.fits.split(",")}
    run = Run("fits", args.device, f"{args.dtype}_{args.quantize}", args.results, tag=args.tag)
    print(f"{run.base['machine']}: the largest q,v randmask step that fits, {args.quantize} base; run {run.id}",
          flush=True)
    found = None
    for shape in sorted(sizes, key=sizes.get, reverse=True):
        shaped = argparse.Namespace(**{**vars(args), "shape": shape})
        for method in ("randmask", "lora"):
            got = run_in_process(shaped, method, "qv")
            if got is None:
                print(f"{shape:5s} {method:9s} failed (not out of memory): stopped", flush=True)
                return run.report(not args.no_report)
            fits = not got.get("oom")
            params = {"shape": shape, "parameters": sizes[shape], "dtype": args.dtype, "quantize": args.quantize,
                      "batch": args.batch, "seq": args.seq, "setting": "qv", "warmup": args.warmup,
                      "steps": args.steps}
            run.add(params, method, got.get("steps_s", []), peak_bytes=got.get("peak_bytes"), oom=not fits,
                    trainable=got.get("trainable"), **({} if fits else {"s": None}))
            peak = got.get("peak_bytes")
            print(f"{shape:5s} {method:9s} {'fits' if fits else 'out of memory':14s}"
                  + (f" {got['step_s'] * 1e3:9.1f} ms" if fits else "")
                  + (f" peak {peak / 2**20:9.0f} MiB" if peak else ""), flush=True)
            if not fits:
                break  # randmask out of memory: try the next smaller shape; QLoRA out of memory: noted
            found = found or shape
        if found:
            break
    print(f"largest shape whose q,v randmask step fits: {found or 'none of ' + args.fits}", flush=True)
    run.report(not args.no_report)


if __name__ == "__main__":
    main()
