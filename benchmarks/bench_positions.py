"""Position enumeration: randmask's keyed bijection against the peers' ways of drawing a random mask.

    python benchmarks/bench_positions.py                        # CPU: 4096x14336 matrix + whole Llama-3-8B shape
    python benchmarks/bench_positions.py --device cuda          # GPU: randmask's Triton kernel vs torch on CUDA
    python benchmarks/bench_positions.py --model-baselines full # CPU: run the peers over all 224 matrices (~10 min)

Every method returns the same thing, (rows, cols) as int64 tensors of the n trainable positions:
  randmask   randmask.mask_positions(shape, n, key): what users get, through randmask.ops (CPU: the native kernel
             when the library is built; CUDA: the Triton kernel, kernels/positions.py). Exactly n, O(n) memory.
  native     kernels/native.py positions_native (the C header, OpenMP) called directly, CPU only, when the library
             is built (or RANDMASK_NATIVE_LIB points at a build).
  torch      the torch twin (ops.run("positions", "torch", ...): the chunked bijection of
             kernels/mask_addressing.py), what runs without the native library or Triton.
  randperm   torch.randperm(out*in)[:n], then divmod by in: the core of HF PEFT SHiRA's random mask.
  shira      PEFT SHiRA's whole path (peft 0.21 tuners/shira/mask_functions.random_mask + layer.update_layer):
             randperm, a dense zeros(out, in) float32 mask cast to bool, scatter, then torch.where(mask == 1.0).
  rand       (torch.rand(out, in) > 1 - density).nonzero(): the official Random-Masking code's draw (it then
             builds CSR indices; nonzero gives the same positions). The count is Bernoulli, not exactly n.

Two cases:
  matrix  one --shape matrix (default 4096x14336, Llama-3-8B's down_proj) at each --densities value.
  model   every linear matrix of a Llama-3-8B-shaped model (32 layers: q/o 4096x4096, k/v 1024x4096,
          gate/up 14336x4096, down 4096x14336; 224 matrices, 6.98 G entries) at --ratio of the whole model's
          parameters (the paper's "trainable ratio"; default 1e-4 = 0.01%) spread over all of them by randmask.plan
          on a model built on the "meta" device. Positions of all matrices are kept, as training keeps them.
          On CPU the peers would take minutes here (randperm of 6.98 G entries), so by default they are timed on
          one matrix of each of the 3 sizes (out*in) and multiplied by the count of that size ("extrapolated" in
          the table; peak = the largest one-matrix peak + the other matrices' outputs). --model-baselines full
          runs them over every matrix.

Time: median of --repeats calls (at least 15 for calls under 50 ms; a call over 0.5 s counts the first, measured
call as one of them) in a fresh process per (method, case).
Peak memory: CPU: how far the process's peak resident set (VmHWM, reset to the current RSS just before the call
through /proc/self/clear_refs: benchmarks/harness.py PeakRSS) rises above the RSS at the start of the first call, in
that fresh process after a tiny warm-up call. It sees every temporary that is touched, including the C library's
(torch's CPU allocator returns big freed blocks to the OS, so each temporary's pages are faulted in anew). Plain
ru_maxrss growth is not used: a child inherits its parent's high-water mark across fork + exec, which hid the whole
growth here when the parent was bigger than the child. CUDA: torch.cuda.max_memory_allocated() minus the memory
allocated before the call.
Target: the whole 8B model at 0.01% enumerated in < 1 s with O(n) memory.
Appends a row per (case, density, method) to the results dataset, then writes the run's tables and plot.
"""
import argparse
import collections
import json
import os
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Run, add_results_argument, time_call  # noqa: E402

METHODS = ["randmask", "native", "torch", "randperm", "shira", "rand"]
LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False)
FAST_CALL_S = 0.05  # calls faster than this get at least FAST_REPEATS repeats
SLOW_CALL_S = 0.5  # calls slower than this count the measured first call as one of the --repeats
FAST_REPEATS = 15


