"""One rank of tests/gpu/test_trainer_fsdp.py (CUDA, NCCL) and tests/test_distributed.py (CPU, gloo): transformers'
Trainer with accelerate's FSDP2 on a randmask model.

The recipe (docs/architecture.md, "Several processes"): randmask.apply, then randmask.distributed.fully_shard (the
deltas as FSDP's ignored params, whole on every rank), then Trainer with fsdp="full_shard" and fsdp_config
{"fsdp_version": 2}: accelerate takes an FSDPModule as it is. Trainer builds the optimizer (FSDP forbids passing
one): MaskedAdamW through optimizer_cls_and_kwargs.

    torchrun --nproc_per_node N tests/trainer_fsdp_worker.py OUT_DIR

accelerate selects FSDP on accelerator devices only (on a CPU it would wrap the model in DDP); on the CPU this worker
changes that one choice after accelerate's own set-up (accelerate_fsdp_on_cpu), so the rest of its FSDP2 path and
Trainer's run as on a GPU.

Checks on every rank, after 3 steps: accelerate ran FSDP2; the deltas moved and are the same on every rank; the
gathered weights equal W0 outside the masks bitwise and round(W0 + delta) at them. Rank 0 saves the adapter and
writes OUT_DIR/logits.pt (the sharded model's logits on a fixed batch) for the test to compare."""
import os
import sys

import torch
import torch.distributed as dist
from accelerate.utils import DistributedType
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

import randmask
import randmask.distributed


def tiny_llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


def accelerate_fsdp_on_cpu():
    """Make accelerate's Accelerator take its FSDP2 path on the CPU, where it would choose DDP."""
    import accelerate.accelerator
    from accelerate.utils import FullyShardedDataParallelPlugin

    set_up = accelerate.accelerator.Accelerator.__init__

    def init(self, *args, **kwargs):
        set_up(self, *args, **kwargs)
        self.state.distributed_type = DistributedType.FSDP
        self.state.fsdp_plugin = FullyShardedDataParallelPlugin(fsdp_version=2)

    accelerate.accelerator.Accelerator.__init__ = init


def main(out_dir):
    on_gpu = torch.cuda.is_available()
    args = TrainingArguments(output_dir=out_dir, per_device_train_batch_size=2, max_steps=3, learning_rate=1e-2,
                             lr_scheduler_type="constant", weight_decay=0.0, fsdp="full_shard",
                             fsdp_config={"fsdp_version": 2}, report_to=[], save_strategy="no", logging_steps=1,
                             bf16=False, seed=0, use_cpu=not on_gpu)  # TrainingArguments starts the process group
    if not on_gpu:
        accelerate_fsdp_on_cpu()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if on_gpu else torch.device("cpu")
    model = randmask.apply(tiny_llama().to(device), randmask.RandMaskConfig(density=0.05))
    w0 = {name: layer.weight.detach().clone() for name, layer in randmask.masked_layers(model)}
    randmask.distributed.fully_shard(model, model.model.layers)
    g = torch.Generator().manual_seed(1)
    data = [{"input_ids": (ids := torch.randint(0, 128, (16,), generator=g)), "labels": ids} for _ in range(24)]
    trainer = Trainer(model=model, args=args, train_dataset=data,
                      optimizer_cls_and_kwargs=(randmask.MaskedAdamW, {"lr": 1e-2}))
    assert trainer.accelerator.distributed_type == DistributedType.FSDP and trainer.accelerator.is_fsdp2
    trainer.train()  # (Trainer resets accelerate's state when it ends)
    assert trainer.model_wrapped is model  # accelerate took the FSDPModule as it is: no DDP or other wrapper
    assert trainer.state.global_step == 3
    for name, layer in randmask.masked_layers(model):
        delta = layer.delta.detach()
        assert delta.abs().sum() > 0 and torch.isfinite(delta).all(), name
        copies = [torch.empty_like(delta) for _ in range(dist.get_world_size())]
        dist.all_gather(copies, delta)
        assert all(torch.equal(c, delta) for c in copies), name
        weight = layer.weight.full_tensor() if hasattr(layer.weight, "full_tensor") else layer.weight.detach()
        rows, cols = layer.positions()
        expected = w0[name].clone()
        expected[rows, cols] = (w0[name][rows, cols].float() + delta).to(expected.dtype)
        assert torch.equal(weight, expected), name
    batch = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(2)).to(device)
    with torch.no_grad():
        logits = model(input_ids=batch).logits.float().cpu()
    randmask.save_adapter(model, os.path.join(out_dir, "adapter.safetensors"))  # rank 0 writes
    if dist.get_rank() == 0:
        torch.save({"batch": batch.cpu(), "logits": logits}, os.path.join(out_dir, "logits.pt"))
    randmask.distributed.stop()


if __name__ == "__main__":
    main(sys.argv[1])
