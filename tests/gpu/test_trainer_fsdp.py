"""transformers' Trainer with accelerate's FSDP2 on a randmask model, on the GPU as users run it (the CPU tier runs
the same worker on gloo, with accelerate's device check turned, in tests/test_distributed.py):
tests/trainer_fsdp_worker.py under torchrun on up to 2 GPUs (one runs accelerate's FSDP2 path too, at world size 1);
its adapter, loaded onto a fresh single-process base, gives the sharded model's logits."""
import os
import subprocess
import sys

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
WORKER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "trainer_fsdp_worker.py")


def test_trainer_with_accelerate_fsdp2_trains_a_randmask_model(tmp_path):
    ranks = min(2, torch.cuda.device_count())
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(ranks), WORKER, str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-8000:]
    sys.path.insert(0, os.path.dirname(WORKER))
    from trainer_fsdp_worker import tiny_llama

    import randmask

    saved = torch.load(tmp_path / "logits.pt")
    model = randmask.load_adapter(tiny_llama().cuda(), tmp_path / "adapter.safetensors")
    with torch.no_grad():
        logits = model(input_ids=saved["batch"].cuda()).logits.float().cpu()
    torch.testing.assert_close(logits, saved["logits"], rtol=1e-5, atol=1e-5)