# ---------------------------------------------------------------- the methods (run inside a child process)
def make_method(method, device):
    """method name -> f(shape, n, key) returning (rows, cols), int64 tensors on `device`."""
    import torch

    if method == "randmask":
        from randmask import mask_positions

        return lambda shape, n, key: mask_positions(shape, n, key, device)
    if method == "native":
        from randmask.kernels import native

        if device.type != "cpu" or native.status()[0] is None:
            return None
        return lambda shape, n, key: native.positions_native(shape, n, key)
    if method == "torch":
        from randmask import ops

        return lambda shape, n, key: ops.run("positions", "torch", shape, n, key, device)

    def randperm(shape, n, key):
        perm = torch.randperm(shape[0] * shape[1], device=device)
        flat = perm[:n].clone()  # a view would keep the whole permutation alive
        del perm
        return torch.div(flat, shape[1], rounding_mode="floor"), flat % shape[1]

    def shira(shape, n, key):  # peft 0.21.2: mask_functions.random_mask, then ShiraLayer.update_layer
        idx = torch.randperm(shape[0] * shape[1], device=device)[:n]
        val = torch.ones(*idx.shape, dtype=bool).to(device)
        mask = torch.zeros(*shape).to(val).view(1, -1).to(device)
        mask = mask.scatter_(1, idx.unsqueeze(0), val.unsqueeze(0)).view(shape)
        del idx
        return torch.where(mask == 1.0)

    def rand(shape, n, key):
        density = n / (shape[0] * shape[1])
        mask = torch.rand(*shape, device=device) > 1 - density
        rows, cols = mask.nonzero().unbind(1)
        return rows, cols

    return {"randperm": randperm, "shira": shira, "rand": rand}[method]


def run_child(spec):
    """Measure one method on a list of matrices [(name, out, in, n)], all positions kept: prints a JSON line."""
    import torch
    from harness import PeakRSS

    from randmask import layer_key

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    fn = make_method(spec["method"], device)
    if fn is None:
        print(json.dumps({"unavailable": True}))
        return
    matrices = [(name, (o, i), n, layer_key(0, name)) for name, o, i, n in spec["matrices"]]

    def enumerate_all():
        return [fn(shape, n, key) for _, shape, n, key in matrices]

    fn((64, 64), 10, 1)  # warm-up: lazy imports, RNG and allocator set-up, Triton compile
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        probe = PeakRSS()
        probe.start()
    first, _ = time_call(enumerate_all, device, repeats=1, warmup=0)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = probe.growth()
    if first > SLOW_CALL_S:  # every call allocates afresh, so the first is a fair sample: keep it, save a call
        _, times = time_call(enumerate_all, device, repeats=max(0, spec["repeats"] - 1), warmup=0)
        times = [first, *times]
        median = statistics.median(times)
    else:
        repeats = spec["repeats"] if first > FAST_CALL_S else max(spec["repeats"], FAST_REPEATS)
        median, times = time_call(enumerate_all, device, repeats=repeats, warmup=1 if device.type == "cuda" else 0)
    found = sum(len(rows) for rows, _ in enumerate_all())
    how = "torch.cuda.max_memory_allocated growth" if device.type == "cuda" else probe.how
    print(json.dumps({"time_s": median, "times": times, "first_s": first, "peak_bytes": peak, "peak_how": how,
                      "found": found}))


def measure(args, method, matrices):
    """Run one method on `matrices` in a fresh process; returns its JSON dict (or None if unavailable/failed)."""
    spec = {"method": method, "device": args.device, "repeats": args.repeats, "threads": args.threads,
            "matrices": [[name, shape[0], shape[1], n] for name, shape, n in matrices]}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    try:
        out = subprocess.run([sys.executable, __file__, "--child", f.name], capture_output=True, text=True,
                             timeout=args.child_timeout)
    except subprocess.TimeoutExpired:
        print(f"  {method}: timed out after {args.child_timeout} s", file=sys.stderr)
        return {"timed_out": True}
    finally:
        os.unlink(f.name)
    if out.returncode != 0:
        print(f"  {method} failed:\n{out.stderr[-2000:]}", file=sys.stderr)
        return {"failed": out.stderr[-500:]}
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return None if result.get("unavailable") else result


def failure_text(result, args) -> str:
    if result.get("timed_out"):
        return f"did not finish in {args.child_timeout} s (--child-timeout)"
    tail = result.get("failed", "").strip().splitlines()
    return "failed: " + (tail[-1] if tail else "unknown error")


