#!/usr/bin/env bash
# gpu_check.sh: the checks that need a GPU (H100 / H200), as one prepared script.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR] [SECTION ...]    results in OUT_DIR (default: $OUT, else
#                                                          benchmarks/results/gpu); sections default to
#                                                          "triton micro e2e"; "all" is every section
#   bash benchmarks/gpu_check.sh "$OUT" e2e-8b e2e-compile  the longer end-to-end runs, as a second call
#
# Sections and their time limits (each step runs under `timeout`, so a hang cannot eat the machine's time):
#   triton        the gpu test tier: `pytest -m gpu tests/gpu` (every Triton kernel against its torch twin in
#                 fp32 / fp16 / bf16, the dense twin in a CUDA graph, MaskedLinear and MaskedAdamW end to end;
#                 transformers' Trainer with accelerate's FSDP2 on a randmask model under torchrun)          <= 240 s
#   micro         bench_masked_grad (4096-wide bf16 at 8192 and 512 tokens; every implementation, dispatch and the
#                 baselines), bench_update, bench_overhead (host cost per layer), and a sweep of the gather kernel's
#                 block shape at density 1e-5..1e-3 (GATHER_BLOCK_K / _T / _NUM_WARPS patched per call)     <= 315 s
#   e2e           bench_e2e, Llama-1B shape, bf16, q,v and all-linear: frozen floor, randmask, LoRA, SHiRA,
#                 naive, full, one process each (the floor and full once for both settings: 10 processes)   <= 300 s
#                 then frozen, randmask, LoRA in one process, steps interleaved (step time only)           <= 120 s
#   e2e-8b        bench_e2e, Llama-3-8B shape, bf16, q,v: frozen floor, randmask, LoRA (3 processes)        <= 110 s
#   e2e-compile   bench_e2e --compile reduce-overhead, 1B, q,v: frozen floor, randmask, LoRA (the eager 1B step is
#                 host-bound; with the Python and launch cost gone, how close is randmask to the floor?)   <= 400 s
#   e2e-4bit-8b   bench_e2e --quantize 4bit, Llama-3-8B shape, bf16 compute, q,v: the frozen 4-bit floor, randmask
#                 (additive on the 4-bit base), QLoRA (3 processes; step time and peak memory)               <= 150 s
#   fits-4bit     bench_e2e --quantize 4bit --fits 8b,13b,34b,70b: the largest Llama shape whose q,v randmask step
#                 fits in the GPU, tried largest first (each built on "meta" and quantized a layer at a time on
#                 the GPU, never dense), with QLoRA's peak memory at that shape beside it (2 processes when the
#                 70B fits)                                                                                  <= 420 s
#   fsdp-1gpu     bench_distributed, 1B shape, bf16: one plain process against FSDP2 and DDP on one rank under
#                 torchrun (one GPU cannot show sharding: this checks that the FSDP path runs on CUDA/NCCL and
#                 what it costs over the plain step)                                                         <= 180 s
# Sum of the limits: default sections 975 s, e2e-8b + e2e-compile 510 s, e2e-4bit-8b + fits-4bit 570 s; in practice
# e2e takes ~25 s per process, mostly start-up. Add the machine's start when sizing one call against a time budget.
# The two 4-bit sections need bitsandbytes (the device image has none): `bash benchmarks/gpu_wheels.sh` here fetches it
# with the PEFT and accelerate the tests run with into .whl/; carry .whl and they are installed into a temporary folder.
#
# Every benchmark appends its rows to OUT_DIR/results.jsonl (RANDMASK_BENCH_RESULTS), with the commit from git or,
# where this copy of the tree has no git metadata, from $RANDMASK_BENCH_COMMIT (pass it in). Back on the main machine,
# `python benchmarks/report.py --add OUT_DIR/results.jsonl` merges the new runs into benchmarks/results/results.jsonl.gz
# and writes their tables. OUT_DIR holds only a few files (a device machine returns at most 8): gpu_check.txt (the
# log), results.jsonl, reports.tgz (this run's tables and plots, repacked after every step, so a run cut short keeps
# what it had), pytest-gpu.xml.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-benchmarks/results/gpu}}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
LOG="$OUT_DIR/gpu_check.txt"
export RANDMASK_BENCH_RESULTS="$OUT_DIR/results.jsonl"
REPORTS="${TMPDIR:-/tmp}/randmask-gpu-reports"  # outside OUT_DIR: it comes back packed, as one file
exec > >(tee -a "$LOG") 2>&1
PY="${PYTHON:-python3}"  # the device image's python3 holds torch; there may be no `python`
START=$(date +%s)
shift $(( $# > 0 ? 1 : 0 ))
SECTIONS=" ${*:-triton micro e2e} "
[[ "$SECTIONS" == *" all "* ]] && SECTIONS=" triton micro e2e e2e-8b e2e-compile e2e-4bit-8b fits-4bit fsdp-1gpu "
want() { [[ "$SECTIONS" == *" $1 "* ]]; }
elapsed() { echo "($(( $(date +%s) - START )) s so far)"; }
# the tables and plots of every run in OUT_DIR/results.jsonl, packed into one file
save_reports() {
  [ -f "$RANDMASK_BENCH_RESULTS" ] || return 0
  rm -rf "$REPORTS" && mkdir -p "$REPORTS"
  $PY benchmarks/report.py --results "$RANDMASK_BENCH_RESULTS" --out "$REPORTS" > /dev/null &&
    tar czf "$OUT_DIR/reports.tgz" -C "$REPORTS" . 2> /dev/null
}
echo "== gpu_check $(date -u +%FT%TZ) on $(hostname); sections:$SECTIONS"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 || echo "nvidia-smi failed"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda,
                 'gpu', torch.cuda.is_available() and torch.cuda.get_device_name())" || { echo "no torch"; exit 1; }

# The device has no network and pip's editable install wants to fetch setuptools: no install. Lay the package out as
# setup.py's package_dir does (kernels/ as randmask/kernels, a link in this copy of the tree) and use PYTHONPATH.
# The native CPU library is not built here: nothing on this machine's GPU path uses it.
[ -e randmask/kernels ] || ln -s ../kernels randmask/kernels
SITE="${TMPDIR:-/tmp}/randmask-gpu-site"  # the carried wheels (benchmarks/gpu_wheels.sh), when there are any
if compgen -G ".whl/*.whl" > /dev/null; then
  $PY -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl ||
    echo "the carried wheels did not install: the device's own packages are used"
fi
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
$PY -c "import randmask, randmask.kernels; print('randmask from', randmask.__file__)" || exit 1
$PY -c "import importlib.metadata as m, importlib.util as u
print(*(f'{p} {m.version(p) if u.find_spec(p) else None}' for p in
        ('triton', 'transformers', 'peft', 'accelerate', 'bitsandbytes', 'safetensors', 'pytest')), sep=', ')" 2>&1
echo "commit measured: $($PY -c 'import sys; sys.path.insert(0, "benchmarks"); import harness; print(harness.git_commit())')"

# ------------------------------------------------------------------------------------------------ triton
if want triton; then
  echo; echo "== section triton: the gpu test tier $(elapsed)"
  # tests/conftest.py defaults TRITON_INTERPRET to 1 (the CPU tests run the kernels interpreted): compiled here
  TRITON_INTERPRET=0 timeout 240 $PY -m pytest -q -p no:cacheprovider -m gpu tests/gpu \
    --junitxml="$OUT_DIR/pytest-gpu.xml"
  echo "gpu tests exit status $?"
fi

# ------------------------------------------------------------------------------------------------ micro
if want micro; then
  echo; echo "== section micro $(elapsed)"
  timeout 120 $PY benchmarks/bench_masked_grad.py --device cuda --dtype bfloat16 --shapes 4096x4096,4096x14336 \
    --tokens 8192 --densities 1e-5,1e-4,1e-3,1e-2,3e-2 --repeats 5 --no-report
  echo "masked-grad (8192 tokens) exit status $?"; save_reports
  timeout 40 $PY benchmarks/bench_masked_grad.py --device cuda --dtype bfloat16 --shapes 4096x4096 \
    --tokens 512 --densities 1e-5,1e-4,1e-3,1e-2,3e-2,1e-1 --repeats 5 --no-report
  echo "masked-grad (512 tokens) exit status $?"; save_reports
  timeout 50 $PY benchmarks/bench_update.py --device cuda --no-report
  echo "update exit status $?"; save_reports
  timeout 45 $PY benchmarks/bench_overhead.py --device cuda --no-report  # host cost per layer
  echo "overhead exit status $?"; save_reports
  # The gather kernel's block shape at low density: do wide slot blocks (few tokens each) let the slots of one
  # program share token rows through L1? (the kernel as dispatched: 128 slots x 32 tokens, 4 warps)
  timeout 60 $PY - << 'PYEOF'
import statistics, sys, torch
sys.path.insert(0, "benchmarks")
from harness import Run
from randmask.kernels import masked_grad as mg

dev = torch.device("cuda")
key = 0x0123456789ABCDEF
run = Run("gather_sweep", dev, "bfloat16", command="benchmarks/gpu_check.sh micro: gather block-shape sweep")

def times(fn, reps=10):
    fn(); torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(); fn(); end.record(); end.synchronize()
        out.append(start.elapsed_time(end) / 1e3)
    return out

blocks = ((128, 32, 4), (512, 8, 4), (1024, 4, 4), (1024, 4, 8), (2048, 2, 8), (4096, 1, 8), (4096, 1, 16))
default = (mg.GATHER_BLOCK_K, mg.GATHER_BLOCK_T, mg.GATHER_NUM_WARPS)
for (out, inf), T in (((4096, 4096), 8192), ((4096, 14336), 8192), ((4096, 4096), 512)):
    x = torch.randn(T, inf, device=dev).to(torch.bfloat16)
    gy = torch.randn(T, out, device=dev).to(torch.bfloat16)
    for density in (1e-5, 1e-4, 1e-3):
        n = round(density * out * inf)
        params = {"shape": f"{out}x{inf}", "tokens": T, "dtype": "bfloat16", "density": density, "n": n}
        cells = []
        try:
            for mg.GATHER_BLOCK_K, mg.GATHER_BLOCK_T, mg.GATHER_NUM_WARPS in blocks:
                name = f"gather[{mg.GATHER_BLOCK_K}x{mg.GATHER_BLOCK_T},{mg.GATHER_NUM_WARPS}]"
                row = run.add(params, name, times(lambda: mg.masked_grad_gather_triton(x, gy, n, key)))
                cells.append(f"{name}={row['s'] * 1e3:.3f}")
        finally:
            mg.GATHER_BLOCK_K, mg.GATHER_BLOCK_T, mg.GATHER_NUM_WARPS = default
        row = run.add(params, "triton-matmul", times(lambda: mg.masked_grad_matmul_triton(x, gy, n, key)))
        cells.append(f"triton-matmul={row['s'] * 1e3:.3f}")
        print(f"{out}x{inf} T={T} d={density:.0e} n={n}  " + "  ".join(cells), flush=True)
PYEOF
  echo "gather block sweep exit status $?"; save_reports
fi

# ------------------------------------------------------------------------------------------------ e2e
if want e2e; then
  echo; echo "== section e2e (1B) $(elapsed)"
  timeout 300 $PY benchmarks/bench_e2e.py --device cuda --shape 1b --dtype bfloat16 --steps 10 --warmup 3 --rounds 1 \
    --no-report
  echo "e2e 1b exit status $?"; save_reports
  # the same step with frozen / randmask / LoRA in one process, steps interleaved: the host-bound eager step moves
  # by up to 1.7x between processes, so per-process ratios are coarse
  timeout 120 $PY benchmarks/bench_e2e.py --device cuda --shape 1b --dtype bfloat16 --steps 30 --warmup 5 \
    --one-process --methods frozen,randmask,lora --no-report
  echo "e2e 1b one-process exit status $?"; save_reports
fi
if want e2e-8b; then
  echo; echo "== section e2e-8b $(elapsed)"
  timeout 110 $PY benchmarks/bench_e2e.py --device cuda --shape 8b --dtype bfloat16 --steps 10 --warmup 3 \
    --rounds 1 --settings qv --methods frozen,randmask,lora --no-report
  echo "e2e 8b exit status $?"; save_reports
fi
if want e2e-compile; then
  echo; echo "== section e2e-compile $(elapsed)"
  timeout 400 $PY benchmarks/bench_e2e.py --device cuda --shape 1b --dtype bfloat16 --steps 10 --warmup 3 \
    --rounds 1 --settings qv --methods frozen,randmask,lora --compile reduce-overhead --no-report
  echo "e2e compile exit status $?"; save_reports
fi
# the 4-bit sections: a clear line instead of a traceback per process when bitsandbytes cannot run here
have_bnb() {
  $PY -c "import bitsandbytes, torch
bitsandbytes.functional.quantize_4bit(torch.randn(64, 64, device='cuda'))  # its CUDA library works
print('bitsandbytes', bitsandbytes.__version__, 'from', bitsandbytes.__file__)" 2>&1 | grep -v kernels-community ||
    { echo "bitsandbytes cannot run here: section $1 skipped (carry .whl: benchmarks/gpu_wheels.sh)"; return 1; }
}
if want e2e-4bit-8b && have_bnb e2e-4bit-8b; then
  echo; echo "== section e2e-4bit-8b $(elapsed)"
  timeout 150 $PY benchmarks/bench_e2e.py --device cuda --shape 8b --dtype bfloat16 --quantize 4bit --steps 10 \
    --warmup 3 --rounds 1 --settings qv --methods frozen,randmask,lora --no-report
  echo "e2e 4-bit 8b exit status $?"; save_reports
fi
if want fits-4bit && have_bnb fits-4bit; then
  echo; echo "== section fits-4bit $(elapsed)"
  timeout 420 $PY benchmarks/bench_e2e.py --device cuda --dtype bfloat16 --quantize 4bit --fits 8b,13b,34b,70b \
    --steps 3 --warmup 1 --no-report
  echo "fits 4-bit exit status $?"; save_reports
fi
if want fsdp-1gpu; then
  echo; echo "== section fsdp-1gpu $(elapsed)"
  timeout 180 $PY benchmarks/bench_distributed.py --device cuda --shape 1b --dtype bfloat16 --ranks 1 \
    --modes ddp,fsdp --one-rank-too --steps 10 --warmup 3 --no-report
  echo "fsdp 1 gpu exit status $?"; save_reports
fi
echo "== gpu_check done in $(( $(date +%s) - START )) s; log: $LOG"
