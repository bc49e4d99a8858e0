"""What every benchmark shares: timing, the machine's name, peak-memory probes, and the one results dataset.

    time_call(fn, device, repeats, warmup)    -> (median seconds, [seconds]); CUDA synchronized around each call
    time_interleaved(fns, device, rounds, warm_below_s, seed, before) -> {name: [seconds per round]}
    evict_caches(device)                      -> a callable that reads 128 MiB (for time_interleaved's `before`)
    machine_name(device), load_average(), git_commit(), versions()
    PeakRSS, cuda_peak_start / cuda_peak_bytes   peak-memory probes
    Run(bench, device, table, results, tag=)  one invocation: .add(params, variant, seconds, stat, **figures)
                                              appends one row to the dataset; .report() writes its tables

The dataset is one JSON object per line in benchmarks/results/results.jsonl.gz, gzip-compressed
($RANDMASK_BENCH_RESULTS or each script's --results point elsewhere: the tests, a GPU machine's $OUT). Rows are
only ever appended. Every row has:

    bench     "masked_grad", "update", "positions", "overhead", "e2e", "step_masked_grad", ...
    run       the id shared by the rows of one invocation ("20261128T101500Z-3fa2")
    table     which table the run fills ("float32_T512_1t"): per (bench, machine, table) the latest run is current
    machine   "AMD EPYC (x86_64), 2 cores" / "NVIDIA H200"; device "cpu" / "cuda"
    commit    `git rev-parse --short HEAD` of the tree measured, "+dirty" when it had uncommitted changes outside
              benchmarks/results ($RANDMASK_BENCH_COMMIT when the tree has no git metadata)
    date      the run's start, UTC ISO; torch, triton: versions (triton null when absent)
    command   the run's command line; load: the 1-minute load average when the row was written
    params    the problem: shape, tokens, dtype, density, n, threads, ... (what the table's rows and columns are)
    variant   the implementation or method measured
    seconds   the measured times (per round, per step or per call; [] where only the statistic survived)
    stat      how `s` summarises them ("median", "min"); s: that statistic, seconds (null: not measured)
and any other figures a bench measures (peak_bytes, trainable, adapter_bytes, picks, ...); "note" where a run needs
one (the rows converted from the earlier per-run files say what they lack).
Tables and plots are made from the dataset only, by report.py; every bench script ends by reporting its own run.

Each benchmark stays runnable on its own (`python benchmarks/bench_x.py`): it puts this folder on sys.path first.
Stdlib only; torch is imported where a function needs it.
"""
import datetime
import gzip
import json
import os
import pathlib
import platform
import random
import shlex
import statistics
import subprocess
import sys
import time

# the fields every row has (the figures a bench adds come after them)
REQUIRED = ("bench", "run", "table", "machine", "device", "commit", "date", "torch", "triton", "command", "load",
            "params", "variant", "seconds", "stat", "s")
HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
DATASET = HERE / "results" / "results.jsonl.gz"  # gzip-compressed: the history stays small in git
ENV_DATASET = "RANDMASK_BENCH_RESULTS"
ENV_COMMIT = "RANDMASK_BENCH_COMMIT"