# ---------------------------------------------------------------- the model's matrices
def llama8b_plan(ratio):
    """(name, (out, in), n) of every linear matrix of a Llama-3-8B-shaped model at `ratio` of its parameters."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import randmask

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**LLAMA3_8B))
    plan = randmask.plan(model, randmask.RandMaskConfig(trainable_ratio=ratio, target_modules="all-linear"))
    return plan, sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- driver
def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cuda: randmask runs its Triton kernel)")
    parser.add_argument("--shape", default="4096x14336", help="OUTxIN of the one-matrix case")
    parser.add_argument("--densities", default="1e-5,1e-4,1e-3,1e-2", help="comma-separated, for the matrix case")
    parser.add_argument("--ratio", type=float, default=1e-4,
                        help="trainable share of the whole 8B model for the model case (default 1e-4 = 0.01%%)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated: " + ", ".join(METHODS))
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per measurement (median)")
    parser.add_argument("--model-baselines", default="auto", choices=["auto", "full", "extrapolate", "skip"],
                        help="how the peers run in the model case: auto = full on cuda, extrapolate on cpu")
    parser.add_argument("--skip-model", action="store_true", help="only the one-matrix case")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (and the native kernels') in each measurement; 0: torch's default. "
                             "On a shared machine --threads 1 avoids OpenMP barriers stalling on a descheduled thread")
    parser.add_argument("--child-timeout", type=int, default=1200, help="seconds before one measurement is abandoned")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: a JSON spec file, measure in this process
    add_results_argument(parser)
    args = parser.parse_args()
    if args.child:
        with open(args.child) as f:
            return run_child(json.load(f))

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    threads = torch.get_num_threads() if device.type == "cpu" else None
    methods = [m for m in args.methods.split(",") if m]
    if device.type == "cuda" and "native" in methods:
        methods.remove("native")  # the C header's positions run on CPU only
    run = Run("positions", device, f"{threads}t" if threads else "", args.results, tag=args.tag)
    print(f"{run.base['machine']}; run {run.id}", flush=True)

    def add(params, method, r, **extra):
        """One row from a child's result (or its failure)."""
        if r is None:
            return None
        if "time_s" not in r or r.get("time_s") is None:
            return run.add(params, method, [], s=None, how=extra.pop("how", None) or failure_text(r, args), **extra)
        figures = {k: r[k] for k in ("peak_bytes", "peak_how", "first_s", "found") if k in r}
        return run.add(params, method, r.get("times", []), s=r["time_s"], **figures, **extra)

    shape = tuple(int(v) for v in args.shape.lower().split("x"))
    for density in map(float, args.densities.split(",")):
        n = round(density * shape[0] * shape[1])
        params = {"case": "matrix", "shape": args.shape, "density": density, "n": n, "threads": threads}
        for method in methods:
            row = add(params, method, measure(args, method, [("model.layers.0.mlp.down_proj", shape, n)]))
            if row and row["s"] is not None:
                print(f"  {args.shape} density {density:g} n {n:>9,} {method:9s} {row['s'] * 1e3:10.3f} ms "
                      f"{row['peak_bytes'] / 2**20:9.2f} MiB", flush=True)

    if not args.skip_model:
        plan, model_params = llama8b_plan(args.ratio)
        n_total = sum(n for _, _, n in plan)
        entries = sum(s[0] * s[1] for _, s, _ in plan)
        params = {"case": "model", "shape": "llama-3-8b", "ratio": args.ratio, "model_params": model_params,
                  "matrices": len(plan), "entries": entries, "n": n_total, "density": n_total / entries,
                  "threads": threads}
        baselines = args.model_baselines
        if baselines == "auto":
            baselines = "full" if device.type == "cuda" else "extrapolate"
        for method in methods:
            row = None
            if method in ("randmask", "native", "torch") or baselines == "full":
                row = add(params, method, measure(args, method, plan), how="measured")
            elif baselines == "extrapolate":
                # One matrix of each size (out*in: the peers' cost depends on it, not on the aspect), times the
                # count of that size; the peak is the largest one-matrix peak plus the positions of every other
                # matrix (16 bytes a value), which stay alive.
                by_size = collections.defaultdict(list)
                for name, s, n in plan:
                    by_size[s[0] * s[1]].append((name, s, n))
                time_s, peaks, per_shape = 0.0, [], {}
                for group in by_size.values():
                    s = group[0][1]
                    r = measure(args, method, group[:1])
                    if not r or "time_s" not in r:
                        if r:
                            row = add(params, method, r, how=failure_text(r, args) + f" (one {s[0]}x{s[1]} matrix)")
                        break
                    time_s += r["time_s"] * len(group)
                    peaks.append(r["peak_bytes"] + 16 * (n_total - group[0][2]))
                    per_shape[f"{s[0]}x{s[1]}"] = {"count": len(group), "n": group[0][2], "s": r["time_s"],
                                                   "seconds": r["times"], "peak_bytes": r["peak_bytes"]}
                else:
                    row = run.add(params, method, [], s=time_s, peak_bytes=max(peaks), per_shape=per_shape,
                                  how="extrapolated: one matrix per size × count")
            if row and row["s"] is not None:
                print(f"  8B model {method:9s} {row['s']:8.3f} s {row['peak_bytes'] / 2**20:9.1f} MiB  "
                      f"({row['how']})", flush=True)
    run.report(not args.no_report)


if __name__ == "__main__":
    main()
