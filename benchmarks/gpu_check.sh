#!/usr/bin/env bash
# gpu_check.sh: the checks that need a GPU (H100 / H200), as one prepared script; the default run takes ~6.5 min.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR] [SECTION ...]    results in OUT_DIR (default: $OUT, else
#                                                          benchmarks/results/gpu); sections default to
#                                                          "triton micro e2e"; "all" is every section
#   bash benchmarks/gpu_check.sh "$OUT" e2e-8b             the 8B-shaped run alone (~2 min), as a second call
#   bash benchmarks/gpu_check.sh "$OUT" e2e-compile        the 1B q,v step compiled with CUDA graphs (~4 min)
#
# Sections and their time limits (each Python step runs under `timeout`, so a hang cannot eat the lease):
#   triton        every Triton kernel vs its torch twin in fp32 / fp16 / bf16 (check_triton_gpu.py)       <= 90 s
#   micro         bench_masked_grad (4096-wide bf16 at 8192 and 512 tokens; the official code's ways are
#                 columns), bench_update, bench_overhead (host cost per layer), a sweep of the gather
#                 kernel's block sizes at density 1e-5-1e-3                                              <= 235 s
#   e2e           bench_e2e, Llama-1B shape, bf16, q,v and all-linear: frozen floor, randmask, LoRA, SHiRA,
#                 naive, full (the floor and full run once for both settings: 10 processes)             <= 300 s
#                 then frozen, randmask, LoRA in one process, steps interleaved (step time only)         <= 120 s
#   e2e-8b        bench_e2e, Llama-3-8B shape, bf16, q,v: frozen floor, randmask, LoRA (3 processes)      <= 110 s
#   e2e-compile   bench_e2e --compile reduce-overhead, 1B, q,v: frozen floor, randmask, LoRA. The eager 1B step is
#                 host-bound; with the Python and launch cost gone, is randmask at the floor? (H100: 239 s)
#                                                                                                        <= 400 s
#   cuda-backend  (issue 6) builds kernels/csrc/native_cuda.cu with CMake, checks it and the dense torch twin (its
#                 dense side; also captured in a CUDA graph: no host sync) against the gather twin, times it
#                 against Triton and the torch twin, and compares the host cost of Triton and CUDA C++ launches
# Measured: e2e ~27 s per process, mostly start-up. On an H200 (2026-11-27) the default sections took 375 s in one
# call (triton 58 s, micro 94 s, e2e 210 s), then e2e-8b and e2e-compile together 237 s on the warm machine: with a
# machine's start, both calls fit one 15-minute lease with ~3 minutes to spare. Since then e2e has the one-process
# run (~1 min, unmeasured) and micro the gather sweep's wider grid (~20 s more): ~2 minutes to spare.
# Tables are packed into OUT_DIR/results_cuda.tgz after every step (a lease returns only a few files, and a run cut
# short keeps what it had packed); the log is OUT_DIR/gpu_check.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-benchmarks/results/gpu}}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
LOG="$OUT_DIR/gpu_check.txt"
# The tables land in benchmarks/results/*cuda*; each section packs them into OUT_DIR/results_cuda.tgz (one file: a
# lease returns only a few files, and a run cut short keeps what it had packed).
save_results() { tar czf "$OUT_DIR/results_cuda.tgz" benchmarks/results/*cuda* 2> /dev/null; }
exec > >(tee -a "$LOG") 2>&1
PY="${PYTHON:-python3}"  # the device image's python3 holds torch; there may be no `python`
START=$(date +%s)
shift $(( $# > 0 ? 1 : 0 ))
SECTIONS=" ${*:-triton micro e2e} "
[[ "$SECTIONS" == *" all "* ]] && SECTIONS=" triton micro e2e e2e-8b e2e-compile cuda-backend "
want() { [[ "$SECTIONS" == *" $1 "* ]]; }
elapsed() { echo "($(( $(date +%s) - START )) s so far)"; }
echo "== gpu_check $(date -u +%FT%TZ) on $(hostname); sections:$SECTIONS"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 || echo "nvidia-smi failed"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda,
                 'gpu', torch.cuda.is_available() and torch.cuda.get_device_name())" || { echo "no torch"; exit 1; }
$PY -c "import importlib.metadata as m; print(*(f'{p} {m.version(p)}' for p in
        ('triton', 'transformers', 'peft', 'safetensors')), sep=', ')" 2>&1

# The device has no network and pip's editable install wants to fetch setuptools: no install. Lay the package out as
# setup.py's package_dir does (kernels/ as randmask/kernels, a link in this copy of the tree) and use PYTHONPATH.
# No native libraries are built here (the cuda-backend section builds them with CMake).
[ -e randmask/kernels ] || ln -s ../kernels randmask/kernels
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
$PY -c "import randmask, randmask.kernels; print('randmask from', randmask.__file__)" || exit 1

# ------------------------------------------------------------------------------------------------ triton
if want triton; then
  echo; echo "== section triton: kernels vs torch twins $(elapsed)"
  timeout 90 $PY benchmarks/check_triton_gpu.py
  echo "triton check exit status $?"
fi

# ------------------------------------------------------------------------------------------------ micro
if want micro; then
  echo; echo "== section micro $(elapsed)"
  timeout 80 $PY benchmarks/bench_masked_grad.py --device cuda --dtype bfloat16 --shapes 4096x4096,4096x14336 \
    --tokens 8192 --densities 1e-5,1e-4,1e-3,1e-2,3e-2 --repeats 5
  echo "masked-grad (8192 tokens) exit status $?"; save_results
  timeout 25 $PY benchmarks/bench_masked_grad.py --device cuda --dtype bfloat16 --shapes 4096x4096 \
    --tokens 512 --densities 1e-5,1e-4,1e-3,1e-2,3e-2,1e-1 --repeats 5
  echo "masked-grad (512 tokens) exit status $?"; save_results
  timeout 50 $PY benchmarks/bench_update.py --device cuda
  echo "update exit status $?"; save_results
  timeout 45 $PY benchmarks/bench_overhead.py --device cuda  # host cost per layer: what a host-bound step pays
  echo "overhead exit status $?"; save_results
  # the gather kernel's block sizes at low density: do wide slot blocks (few tokens each) let the slots of one
  # program share token rows through L1? (the kernel as dispatched: 128 slots x 32 tokens)
  timeout 60 $PY - << 'PYEOF'
import statistics, torch
from randmask.kernels import masked_grad as mg
dev = torch.device("cuda")
key = 0x0123456789ABCDEF
print(torch.cuda.get_device_name(dev), "bf16, ms per call (median of 10); gather[slots per program x tokens per step, "
      "warps]")

def ms(fn, reps=10):
    fn(); torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(); fn(); end.record(); end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)

blocks = ((128, 32, 4), (512, 8, 4), (1024, 4, 4), (1024, 4, 8), (2048, 2, 8), (4096, 1, 8), (4096, 1, 16))
for (out, inf), T in (((4096, 4096), 8192), ((4096, 14336), 8192), ((4096, 4096), 512)):
    x = torch.randn(T, inf, device=dev).to(torch.bfloat16)
    gy = torch.randn(T, out, device=dev).to(torch.bfloat16)
    for density in (1e-5, 1e-4, 1e-3):
        n = round(density * out * inf)
        cells = []
        for mg.GATHER_BLOCK_K, mg.GATHER_BLOCK_T, mg.GATHER_NUM_WARPS in blocks:
            cells.append(f"gather[{mg.GATHER_BLOCK_K}x{mg.GATHER_BLOCK_T},{mg.GATHER_NUM_WARPS}]="
                         f"{ms(lambda: mg.masked_grad_gather_triton(x, gy, n, key)):.3f}")
        mg.GATHER_BLOCK_K, mg.GATHER_BLOCK_T, mg.GATHER_NUM_WARPS = blocks[0]
        cells.append(f"matmul={ms(lambda: mg.masked_grad_matmul_triton(x, gy, n, key)):.3f}")
        print(f"{out}x{inf} T={T} d={density:.0e} n={n}  " + "  ".join(cells), flush=True)
PYEOF
  echo "gather block sweep exit status $?"
fi

# ------------------------------------------------------------------------------------------------ e2e
# One round: each method is its own process, ~27 s each on an H200 VM (start-up, model build).
if want e2e; then
  echo; echo "== section e2e (1B) $(elapsed)"
  timeout 300 $PY benchmarks/bench_e2e.py --device cuda --shape 1b --dtype bfloat16 --steps 10 --warmup 3 --rounds 1
  echo "e2e 1b exit status $?"; save_results
  # the same step time with frozen / randmask / LoRA in one process, steps interleaved: one process's floor read
  # 60 ms and the next one's 36 ms on the H200 (2026-11-27), so per-process eager ratios are +-30%
  timeout 120 $PY benchmarks/bench_e2e.py --device cuda --shape 1b --dtype bfloat16 --steps 30 --warmup 5 \
    --one-process --methods frozen,randmask,lora
  echo "e2e 1b one-process exit status $?"; save_results
fi
if want e2e-8b; then
  echo; echo "== section e2e-8b $(elapsed)"
  timeout 110 $PY benchmarks/bench_e2e.py --device cuda --shape 8b --dtype bfloat16 --steps 10 --warmup 3 \
    --rounds 1 --settings qv --methods frozen,randmask,lora
  echo "e2e 8b exit status $?"; save_results
fi
if want e2e-compile; then
  echo; echo "== section e2e-compile $(elapsed)"
  timeout 400 $PY benchmarks/bench_e2e.py --device cuda --shape 1b --dtype bfloat16 --steps 10 --warmup 3 \
    --rounds 1 --settings qv --methods frozen,randmask,lora --compile reduce-overhead
  echo "e2e compile exit status $?"; save_results
fi
if ! want cuda-backend; then
  echo "== gpu_check done in $(( $(date +%s) - START )) s; log: $LOG"
  exit 0
fi

# ------------------------------------------------------------------------------------------------ cuda-backend
echo
echo "== section cuda-backend: build ($(( $(date +%s) - START )) s so far)"
BUILD="${TMPDIR:-/tmp}/randmask-build-cuda"  # outside OUT_DIR: only logs and tables go back
if command -v nvcc > /dev/null || [ -x /usr/local/cuda/bin/nvcc ]; then
  export PATH="$PATH:/usr/local/cuda/bin"
  nvcc --version | tail -1
  if cmake -S . -B "$BUILD" -DRANDMASK_BUILD_TESTS=OFF -DCMAKE_BUILD_TYPE=Release > "$OUT_DIR/cmake.log" 2>&1 &&
     cmake --build "$BUILD" -j"$(nproc)" >> "$OUT_DIR/cmake.log" 2>&1; then
    grep "randmask:" "$OUT_DIR/cmake.log"
  else
    echo "CMake build failed (tail of $OUT_DIR/cmake.log):"; tail -30 "$OUT_DIR/cmake.log"
  fi
fi
if [ -f "$BUILD/_randmask_cuda.so" ]; then
  export RANDMASK_CUDA_LIB="$BUILD/_randmask_cuda.so" RANDMASK_NATIVE_LIB="$BUILD/_randmask_native.so"
elif [ -f kernels/_randmask_cuda.so ]; then
  echo "using the prebuilt kernels/_randmask_cuda.so (no nvcc here, or its build failed)"
else
  echo "SKIP cuda-backend: no nvcc and no prebuilt kernels/_randmask_cuda.so"
  echo "== gpu_check done in $(( $(date +%s) - START )) s; log: $LOG"
  exit 0
fi
export CUDA_BACKEND_JSON="benchmarks/results/cuda_backend.json"

echo
echo "== section cuda-backend: correctness"
timeout 60 $PY - << 'PYEOF'
import math, os, torch
from randmask import MaskedLinear, mask_positions
from randmask.kernels import native, masked_grad as mg, sparse_update as su, masked_adamw as ma
from randmask.backend import HAS_TRITON

lib = native.cuda_library()
print("CUDA library", lib._name, "ABI", lib.randmask_cuda_abi_version())
dev = torch.device("cuda")
KEY = 0x0123456789ABCDEF
failures = []

def positions(shape, n):
    os.environ["RANDMASK_BACKEND"] = "torch"
    try:
        return mask_positions(shape, n, KEY, dev)
    finally:
        del os.environ["RANDMASK_BACKEND"]

def check(ok, what):
    print(("ok   " if ok else "FAIL ") + what)
    if not ok:
        failures.append(what)

cases = [(1, 97, 30, 5), (89, 1, 89, 33), (53, 47, 0, 17), (53, 47, 2491, 17), (64, 48, 300, 0),
         (101, 67, 1500, 300), (576, 576, 7631, 512), (1536, 576, 20349, 512), (4096, 4096, 1678, 4096),
         (4096, 4096, 167772, 1024)]
for dtype in (torch.float32, torch.float16, torch.bfloat16):
    for out, inf, n, T in cases:
        g = torch.Generator(device=dev).manual_seed(n + T)
        for strided in (False, True):
            x = torch.randn(T, inf, device=dev, generator=g).to(dtype)
            gy = torch.randn(T, out, device=dev, generator=g).to(dtype)
            if strided:
                x = x.t().contiguous().t()
                gy = torch.cat([gy, gy], 1)[:, ::2]
            rows, cols = positions((out, inf), n)
            got = native.masked_grad_cuda(x, gy, n, KEY)
            want = mg.masked_grad_gather_torch(x, gy, rows, cols)
            ok = got.shape == want.shape and (n == 0 or torch.allclose(got, want, rtol=1e-5,
                                                                       atol=1e-5 * want.abs().max().item()))
            err = (got - want).abs().max().item() if n else 0.0
            check(ok, f"masked_grad {dtype} {out}x{inf} n={n} T={T}{' strided' if strided else ''} max err {err:.3g}")
            if not strided and n:  # the dense twin (the CUDA backend's dense side), whose block picks are sync-free
                dense = mg.masked_grad_dense_torch(x, gy, rows, cols)
                check(torch.allclose(dense, want, rtol=1e-4, atol=1e-4 * want.abs().max().item()),
                      f"masked_grad_dense_torch {dtype} {out}x{inf} n={n} T={T} max err "
                      f"{(dense - want).abs().max().item():.3g}")
    for (out, inf), n in (((1, 97), 50), ((89, 1), 89), ((53, 47), 2491), ((4096, 4096), 200000)):
        for transposed in (False, True):
            w = torch.randn((inf, out) if transposed else (out, inf), device=dev).to(dtype)
            w = w.t() if transposed else w
            rows, cols = positions((out, inf), n)
            base = native.gather_weight_cuda(w, n, KEY)
            check(torch.equal(base, su.gather_weight_torch(w, rows, cols)), f"gather {dtype} {out}x{inf} n={n}")
            delta = torch.randn(n, device=dev) * 1e-2
            ours, twin = w.clone(), w.clone()
            native.sparse_update_cuda(ours, base, delta, KEY)
            su.sparse_update_torch(twin, base, delta, rows, cols)
            check(torch.equal(ours, twin),
                  f"sparse_update {dtype} {out}x{inf} n={n}{' transposed' if transposed else ''}")
    # fused AdamW: cuda vs the torch twin (and Triton), 3 steps
    out, inf, n = 512, 384, 20000
    w0 = torch.randn(out, inf, device=dev).to(dtype)
    rows, cols = positions((out, inf), n)
    runs = {}
    impls = {"cuda": native.masked_adamw_cuda, "torch": ma.masked_adamw_torch}
    if HAS_TRITON:
        impls["triton"] = ma.masked_adamw_triton
    for name, fn in impls.items():
        w = w0.clone(); base = su.gather_weight_torch(w, rows, cols)
        delta, m, v = (torch.zeros(n, device=dev) for _ in range(3))
        g = torch.Generator(device=dev).manual_seed(1)
        for step in (1, 2, 3):
            grad = torch.randn(n, device=dev, generator=g)
            fn(w, base, delta, grad, m, v, KEY, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01,
               step=step, positions=(rows, cols))
        runs[name] = (w, delta, m, v)
    for name in runs:
        if name == "torch":
            continue
        w, delta, m, v = runs[name]
        tw, td, tm, tv = runs["torch"]
        dd = (delta - td).abs().max().item() / max(td.abs().max().item(), 1e-30)
        check(torch.allclose(delta, td, rtol=1e-6, atol=1e-7) and torch.allclose(m, tm, rtol=1e-6, atol=0)
              and torch.allclose(v, tv, rtol=1e-6, atol=0),
              f"masked_adamw {name} vs torch {dtype}: delta rel err {dd:.2e}, m bitwise {torch.equal(m, tm)}, "
              f"v bitwise {torch.equal(v, tv)}, weights differ at {(w != tw).sum().item()} of {n}")

# The dense twin inside a CUDA graph (torch.compile's reduce-overhead with the CUDA or torch backend): it must not
# synchronize with the host. Two row blocks (4096 x 4096), bf16 operands.
x = torch.randn(1024, 4096, device=dev).to(torch.bfloat16)
gy = torch.randn(1024, 4096, device=dev).to(torch.bfloat16)
rows, cols = positions((4096, 4096), 167772)
want = mg.masked_grad_gather_torch(x, gy, rows, cols)
side = torch.cuda.Stream()
side.wait_stream(torch.cuda.current_stream())
with torch.cuda.stream(side):
    mg.masked_grad_dense_torch(x, gy, rows, cols)  # warm-up outside the capture
torch.cuda.current_stream().wait_stream(side)
graph = torch.cuda.CUDAGraph()
try:
    with torch.cuda.graph(graph):
        captured = mg.masked_grad_dense_torch(x, gy, rows, cols)
    graph.replay()
    torch.cuda.synchronize()
    check(torch.allclose(captured, want, rtol=1e-4, atol=1e-4 * want.abs().max().item()),
          "masked_grad_dense_torch captured in a CUDA graph and replayed")
except RuntimeError as exc:
    check(False, f"masked_grad_dense_torch in a CUDA graph: {str(exc).splitlines()[0]}")

# MaskedLinear end to end: RANDMASK_BACKEND=cuda vs torch
for dtype in (torch.float32, torch.bfloat16):
    grads = {}
    for backend in ("cuda", "torch"):
        os.environ["RANDMASK_BACKEND"] = backend
        torch.manual_seed(0)
        layer = MaskedLinear.from_linear(torch.nn.Linear(576, 1536).to(dev, dtype), density=0.0005, name="mlp.up")
        x = torch.randn(4, 128, 576, device=dev).to(dtype)
        layer(x).float().square().mean().backward()
        grads[backend] = layer.delta.grad
    del os.environ["RANDMASK_BACKEND"]
    want = grads["torch"]
    check(torch.allclose(grads["cuda"], want, rtol=1e-5, atol=1e-5 * want.abs().max().item()),
          f"MaskedLinear {dtype} RANDMASK_BACKEND=cuda vs torch")
print(f"correctness: {len(failures)} failure(s)")
PYEOF
echo "correctness exit status $?"

echo
echo "== section cuda-backend: timing (ms, median of 20)"
timeout 70 $PY - << 'PYEOF'
import json, os, statistics, time, torch
from randmask import mask_positions
from randmask.kernels import native, masked_grad as mg, sparse_update as su, masked_adamw as ma
from randmask.backend import HAS_TRITON

dev = torch.device("cuda")
KEY = 0x0123456789ABCDEF
print(torch.cuda.get_device_name(dev), "torch", torch.__version__, "triton" if HAS_TRITON else "no triton")

def ms(fn, reps=20):
    fn(); torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start = torch.cuda.Event(enable_timing=True); end = torch.cuda.Event(enable_timing=True)
        start.record(); fn(); end.record(); end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)

results = {"device": torch.cuda.get_device_name(dev), "masked_grad": [], "adamw": []}
setups = [((576, 576), 512), ((1536, 576), 512), ((4096, 4096), 4096)]
densities = [1e-4, 1e-3, 1e-2, 3e-2, 1e-1]
t_start = time.time()
for dtype in (torch.bfloat16,):  # fp32 / fp16 measured once (2026-11-26, H200): the same crossovers
    for shape, T in setups:
        x = torch.randn(T, shape[1], device=dev).to(dtype)
        gy = torch.randn(T, shape[0], device=dev).to(dtype)
        crossover = None
        for d in densities:
            n = round(d * shape[0] * shape[1])
            rows, cols = mask_positions(shape, n, KEY, dev)
            row = {"dtype": str(dtype), "shape": shape, "tokens": T, "density": d, "n": n}
            row["cuda"] = ms(lambda: native.masked_grad_cuda(x, gy, n, KEY))
            if HAS_TRITON:
                row["triton-gather"] = ms(lambda: mg.masked_grad_gather_triton(x, gy, n, KEY))
                row["triton-matmul"] = ms(lambda: mg.masked_grad_matmul_triton(x, gy, n, KEY))
            row["torch-dense"] = ms(lambda: mg.masked_grad_dense_torch(x, gy, rows, cols))
            if crossover is None and row["torch-dense"] < row["cuda"]:
                crossover = d
            results["masked_grad"].append(row)
            print(f"{str(dtype):15} {shape[0]}x{shape[1]} T={T} d={d:.0e} n={n:8d}  " +
                  "  ".join(f"{k}={row[k]:.4f}" for k in ("cuda", "triton-gather", "triton-matmul", "torch-dense")
                            if k in row), flush=True)
        print(f"  -> torch-dense first beats cuda at density {crossover}  ({time.time() - t_start:.0f} s so far)")
# fused AdamW + weight write: cuda vs Triton vs torch (AdamW ops + index write), one 4096x14336 weight
shape = (4096, 14336)
for dtype in (torch.float32, torch.bfloat16):
    w = torch.randn(shape, device=dev).to(dtype)
    for n in (10**5, 10**6, 10**7):
        rows, cols = mask_positions(shape, n, KEY, dev)
        base = su.gather_weight_torch(w, rows, cols)
        delta, grad, m, v = (torch.rand(n, device=dev) for _ in range(4))
        kw = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, step=5, positions=(rows, cols))
        row = {"dtype": str(dtype), "n": n,
               "cuda": ms(lambda: native.masked_adamw_cuda(w, base, delta, grad, m, v, KEY, **kw)),
               "torch": ms(lambda: ma.masked_adamw_torch(w, base, delta, grad, m, v, KEY, **kw))}
        if HAS_TRITON:
            row["triton"] = ms(lambda: ma.masked_adamw_triton(w, base, delta, grad, m, v, KEY, **kw))
        results["adamw"].append(row)
        print(f"adamw {str(dtype):15} n={n:9d}  " + "  ".join(f"{k}={row[k]:.4f}" for k in ("cuda", "triton", "torch")
                                                            if k in row), flush=True)
with open(os.environ["CUDA_BACKEND_JSON"], "w") as f:
    json.dump(results, f, indent=1)
print("wrote", os.environ["CUDA_BACKEND_JSON"])
PYEOF
echo "timing exit status $?"
save_results
# host cost per layer, Triton launches vs CUDA C++ launches (the 1B step is host-bound: see BENCHMARKS.md)
timeout 40 $PY benchmarks/bench_overhead.py --device cuda --backends triton,cuda
echo "overhead (triton vs cuda) exit status $?"
save_results
echo "== gpu_check done in $(( $(date +%s) - START )) s; log: $LOG"