# ---------------------------------------------------------------------------------------------------- timing
def synchronize(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn, device="cpu", repeats=5, warmup=1):
    """Median wall time of fn() in seconds over `repeats` calls after `warmup` untimed ones, and every time."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return (statistics.median(times) if times else None), times


def time_interleaved(fns, device, rounds, warm_below_s=0.0, seed=0, before=None) -> dict:
    """{name: [seconds per round]} for the zero-argument callables `fns`, one call of each per round in an order
    shuffled each round: a call right after one with big temporaries runs slower (up to 2x on a CPU), and a load
    spike on a shared machine then hits every variant alike. A variant whose last call took under warm_below_s gets
    an untimed call just before its timed one (caches warm with its own operands); `before`, if given, runs
    (untimed) after that, just before every timed call."""
    times = {name: [] for name in fns}
    order, shuffle = list(fns), random.Random(seed).shuffle
    for _ in range(rounds):
        shuffle(order)
        for name in order:
            if not times[name] or times[name][-1] < warm_below_s:
                fns[name]()
            if before is not None:
                before()
            synchronize(device)
            start = time.perf_counter()
            fns[name]()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


def evict_caches(device, nbytes=128 << 20):
    """A callable that reads `nbytes` (default 4x a 32 MiB L3), so the next call's operands come from memory, as the
    activations do in a training step's backward."""
    import torch

    flush = torch.ones(nbytes // 4, device=device)
    return flush.sum


def pick(times, stat="median"):
    """The statistic of a list of seconds (None for an empty list)."""
    if not times:
        return None
    return min(times) if stat == "min" else statistics.median(times)


# ---------------------------------------------------------------------------------------------------- the machine
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine_name(device) -> str:
    """"NVIDIA H200" for a GPU; "AMD EPYC (x86_64), 2 cores" for a CPU (threads and versions are row fields)."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({platform.machine()}), {os.cpu_count()} cores"


def load_average():
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def versions() -> dict:
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"torch": torch.__version__, "triton": triton_version}


def git_commit() -> str:
    """The short commit of the tree measured, "+dirty" when code differs from it (the results folder aside)."""
    if os.environ.get(ENV_COMMIT):
        return os.environ[ENV_COMMIT]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=30)
        if head.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--", ".", ":!benchmarks/results"], cwd=ROOT,
                               capture_output=True, text=True, timeout=60)
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)


# ---------------------------------------------------------------------------------------------------- memory
class PeakRSS:
    """Growth of this process's peak resident set over a region: probe.start(); ...; probe.growth() (bytes).

    Not plain ru_maxrss: a child inherits its parent's high-water mark across fork + exec, so in a child of a big
    parent its growth can read 0 while real temporaries come and go. start() resets the mark to the current RSS
    (writing 5 to /proc/self/clear_refs, Linux >= 4.0) and growth() reads VmHWM; where that is not allowed it falls
    back to ru_maxrss and says so (`.how`)."""

    def __init__(self):
        self.how = None
        self.base = None

    @staticmethod
    def _status_kib(field: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        raise OSError(f"{field} not in /proc/self/status")

    def start(self) -> None:
        import gc

        gc.collect()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.base = self._status_kib("VmRSS")
            self.how = "VmHWM after resetting it (clear_refs)"
        except OSError:
            import resource

            self.base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            self.how = "ru_maxrss growth (no clear_refs: may under-read in a child of a big parent)"

    def growth(self) -> int:
        """Bytes the peak resident set rose above the RSS at start()."""
        if self.how.startswith("VmHWM"):
            peak = self._status_kib("VmHWM")
        else:
            import resource

            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return max(0, peak - self.base) * 1024


def cuda_peak_start(device) -> int:
    """Reset CUDA's peak-memory counter; returns the bytes allocated now (subtract from cuda_peak_bytes)."""
    import torch

    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def cuda_peak_bytes(device) -> int:
    import torch

    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device)


# ---------------------------------------------------------------------------------------------------- the dataset
def dataset_path(path=None) -> pathlib.Path:
    """The dataset written and read: `path`, else $RANDMASK_BENCH_RESULTS, else benchmarks/results/results.jsonl.gz
    (a name ending in .gz is gzip-compressed JSON lines, read and appended to as such)."""
    return pathlib.Path(path or os.environ.get(ENV_DATASET) or DATASET).resolve()


def _open(path: pathlib.Path, mode: str):
    return gzip.open(path, mode, encoding="utf-8") if path.suffix == ".gz" else open(path, mode, encoding="utf-8")


