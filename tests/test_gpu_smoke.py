"""The gpu tier's tests at tiny sizes on the CPU under the Triton interpreter: they run where no GPU is, so a run on a
GPU never finds them broken."""
import os
import pathlib
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

pytestmark = pytest.mark.full


def test_gpu_tier_passes_at_smoke_sizes(tmp_path):
    env = {**os.environ, "RANDMASK_GPU_SMOKE": "1", "TRITON_INTERPRET": "1"}
    tests = pathlib.Path(__file__).resolve().parent / "gpu"
    report = tmp_path / "gpu.xml"
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", str(tests),
                          "--junitxml", str(report)], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    suite = ET.parse(report).getroot()
    suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
    count = {k: int(suite.get(k)) for k in ("tests", "failures", "errors", "skipped")}
    assert count["failures"] == count["errors"] == 0 and count["tests"] - count["skipped"] > 0, count
