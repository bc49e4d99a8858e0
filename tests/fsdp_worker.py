"""One rank of tests/test_distributed.py, under torchrun: a tiny Llama masked by randmask, sharded with FSDP2
(randmask.distributed.fully_shard per decoder layer and at the root), 3 steps on this rank's half of a global batch.
Writes what the test compares into OUT: the deltas, the adapter, logits, per-rank checks (among them: the adapter
loaded onto another sharded model gives the same logits)."""
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_model import lm_loss, tiny_llama, tokens  # noqa: E402

import randmask  # noqa: E402
import randmask.distributed  # noqa: E402


def main(out, targets, mode, optimizer, steps, mixed, resume_after):
    dist.init_process_group("gloo")
    rank, ranks = dist.get_rank(), dist.get_world_size()
    config = randmask.RandMaskConfig(density=0.05, target_modules=targets, seed=3, mode=mode)
    base = tiny_llama().state_dict()
    kwargs = {}
    if mixed:
        from torch.distributed.fsdp import MixedPrecisionPolicy

        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)

    def build():
        model = randmask.apply(tiny_llama(), config)
        randmask.distributed.fully_shard(model, model.model.layers, **kwargs)
        trainable = [p for p in model.parameters() if p.requires_grad]
        return model, (randmask.MaskedAdamW(trainable, lr=1e-2) if optimizer == "masked"
                       else torch.optim.AdamW(trainable, lr=1e-2))

    def train(model, opt, steps):
        for step in steps:
            batch = tokens(10 + step, batch=2 * ranks)
            lm_loss(model, batch[rank * 2:(rank + 1) * 2]).backward()
            opt.step()
            opt.zero_grad()

    model, opt = build()
    if resume_after is None:
        train(model, opt, range(steps))
    else:  # killed after `resume_after` steps: a new process state resumes from the checkpoint
        train(model, opt, range(resume_after))
        randmask.distributed.save_checkpoint(model, opt, os.path.join(out, "checkpoint"))
        del model, opt
        model, opt = build()
        randmask.distributed.load_checkpoint(model, opt, os.path.join(out, "checkpoint"))
        train(model, opt, range(resume_after, steps))
    checks = {"delta_dtypes": sorted({str(layer.delta.dtype) for _, layer in randmask.masked_layers(model)})}
    # this rank's rows of every frozen tensor: bitwise the base's but at a merged layer's masked entries; the shards
    # are about 1/ranks of the bytes
    unchanged, local_bytes, full_bytes = True, 0, 0
    layers = dict(randmask.masked_layers(model))
    for name, param in model.named_parameters():
        if param.requires_grad:
            continue
        local = param.to_local() if hasattr(param, "to_local") else param
        local_bytes += local.numel() * local.element_size()
        full_bytes += param.numel() * param.element_size()
        mine = slice(rank * -(-param.shape[0] // ranks), rank * -(-param.shape[0] // ranks) + local.shape[0])
        keep = torch.ones(param.shape, dtype=torch.bool)
        layer = layers.get(name.removesuffix(".weight"))
        if layer is not None and layer.mode == "merged":
            rows, cols = layer.positions()
            keep[rows, cols] = False
        original = base[name.replace(".base_layer.", ".")][mine]
        unchanged &= bool(torch.equal(local[keep[mine]], original[keep[mine]]))
    checks.update(unchanged=unchanged, local_fraction=local_bytes / full_bytes)
    with torch.no_grad():
        logits = model(tokens(99, batch=2)).logits
    randmask.save_adapter(model, os.path.join(out, "adapter.safetensors"))
    dist.barrier()  # rank 0 has written it
    # load_adapter onto another sharded model (masked before sharding, as every randmask model is): the same logits
    fresh, _ = build()
    randmask.load_adapter(fresh, os.path.join(out, "adapter.safetensors"))
    with torch.no_grad():
        checks["loaded_onto_sharded"] = bool(torch.equal(fresh(tokens(99, batch=2)).logits, logits))
    del fresh
    with open(os.path.join(out, f"checks{rank}.json"), "w") as f:
        json.dump(checks, f)
    if rank == 0:
        torch.save({"logits": logits, "deltas": {n: layer.delta.detach().clone()
                                                 for n, layer in randmask.masked_layers(model)}},
                   os.path.join(out, "result.pt"))
    del model, opt
    randmask.distributed.stop()


if __name__ == "__main__":
    out, targets, mode, optimizer, steps, mixed, resume_after = sys.argv[1:8]
    main(out, targets if targets == "all-linear" else tuple(targets.split(",")), mode, optimizer, int(steps),
         mixed == "bf16", None if resume_after == "-" else int(resume_after))
