"""Model-level API on tiny config-built Hugging Face models: apply, counts, Trainer, checkpointing, compile, DDP."""
import copy
import os
import sys

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

import randmask
from randmask import MaskedLinear, RandMaskConfig


def tiny_llama(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).to(dtype)


def tiny_gpt2(seed=0):
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=96, n_embd=48, n_layer=2, n_head=4, n_positions=64))


def tokens(seed, batch=4, length=16):
    return torch.randint(0, 96, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_apply_replaces_targets_freezes_the_rest_and_keys_by_name():
    model = tiny_llama()
    randmask.apply(model, RandMaskConfig(density=0.05, seed=3))
    layers = dict(randmask.masked_layers(model))
    assert sorted(layers) == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    for name, layer in layers.items():  # 0.05 * 64 * 64 = 204.8 -> 205 (q); 0.05 * 32 * 64 = 102.4 -> 102 (v)
        assert layer.key == randmask.layer_key(3, name) and layer.n == (205 if name.endswith("q_proj") else 102)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable == [f"{name}.delta" for name in layers]
    assert randmask.count_trainable_parameters(model) == 614  # 2 * (205 + 102)
    line = randmask.print_trainable_parameters(model)
    assert line.startswith("trainable params: 614 || all params: 86,950 ||")


def test_masks_depend_on_names_not_on_module_order():
    """The same layer name gets the same mask in a model built differently (here: more layers)."""
    a, b = tiny_llama(), tiny_llama()
    b.model.layers.append(copy.deepcopy(b.model.layers[0]))
    randmask.apply(a, RandMaskConfig(density=0.1))
    randmask.apply(b, RandMaskConfig(density=0.1))
    name = "model.layers.1.self_attn.v_proj"
    pa, pb = a.get_submodule(name).positions(), b.get_submodule(name).positions()
    assert torch.equal(pa[0], pb[0]) and torch.equal(pa[1], pb[1])


def test_targets_regex_and_all_linear():
    model = tiny_llama()
    randmask.apply(model, RandMaskConfig(density=0.01, target_modules=r".*mlp\.(up|down)_proj"))
    assert sorted(n.split(".")[-1] for n, _ in randmask.masked_layers(model)) == ["down_proj"] * 2 + ["up_proj"] * 2
    model = tiny_llama()
    randmask.apply(model, RandMaskConfig(density=0.01, target_modules="all-linear"))
    names = [n for n, _ in randmask.masked_layers(model)]
    assert len(names) == 14 and "lm_head" not in names
    gpt2 = tiny_gpt2()
    randmask.apply(gpt2, RandMaskConfig(density=0.05, target_modules="all-linear"))
    layer = gpt2.get_submodule("transformer.h.0.attn.c_attn")
    assert isinstance(layer, MaskedLinear) and layer.transposed and layer.weight.shape == (144, 48)


def test_trainable_ratio_is_exact_and_matches_the_paper_on_opt_1_3b():
    """The paper: OPT-1.3b at 0.01% of the whole model, on q and v, is 131,576 values, 0.065% of each matrix."""
    config = OPTConfig(hidden_size=2048, num_hidden_layers=24, ffn_dim=8192, num_attention_heads=32,
                       word_embed_proj_dim=2048, vocab_size=50272, max_position_embeddings=2048)
    with torch.device("meta"):
        model = OPTForCausalLM(config)
    total = sum(p.numel() for p in model.parameters())
    layers = randmask.plan(model, RandMaskConfig(trainable_ratio=1e-4))
    assert len(layers) == 48 and sum(n for _, _, n in layers) == round(1e-4 * total) == 131_576
    assert all(abs(n / (2048 * 2048) - 0.000654) < 2e-6 for _, _, n in layers)
    # Unequal matrix sizes still add up exactly (largest remainders).
    small = tiny_llama()
    for ratio in (1e-5, 3.3e-4, 1e-2):
        model_total = sum(p.numel() for p in small.parameters())
        counts = [n for _, _, n in randmask.plan(small, RandMaskConfig(trainable_ratio=ratio,
                                                                        target_modules="all-linear"))]
        assert sum(counts) == round(ratio * model_total)


@pytest.mark.parametrize("kwargs,match", [
    ({}, "exactly one of density"),
    ({"density": 0.1, "trainable_ratio": 0.1}, "exactly one of density"),
    ({"density": 2.0}, r"density must be a number in \(0, 1\]"),
    ({"density": 0}, r"density must be a number in \(0, 1\]"),
    ({"trainable_ratio": -1e-3}, r"trainable_ratio must be a number in \(0, 1\]"),
    ({"density": 0.1, "target_modules": "("}, "not a valid regex.*missing \\)"),
    ({"density": 0.1, "target_modules": ("q_proj", 3)}, "non-empty strings"),
    ({"density": 0.1, "mode": "fused"}, "mode must be one of"),
])
def test_bad_configs_are_clear_errors(kwargs, match):
    with pytest.raises(Exception, match=match):
        RandMaskConfig(**kwargs)


def test_apply_twice_or_to_nothing_is_an_error():
    model = tiny_llama()
    with pytest.raises(ValueError, match="matches no linear layer"):
        randmask.apply(model, RandMaskConfig(density=0.1, target_modules=("nope",)))
    assert next(randmask.masked_layers(model), None) is None
    randmask.apply(model, RandMaskConfig(density=0.1))
    with pytest.raises(ValueError, match="already applied"):
        randmask.apply(model, RandMaskConfig(density=0.1))
    with pytest.raises(ValueError, match="asks for"):
        randmask.apply(tiny_llama(), RandMaskConfig(trainable_ratio=0.9))


def lm_loss(model, batch):
    return model(input_ids=batch, labels=batch).loss


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_base_with_fp32_deltas(dtype):
    model = randmask.apply(tiny_llama(dtype=dtype), RandMaskConfig(density=0.1, target_modules="all-linear"))
    layer = model.get_submodule("model.layers.0.mlp.up_proj")
    assert layer.weight.dtype == dtype and layer.delta.dtype == torch.float32
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = tokens(0)
    with torch.no_grad():
        first = lm_loss(model, batch).item()
    for _ in range(10):
        opt.zero_grad()
        lm_loss(model, batch).backward()
        assert layer.delta.grad.dtype == torch.float32
        opt.step()
    with torch.no_grad():
        assert lm_loss(model, batch).item() < first
    rows, cols = layer.positions()
    assert torch.equal(layer.weight[rows, cols], (layer.base.float() + layer.delta.detach()).to(dtype))
    model.to(torch.float32)  # converting the model never rounds the trainable values
    assert layer.delta.dtype == torch.float32


def test_gradient_checkpointing_gives_the_same_gradients():
    batch = tokens(1)
    grads = []
    for checkpointing in (False, True):
        model = randmask.apply(tiny_llama(), RandMaskConfig(density=0.1))
        if checkpointing:
            model.gradient_checkpointing_enable()
            model.train()
        calls = []
        model.get_submodule("model.layers.0.self_attn.q_proj").register_forward_hook(
            lambda *_, calls=calls: calls.append(1))
        lm_loss(model, batch).backward()
        assert len(calls) == (2 if checkpointing else 1)  # checkpointing really recomputed the forward
        grads.append([layer.delta.grad.clone() for _, layer in randmask.masked_layers(model)])
    for plain, checkpointed in zip(*grads):
        torch.testing.assert_close(checkpointed, plain, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("optimizer", ["trainer's", "MaskedAdamW"])
def test_trainer_lowers_the_loss(tmp_path, optimizer):
    # Trainer with its own optimizer (torch AdamW; the step hook syncs the weights) or given MaskedAdamW, which
    # writes the merged weights itself
    from transformers import Trainer, TrainingArguments

    model = randmask.apply(tiny_llama(), RandMaskConfig(density=0.1, target_modules="all-linear"))
    rows = (torch.arange(16).repeat(32, 1) * 3 + torch.arange(32)[:, None]) % 96
    data = [{"input_ids": row, "labels": row} for row in rows]
    held_out = torch.stack([d["input_ids"] for d in data[:8]])
    with torch.no_grad():
        before = lm_loss(model, held_out).item()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=30, per_device_train_batch_size=8,
                             learning_rate=2e-2, lr_scheduler_type="constant", report_to=[], use_cpu=True,
                             save_strategy="no", logging_steps=10, disable_tqdm=True, dataloader_num_workers=0)
    optimizers = (None, None)  # Trainer builds its default optimizer and scheduler
    if optimizer == "MaskedAdamW":
        optimizers = (randmask.MaskedAdamW(model.parameters(), lr=2e-2), None)
    trainer = Trainer(model=model, args=args, train_dataset=data, optimizers=optimizers)
    trainer.train()
    assert isinstance(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer,
                      randmask.MaskedAdamW) == (optimizer == "MaskedAdamW")
    for _, layer in randmask.masked_layers(model):  # every weight holds base + delta at its masked entries
        rows, cols = layer.positions()
        assert torch.equal(layer.weight[rows, cols], (layer.base.float() + layer.delta.detach()).to(layer.weight.dtype))
    with torch.no_grad():
        after = lm_loss(model, held_out).item()
    assert after < 0.8 * before, (before, after)


@pytest.mark.full
@pytest.mark.parametrize("mode", ["merged", "additive"])
def test_torch_compile_has_no_graph_breaks_and_trains_like_eager(mode):
    eager = randmask.apply(tiny_llama(), RandMaskConfig(density=0.1, target_modules="all-linear", mode=mode))
    compiled_model = copy.deepcopy(eager)
    explanation = torch._dynamo.explain(compiled_model)(input_ids=tokens(2), labels=tokens(2))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    torch._dynamo.reset()
    compiled = torch.compile(compiled_model, backend="aot_eager", fullgraph=True)
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
            for m in (eager, compiled_model)]
    for step in range(3):
        batch = tokens(10 + step)
        for model, opt in zip((eager, compiled), opts):
            opt.zero_grad()
            lm_loss(model, batch).backward()
            opt.step()
    for (name, a), (_, b) in zip(randmask.masked_layers(eager), randmask.masked_layers(compiled_model)):
        torch.testing.assert_close(b.delta, a.delta, rtol=1e-4, atol=1e-6)
        if mode == "merged":
            assert torch.equal(b.weight[b.positions()], (b.base + b.delta).detach()), name
        else:
            assert torch.equal(b.weight[b.positions()], b.base), name  # never written


