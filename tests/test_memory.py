"""Masking a big layer costs memory in proportion to n, never to out x in. Measured in a fresh process as the growth
of its peak resident memory (VmHWM, reset through /proc/self/clear_refs after the 8192 x 8192 weight itself has been
made and touched). ru_maxrss would not do: a child inherits its parent's peak across fork and exec."""
import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.full,  # fresh processes
              pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"),
                                 reason="the peak is reset through /proc/self/clear_refs (Linux only)")]

SCRIPT = """
import sys, torch, torch.nn as nn
from randmask import MaskedLinear
def peak_kib():
    return int(next(line for line in open("/proc/self/status") if line.startswith("VmHWM")).split()[1])
linear = nn.utils.skip_init(nn.Linear, 8192, 8192, bias=False)
linear.weight.requires_grad_(False).fill_(0.5)             # 256 MB, touched before measuring
MaskedLinear.from_linear(nn.Linear(64, 64), density=0.1)   # warm up lazy imports and allocator pools
open("/proc/self/clear_refs", "w").write("5")             # peak := current resident memory
before = peak_kib()
if sys.argv[1] == "dense":                                  # the harness must see a dense bool mask (64 MB)
    extra = torch.ones(8192, 8192, dtype=torch.bool).sum()
else:
    layer = MaskedLinear.from_linear(linear, density=1e-5, name="big")
    assert layer.n == 671 and layer.weight.data_ptr() == linear.weight.data_ptr()
print(peak_kib() - before)   # KiB
"""


def peak_growth_kib(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True,
                         env={"RANDMASK_BACKEND": "torch", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    return int(out.stdout.split()[-1])


def test_the_measurement_sees_a_dense_temporary():
    assert peak_growth_kib("dense") > 60 * 1024


def test_from_linear_on_8192_square_allocates_o_n():
    # n = 671: delta (4 B), base (4 B) and cached positions (16 B) per value is ~16 KB, and the position arithmetic
    # works in chunks of at most 64K int64 values (~a few MB). Any out x in temporary would be >= 64 MB.
    growth = peak_growth_kib("masked")
    assert growth < 8 * 1024, f"peak resident memory grew by {growth / 1024:.1f} MB"
