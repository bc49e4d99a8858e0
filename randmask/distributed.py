"""randmask under FSDP2 (torch.distributed.fsdp.fully_shard): the frozen base is sharded, the trained values are not.

The deltas (n values a layer: 0.01%-1% of the model) stay whole on every rank, as FSDP's ignored parameters; after
each backward their gradients are averaged across the ranks (an all-reduce of n values a layer), so every rank's
optimizer takes the same step. The base weights are sharded by rows as FSDP does it; in merged mode each rank writes
round(W0 + delta) only at the masked entries of its own rows (ops.sparse_update on a row-sharded weight), from the
same (seed, name) mask on every rank: no communication for the mask, and no rank ever holds another's rows. In
additive mode nothing is written. save_adapter needs only the deltas, which every rank has: rank 0 writes the file.
"""
import functools
import gc

import torch.distributed as dist
import torch.nn as nn
from torch.distributed.fsdp import fully_shard as _fsdp_fully_shard

from randmask.model import masked_layers

__all__ = ["average_gradients", "delta_parameters", "fully_shard", "load_checkpoint", "replicate_deltas",
           "save_checkpoint", "stop"]


def delta_parameters(model: nn.Module) -> set:
    """The trained values of every masked layer (FSDP's `ignored_params` for a randmask model)."""
    return {layer.delta for _, layer in masked_layers(model)}


def fully_shard(model: nn.Module, modules=(), **kwargs) -> nn.Module:
    """FSDP2 for a model randmask.apply has masked: fully_shard(m, ignored_params=the deltas, **kwargs) on each of
    `modules` (e.g. the decoder layers), then on `model`; then replicate_deltas over the mesh's process group.
    Takes fully_shard's keyword arguments (mesh, mp_policy, reshard_after_forward, ...). Returns `model`. Conv1D
    (GPT-2 style) and bitsandbytes-quantized masked layers are refused (ValueError) before any module changes."""
    if next(masked_layers(model), None) is None:
        raise ValueError("randmask.distributed.fully_shard: the model has no masked layers; call randmask.apply "
                         "first (masks are computed from the whole weights, before they are sharded)")
    for name, layer in masked_layers(model):  # refused before FSDP changes any module
        if layer.transposed:
            raise ValueError(f"randmask.distributed.fully_shard: {name!r} is a transformers Conv1D (GPT-2 style), "
                             "whose masked weight is a transposed view that FSDP2 cannot shard; train such a model "
                             "with DDP (randmask.distributed.average_gradients)")
        if layer.quantization is not None:
            raise ValueError(f"randmask.distributed.fully_shard: {name!r} is quantized by bitsandbytes, whose packed "
                             "weights FSDP2 cannot shard; train a quantized base with DDP "
                             "(randmask.distributed.average_gradients)")
    ignored = set(kwargs.pop("ignored_params", None) or ()) | delta_parameters(model)
    for module in modules:
        _fsdp_fully_shard(module, ignored_params=ignored, **kwargs)
    _fsdp_fully_shard(model, ignored_params=ignored, **kwargs)
    mesh = kwargs.get("mesh")
    replicate_deltas(model, mesh.get_group() if mesh is not None else None)
    return model


def _average(param, group, ranks: int) -> None:
    dist.all_reduce(param.grad, group=group)  # a sum: gloo has no average
    param.grad.div_(ranks)


def average_gradients(params, group=None) -> None:
    """Make `params` the same on all ranks of `group` (broadcast from its first rank) and average their gradients
    across them after each backward: data parallelism for a few trainable tensors, without a wrapper module."""
    ranks = dist.get_world_size(group)
    first = dist.get_global_rank(group, 0) if group is not None else 0
    for param in params:
        dist.broadcast(param.data, src=first, group=group)
        param.register_post_accumulate_grad_hook(functools.partial(_average, group=group, ranks=ranks))


def replicate_deltas(model: nn.Module, group=None) -> None:
    """average_gradients for every masked layer's delta (a model sharded with ignored_params = its deltas); each
    rank then writes the merged entries of its own rows for the broadcast values."""
    average_gradients([layer.delta for _, layer in masked_layers(model)], group)
    for _, layer in masked_layers(model):
        layer.sync()


def _training_state(model: nn.Module, optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    return {"deltas": {k: v for k, v in model_state.items() if k.endswith(".delta")}, "optimizer": optimizer_state}


def save_checkpoint(model: nn.Module, optimizer, directory) -> None:
    """Save what resuming needs, with torch.distributed.checkpoint: the deltas and the optimizer state (the base is
    the pretrained model's; it is not saved). Call on every rank."""
    import torch.distributed.checkpoint as dcp

    dcp.save(_training_state(model, optimizer), checkpoint_id=directory)


def load_checkpoint(model: nn.Module, optimizer, directory) -> None:
    """Load a save_checkpoint directory into a model masked and sharded as the saved one, and its optimizer; each
    rank then writes the merged entries of its own rows. Call on every rank."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    state = _training_state(model, optimizer)
    dcp.load(state, checkpoint_id=directory)
    set_state_dict(model, optimizer, model_state_dict=state["deltas"], optim_state_dict=state["optimizer"],
                   options=StateDictOptions(strict=False))
    for _, layer in masked_layers(model):
        layer.sync()


def stop() -> None:
    """End the process group cleanly, after the last reference to a sharded model is gone: collect what still holds
    the group (left to the interpreter's exit, gloo's threads can outlive it and abort the process), wait for every
    rank, destroy it."""
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()