DDP_WORKER = r"""
import os, sys, torch, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
sys.path.insert(0, os.environ["TESTS_DIR"])
import randmask
from test_model import tiny_llama, tokens, lm_loss

rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method="file://" + sys.argv[2], rank=rank, world_size=2)
torch.manual_seed(rank)  # the ranks' models start from different seeds; DDP broadcasts rank 0's weights
model = randmask.apply(tiny_llama(seed=rank), randmask.RandMaskConfig(density=0.05, target_modules="all-linear"))
n_total = randmask.count_trainable_parameters(model)
ddp = DDP(model)
reduced = []
def counting_allreduce(state, bucket):
    reduced.append(bucket.buffer().numel())
    fut = dist.all_reduce(bucket.buffer().div_(2), async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])
ddp.register_comm_hook(None, counting_allreduce)
opt = torch.optim.AdamW([p for p in ddp.parameters() if p.requires_grad], lr=1e-2)
for step in range(3):
    opt.zero_grad()
    lm_loss(ddp, tokens(100 * rank + step)).backward()   # different data on each rank
    opt.step()
deltas = torch.cat([layer.delta.detach() for _, layer in randmask.masked_layers(model)])
others = [torch.empty_like(deltas) for _ in range(2)]
dist.all_gather(others, deltas)
weights = torch.cat([layer.weight.detach().flatten() for _, layer in randmask.masked_layers(model)])
all_weights = [torch.empty_like(weights) for _ in range(2)]
dist.all_gather(all_weights, weights)
assert torch.equal(others[0], others[1]), "deltas differ across ranks"
assert torch.equal(all_weights[0], all_weights[1]), "merged weights differ across ranks"
assert deltas.abs().sum() > 0
assert sum(reduced) == 3 * n_total, (reduced, n_total)   # only the n trainable values per layer travel
print("rank", rank, "ok", n_total, sum(reduced) // 3, flush=True)
dist.destroy_process_group()
# Every check is done. Skip the interpreter's teardown: under load, gloo's worker threads sometimes abort it with
# "terminate called without an active exception" (seen 2 in ~10 full-suite runs, never with the checks failing).
os._exit(0)
"""


@pytest.mark.full
def test_ddp_two_processes_keep_deltas_identical_and_reduce_only_n_values(tmp_path):
    import subprocess

    init_file = tmp_path / "rendezvous"
    env = {**os.environ, "TESTS_DIR": os.path.dirname(__file__), "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    env.pop("RANDMASK_BACKEND", None)
    procs = [subprocess.Popen([sys.executable, "-c", DDP_WORKER, str(rank), str(init_file)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in range(2)]
    outputs = [p.communicate(timeout=240) for p in procs]
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, err[-3000:]
        assert " ok " in out
