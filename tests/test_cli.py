"""The README's main job (`python -m randmask demo`), shortened."""
import re
import subprocess
import sys


def test_demo_changes_exactly_the_masked_entries_and_lowers_the_loss():
    out = subprocess.run([sys.executable, "-m", "randmask", "demo", "--steps", "30", "--targets", "q_proj,down_proj"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    first, last = map(float, re.search(r"eval loss ([\d.]+) -> ([\d.]+)", out.stdout).groups())
    assert last < first
    changed, trainable = re.search(r"entries changed in the whole model: ([\d,]+) \(trainable values: ([\d,]+)\)",
                                   out.stdout).groups()
    assert changed == trainable and int(trainable.replace(",", "")) > 0
    assert out.stdout.count("all others bitwise unchanged: True") == 4


def test_help_explains():
    out = subprocess.run([sys.executable, "-m", "randmask", "demo", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--density" in out.stdout and "fraction of each targeted matrix" in out.stdout
