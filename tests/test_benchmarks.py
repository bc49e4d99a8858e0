"""Smoke tests of the benchmark tools that change how timings are taken (tiny sizes; the timings are not checked)."""
import os
import pathlib
import re
import subprocess
import sys

import pytest

from randmask.kernels import native

BENCHMARKS = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
from common import time_interleaved  # noqa: E402


def test_time_interleaved_calls_before_just_before_every_timed_call():
    events = []
    fns = {name: (lambda name=name: events.append(name)) for name in ("a", "b", "c")}
    times = time_interleaved(fns, "cpu", rounds=4, before=lambda: events.append("before"))
    assert {name: len(t) for name, t in times.items()} == {"a": 4, "b": 4, "c": 4}
    # warm_below_s=0: one untimed call of each variant in the first round only, then `before`, then the timed call
    first_round, later = events[:9], events[9:]
    assert [first_round[i:i + 3][1:] for i in range(0, 9, 3)] == [["before", first_round[i]] for i in range(0, 9, 3)]
    assert later[0::2] == ["before"] * 9 and sorted(later[1::2]) == sorted(["a", "b", "c"] * 3)


def _run(script, *args):
    env = {**os.environ, "PYTHONPATH": str(BENCHMARKS.parent)}
    done = subprocess.run([sys.executable, str(BENCHMARKS / script), *args], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.skipif(not native.HAS_NATIVE, reason="native CPU library not built")
def test_bench_masked_grad_cold_against_another_build():
    other = native.library_path()  # the same build under another name: the by-round ratio column must appear
    out = _run("bench_masked_grad.py", "--shapes", "24x40", "--tokens", "32", "--densities", "0.05", "--repeats", "3",
               "--cold", "--native-lib", str(other), "--no-save")
    assert "cold caches" in out
    assert f"native/native@{other.stem} by round=" in out


def test_profile_step_times_masked_grad_calls_per_shape():
    out = _run("profile_step.py", "--method", "randmask", "--setting", "all-linear", "--masked-grad-calls",
               "--batch", "1", "--seq", "8", "--warmup", "1", "--steps", "1")
    calls = {m[1]: int(m[2]) for m in re.finditer(r"^\| (\d+x\d+) \| (\d+) \| [0-9.]+ \|$", out, re.M)}
    # SmolLM2-135M's four shapes, each called once per layer and matrix (30 layers; q,o / k,v / gate,up / down)
    assert calls == {"576x576": 60, "192x576": 60, "1536x576": 60, "576x1536": 30}