def read_rows(path=None) -> list:
    path = dataset_path(path)
    if not path.exists():
        return []
    with _open(path, "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


def append_rows(rows, path=None) -> None:
    path = dataset_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _open(path, "at") as f:  # appending to a .gz adds a gzip member; readers see one stream
        for row in rows:
            f.write(json.dumps(row, separators=(",", ":")) + "\n")


def add_matrix_arguments(parser, *, shapes: str, densities: str, repeats: int) -> None:
    """The options of a per-matrix microbenchmark: the problem (shapes, tokens, dtype, device, densities) and the
    timing (interleaved rounds, statistic, threads)."""
    parser.add_argument("--shapes", default=shapes, help="comma-separated OUTxIN (default: SmolLM2-135M's)")
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--densities", default=densities)
    parser.add_argument("--repeats", type=int, default=repeats, help="interleaved rounds")
    parser.add_argument("--stat", default="median", choices=["median", "min"],
                        help="min is steadier on a shared machine")
    parser.add_argument("--threads", type=int, default=0, help="torch (and native) CPU threads; 0: torch's default")


def add_results_argument(parser) -> None:
    parser.add_argument("--results", metavar="PATH", default=None,
                        help=f"the dataset to append to (default ${ENV_DATASET}, else {DATASET.relative_to(ROOT)}); "
                             "the tables and plots of this run go beside it")
    parser.add_argument("--tag", default="", help="appended to the run's table name, for a run whose rows should not "
                        "supersede the default table's (e.g. --tag direct-path)")
    parser.add_argument("--no-report", action="store_true", help="append the rows only, make no tables or plots")


class Run:
    """One invocation of a benchmark: the fields its rows share, and add() to append a row at once (so a run cut
    short keeps what it measured)."""

    def __init__(self, bench: str, device, table: str = "", results=None, note: str = "", command: str = "",
                 tag: str = ""):
        start = utc_now()
        table = "_".join(part for part in (table, tag) if part)
        self.path = dataset_path(results)
        self.bench = bench
        self.id = f"{start:%Y%m%dT%H%M%SZ}-{random.SystemRandom().randrange(16**4):04x}"
        self.base = {"bench": bench, "run": self.id, "table": table, "machine": machine_name(device),
                     "device": _device_type(device), "commit": git_commit(), "date": start.isoformat().replace(
                         "+00:00", "Z"), **versions(),
                     "command": command or " ".join(shlex.quote(a) for a in [_script(sys.argv[0]), *sys.argv[1:]])}
        if note:
            self.base["note"] = note
        self.rows = []

    def add(self, params: dict, variant: str, seconds=(), stat="median", **figures) -> dict:
        """Append one row: `seconds` the measured times, `s` their `stat` unless given; figures: any others."""
        seconds = [float(t) for t in seconds]
        row = {**self.base, "load": load_average(), "params": params, "variant": variant, "seconds": seconds,
               "stat": stat, "s": figures.pop("s", pick(seconds, stat)), **figures}
        append_rows([row], self.path)
        self.rows.append(row)
        return row

    def report(self, enabled=True) -> list:
        """Tables and plots of this run, beside the dataset (report.py); returns the files written."""
        if not enabled or not self.rows:
            return []
        import report

        written = report.write_reports(self.rows, self.path.parent)
        for path in written:
            if path.suffix == ".md":
                print("\n" + path.read_text())
        print("wrote " + ", ".join(str(path) for path in written))
        return written


def _device_type(device) -> str:
    return str(device).split(":")[0]


def _script(path) -> str:
    try:
        return str(pathlib.Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return path


# ---------------------------------------------------------------------------------------------------- formatting
def markdown_table(headers, rows) -> str:
    lines = ["| " + " | ".join(map(str, headers)) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines)


def fmt_ms(seconds) -> str:
    if seconds is None:
        return "–"
    ms = seconds * 1e3
    return f"{ms:.3f}" if ms < 1 else f"{ms:.2f}" if ms < 10 else f"{ms:.1f}" if ms < 100 else f"{ms:.0f}"


def fmt_mib(nbytes) -> str:
    if nbytes is None:
        return "–"
    mib = nbytes / 2**20
    return f"{mib:.2f}" if mib < 10 else f"{mib:.0f}"
