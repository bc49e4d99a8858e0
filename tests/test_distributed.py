"""randmask under FSDP2 on the CPU: 2 gloo ranks under torchrun (tests/fsdp_worker.py), against a single-process run
on the same global batch (the reference: randmask.apply alone)."""
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch
from test_model import lm_loss, tiny_llama, tokens

import randmask

HERE = pathlib.Path(__file__).parent
pytestmark = [pytest.mark.full, pytest.mark.usefixtures("torch_backend")]


def run_ranks(out, targets="q_proj,v_proj", mode="auto", optimizer="masked", steps=3, mixed="fp32", ranks=2,
              resume_after="-"):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
               str(HERE / "fsdp_worker.py"), str(out), targets, mode, optimizer, str(steps), mixed, str(resume_after)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-4000:]
    checks = [json.loads((out / f"checks{rank}.json").read_text()) for rank in range(ranks)]
    return torch.load(out / "result.pt", weights_only=True), checks


def single_process(targets, mode, optimizer, steps, ranks=2):
    config = randmask.RandMaskConfig(density=0.05, target_modules=targets, seed=3, mode=mode)
    model = randmask.apply(tiny_llama(), config)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = randmask.MaskedAdamW(trainable, lr=1e-2) if optimizer == "masked" else torch.optim.AdamW(trainable, lr=1e-2)
    for step in range(steps):
        lm_loss(model, tokens(10 + step, batch=2 * ranks)).backward()  # the mean over the global batch
        opt.step()
        opt.zero_grad()
    return model


@pytest.mark.parametrize("targets,mode,optimizer", [("q_proj,v_proj", "auto", "masked"),
                                                    ("all-linear", "auto", "torch"),
                                                    ("q_proj,v_proj", "additive", "torch")])
def test_fsdp2_trains_as_one_process_does(tmp_path, targets, mode, optimizer):
    result, checks = run_ranks(tmp_path, targets, mode, optimizer)
    reference = single_process(targets if targets == "all-linear" else tuple(targets.split(",")), mode, optimizer, 3)
    for name, layer in randmask.masked_layers(reference):
        torch.testing.assert_close(result["deltas"][name], layer.delta.detach(), rtol=1e-4, atol=1e-6)
    assert all(c["unchanged"] for c in checks)  # every rank's unmasked entries are bitwise the base's
    assert all(0.45 < c["local_fraction"] < 0.55 for c in checks)  # each rank holds about half the base bytes
    assert all(c["loaded_onto_sharded"] for c in checks)  # load_adapter onto a sharded model: the same logits

    # the adapter rank 0 wrote loads onto a fresh single-process base: the sharded model's logits, exactly
    loaded = randmask.load_adapter(tiny_llama(), tmp_path / "adapter.safetensors")
    with torch.no_grad():
        assert torch.equal(loaded(tokens(99, batch=2)).logits, result["logits"])
    # and it is byte for byte the file a single-process model with the same deltas writes
    same = randmask.apply(tiny_llama(), randmask.RandMaskConfig(**randmask.read_adapter_header(
        tmp_path / "adapter.safetensors")["config"]))
    with torch.no_grad():
        for name, layer in randmask.masked_layers(same):
            layer.delta.copy_(result["deltas"][name])
    randmask.save_adapter(same, tmp_path / "single.safetensors")
    assert (tmp_path / "single.safetensors").read_bytes() == (tmp_path / "adapter.safetensors").read_bytes()


def test_fsdp2_mixed_precision_keeps_the_deltas_in_fp32(tmp_path):
    result, checks = run_ranks(tmp_path, mixed="bf16", steps=2)
    assert all(c["delta_dtypes"] == ["torch.float32"] for c in checks)
    assert all(c["unchanged"] for c in checks)
    reference = single_process(("q_proj", "v_proj"), "auto", "masked", 2)
    for name, layer in randmask.masked_layers(reference):  # bf16 compute: the same direction, not the same bits
        got, want = result["deltas"][name], layer.delta.detach()
        assert torch.nn.functional.cosine_similarity(got, want, dim=0) > 0.95


@pytest.mark.parametrize("optimizer", ["masked", "torch"])
def test_a_killed_fsdp2_run_resumes_from_its_distributed_checkpoint(tmp_path, optimizer):
    (tmp_path / "straight").mkdir()
    (tmp_path / "resumed").mkdir()
    straight, _ = run_ranks(tmp_path / "straight", optimizer=optimizer)
    resumed, checks = run_ranks(tmp_path / "resumed", optimizer=optimizer, resume_after=2)
    assert all(c["unchanged"] for c in checks)
    for name, delta in straight["deltas"].items():  # step 3 after the resume is the uninterrupted run's step 3
        assert torch.equal(resumed["deltas"][name], delta)
    assert torch.equal(resumed["logits"], straight["logits"])


def test_transformers_trainer_with_accelerate_fsdp2_trains_a_presharded_randmask_model(tmp_path):
    """docs/architecture.md's Trainer recipe on 2 gloo ranks (tests/trainer_fsdp_worker.py: the deltas move and agree
    across ranks, the gathered weights are W0 outside the masks and round(W0 + delta) at them); its adapter gives the
    sharded model's logits on a fresh single-process base."""
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(HERE / "trainer_fsdp_worker.py"), str(tmp_path)], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-4000:]
    from trainer_fsdp_worker import tiny_llama as trainer_llama

    saved = torch.load(tmp_path / "logits.pt")
    model = randmask.load_adapter(trainer_llama(), tmp_path / "adapter.safetensors")
    with torch.no_grad():
        assert torch.equal(model(input_ids=saved["batch"]).logits.float(), saved["logits"])
