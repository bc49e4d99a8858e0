"""`randmask finetune --distributed` under torchrun with 2 CPU ranks (gloo) on the tiny task: one adapter and one
metrics.json, and the trained values of a single-process run on the same global batches (fp32 tolerance)."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from randmask.recipes import finetune as F

pytestmark = pytest.mark.full


def args(model_dir, csv_file, out):
    # 24 training examples in batches of 4 (2 a rank): 6 steps an epoch, 12 in all
    return ["--model", str(model_dir), "--data", str(csv_file), "--split", "40,16,16", "--max-train", "24",
            "--epochs", "2", "--batch-size", "4", "--method", "randmask", "--density", "0.25", "--lr", "1e-2",
            "--dtype", "float32", "--threads", "1", "--no-progress", "--output-dir", str(out)]


@pytest.mark.parametrize("mode", ["fsdp", "ddp"])
def test_finetune_under_torchrun_trains_as_one_process(tmp_path, model_dir, csv_file, mode):
    out = tmp_path / "ranks"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "randmask", "finetune", *args(model_dir, csv_file, out), "--distributed", mode],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-4000:]
    assert sorted(p.name for p in out.iterdir() if p.suffix in (".safetensors", ".json")) == \
        ["metrics.json", "randmask_adapter.safetensors"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["processes"] == 2 and metrics["methods"]["randmask"]["steps"] == 12

    single = F.run(F.Settings(**{**vars(F.Settings()), **dict(
        model=str(model_dir), data=str(csv_file), split=(40, 16, 16), max_train=24, epochs=2, batch_size=4,
        methods=("randmask",), density=0.25, lr=1e-2, dtype="float32", threads=1, progress=False,
        output_dir=str(tmp_path / "single"))}), log=lambda *a: None)
    got = load_file(out / "randmask_adapter.safetensors")
    want = load_file(tmp_path / "single" / "randmask_adapter.safetensors")
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5)
    losses = metrics["methods"]["randmask"]["train_loss"]
    assert losses == pytest.approx(single["methods"]["randmask"]["train_loss"], rel=1e-4)


def test_distributed_without_a_launcher_is_one_line(capsys, model_dir, csv_file, tmp_path):
    from randmask.recipes.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["finetune", *args(model_dir, csv_file, tmp_path), "--distributed", "fsdp"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and "torchrun --nproc_per_node" in err[0]
