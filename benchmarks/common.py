"""Helpers shared by the microbenchmarks: timing, machine name, results.

    time_call(fn, device, repeats, warmup)  -> (median seconds, all seconds): CUDA is synchronized around each call
    time_interleaved(fns, device, rounds, warm_below_s, before=None) -> {name: [seconds]}: one call of each per round,
                                              the order shuffled each round (seeded), so no variant keeps one
                                              predecessor; before() runs untimed before each timed call
    machine_name(device)                    -> "NVIDIA H100 80GB HBM3" or "AMD EPYC (x86_64), 2 cores, 2 torch threads"
    load_average()                          -> the 1-minute load average (recorded so a disturbed run is visible)
    markdown_table(headers, rows)           -> a GitHub markdown table
    write_results(stem, data, markdown, plot) -> stem.json, stem.md, stem.png under benchmarks/results/
    PeakRSS()                               -> CPU peak-memory probe: .start() then .growth() in bytes

Why PeakRSS and not just ru_maxrss: a child process inherits its parent's peak RSS across fork + exec (Linux
carries the pre-exec mm's high-water mark into ru_maxrss), so in a child started from a big parent the growth of
ru_maxrss can read 0 while real temporaries come and go. PeakRSS resets the high-water mark to the current RSS
(writing 5 to /proc/self/clear_refs, Linux >= 4.0) and reads VmHWM from /proc/self/status afterwards; where that
is not allowed it falls back to ru_maxrss and says so (`.how`).

Each benchmark stays runnable on its own (`python benchmarks/bench_x.py`): it puts this folder on sys.path first.
"""
import json
import os
import pathlib
import platform
import random
import statistics
import time

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


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
    shuffled each round: a call right after one with big temporaries runs slower (measured up to 2x on the CPU), and
    a load spike on a shared machine then hits every variant alike. A variant whose last call took under
    warm_below_s gets an untimed call just before its timed one (caches warm with its own operands); `before`, if
    given, is called (untimed) after that, just before every timed call."""
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
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return (f"{cpu_model()} ({platform.machine()}), {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
            f"torch {torch.__version__}")


def load_average() -> float:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return float("nan")


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


class PeakRSS:
    """Growth of this process's peak resident set over a region: probe.start(); ...; probe.growth() (bytes)."""

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
                f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
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


def write_results(stem: str, data: dict, markdown: str, plot=None) -> pathlib.Path:
    """Write RESULTS/stem.{json,md} and, when given, plot(data, RESULTS/stem.png); returns the stem path."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / stem
    path.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")
    path.with_suffix(".md").write_text(markdown + "\n")
    if plot is not None:
        import matplotlib

        matplotlib.use("Agg")
        plot(data, path.with_suffix(".png"))
    return path
