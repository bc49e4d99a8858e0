"""MaskedAdamW and the step hook of torch optimizers, on a model: against torch.optim.AdamW followed by a sync, one
Triton launch per group and weight dtype (run by the interpreter, TRITON_INTERPRET=1 from conftest.py), no second
sync, state_dict round trips, clear errors. tests/ops/test_adamw.py holds the kernels themselves to torch's AdamW."""
import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import randmask
from randmask import MaskedLinear, ops
from randmask.kernels import masked_adamw as ma
from randmask.kernels import sparse_update as su
from randmask.optim import MaskedAdamW

HYPER = {"lr": 3e-2, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.1}


class Tiny(nn.Module):
    """fc1: a MaskedLinear over an nn.Linear whose bias the user unfroze (a plain AdamW parameter); fc2: a
    MaskedLinear over a GPT-2 Conv1D, whose weight is a transposed view of the Conv1D's (in, out) storage."""

    def __init__(self, dtype):
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        linear = nn.Linear(24, 32).to(dtype)
        conv = Conv1D(16, 32).to(dtype)  # nf=16 outputs, nx=32 inputs: weight (32, 16)
        nn.init.normal_(conv.weight, std=0.2)
        self.fc1 = MaskedLinear.from_linear(linear, density=0.2, seed=1, name="fc1")
        self.fc2 = MaskedLinear.from_linear(conv, density=0.3, seed=1, name="fc2")
        self.fc1.bias.requires_grad_(True)
        self.sources = (linear, conv)  # a tuple: not registered as submodules

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))

    def masked(self):
        return (self.fc1, self.fc2)


def make_tiny(dtype=torch.float32):
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    return Tiny(dtype)


def batches(count, dtype=torch.float32):
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(6, 24, generator=gen).to(dtype), torch.randn(6, 16, generator=gen)) for _ in range(count)]


def train(model, opt, data):
    for x, target in data:
        opt.zero_grad()
        (model(x).float() - target).square().mean().backward()
        opt.step()


def mask_of(layer):
    inside = torch.zeros(layer.mask.shape, dtype=torch.bool)
    inside[layer.positions()] = True
    return inside


# ---------------------------------------------------------------- (a) against torch.optim.AdamW + sync, CPU
# The CPU backends and the stock AdamW each reproduces bitwise: the torch twin runs the default single-tensor step's
# ops in torch's order; the native path runs the kernel of AdamW(fused=True).
CPU_REFERENCES = {"torch": {"foreach": False}, "native": {"fused": True}}


@pytest.mark.parametrize("backend", sorted(CPU_REFERENCES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_matches_adamw_then_sync(dtype, backend):
    if ops.available_backends("cpu")[backend]:
        pytest.skip(ops.available_backends("cpu")[backend])
    with randmask.use_backend(backend):
        _matches_adamw_then_sync(dtype, backend)


def _matches_adamw_then_sync(dtype, backend):
    ours, ref = make_tiny(dtype), make_tiny(dtype)
    initial = [layer.weight.detach().clone() for layer in ours.masked()]
    opt = MaskedAdamW(ours.parameters(), **HYPER)  # frozen weights and biases are in there, and skipped
    ref_opt = torch.optim.AdamW(ref.parameters(), **HYPER, **CPU_REFERENCES[backend])
    for x, target in batches(20, dtype):
        train(ours, opt, [(x, target)])
        train(ref, ref_opt, [(x, target)])
        # Same gradients (same kernels), the same AdamW arithmetic, then the same sparse update as sync: everything
        # is bitwise equal (no 1-ulp allowance needed on CPU).
        for layer, ref_layer, w0 in zip(ours.masked(), ref.masked(), initial):
            ref_layer.sync()  # idempotent: makes the reference's merged weight current whatever the sync policy
            state, ref_state = opt.state[layer.delta], ref_opt.state[ref_layer.delta]
            assert torch.equal(layer.delta, ref_layer.delta)
            assert torch.equal(state["exp_avg"], ref_state["exp_avg"])
            assert torch.equal(state["exp_avg_sq"], ref_state["exp_avg_sq"])
            assert torch.equal(state["step"], ref_state["step"]) and state["step"].dtype == torch.float32
            assert torch.equal(layer.weight, ref_layer.weight)
            outside = ~mask_of(layer)
            assert torch.equal(layer.weight[outside], w0[outside])  # bitwise untouched outside the mask
        assert torch.equal(ours.fc1.bias, ref.fc1.bias)  # the plain AdamW path
    trainable = {ours.fc1.delta, ours.fc2.delta, ours.fc1.bias}
    assert set(opt.state) == trainable  # frozen parameters got no state
    for layer in ours.masked():
        rows, cols = layer.positions()
        assert layer.delta.abs().min() > 0  # every trained value moved
        assert torch.equal(layer.weight[rows, cols], (layer.base.float() + layer.delta).to(dtype))
    linear, conv = ours.sources
    assert torch.equal(conv.weight.t(), ours.fc2.weight) and torch.equal(linear.weight, ours.fc1.weight)


# ---------------------------------------------------------------- (b) no second sync; the forward sees the step
@pytest.mark.usefixtures("torch_backend")
def test_step_writes_weights_so_layers_do_not_resync(monkeypatch):
    syncs = []  # the weights written by a layer's own sync or by the optimizer hook's (torch backend: one a weight)
    table = ops.IMPLEMENTATIONS["sparse_update"]
    monkeypatch.setitem(table, "torch", ops.Impl("torch", lambda *args, _fn=table["torch"].fn: syncs.append(args[0])
                                                 or _fn(*args)))
    model = make_tiny()
    initial = [layer.weight.detach().clone() for layer in model.masked()]
    (x, target), (x2, _) = batches(2)
    opt = MaskedAdamW(model.parameters(), **HYPER)
    train(model, opt, [(x, target)])
    with torch.no_grad():
        out = model(x2)
    assert syncs == []
    # the forward used W0 + delta at the mask, built here independently of the layer
    expected = stale = x2
    for layer, w0, activation in zip(model.masked(), initial, (torch.tanh, lambda y: y)):
        weight = w0.clone()
        rows, cols = layer.positions()
        weight[rows, cols] = layer.base + layer.delta.detach()
        assert layer.delta.abs().min() > 0 and torch.equal(layer.weight, weight)
        expected = activation(F.linear(expected, weight, layer.bias.detach()))
        stale = activation(F.linear(stale, w0, layer.bias.detach()))
    torch.testing.assert_close(out, expected)  # to fp32 rounding: another matmul layout
    assert (out - stale).abs().max() > 100 * (out - expected).abs().max()
    # the counter does see syncs: a torch optimizer's step makes the layers sync (in its hook, so not again in the
    # forward)
    train(model, torch.optim.AdamW(model.parameters(), **HYPER), [(x, target)])
    with torch.no_grad():
        model(x2)
    assert [id(w) for w in syncs] == [id(layer.weight) for layer in model.masked()]


# ---------------------------------------------------------------- (c) the Triton backend (interpreted)
triton_only = pytest.mark.skipif(bool(ops.available_backends("cpu")["triton"]),
                                 reason=ops.available_backends("cpu")["triton"] or "runs")


def assert_bf16_within_one_ulp(got, ref):
    # The interpreter turns fp32 into bf16 by dropping the low 16 bits (truncation); a GPU and torch round to nearest
    # even. Same sign, so the bit patterns of the two results differ by at most one.
    assert ((got.view(torch.int16).int() - ref.view(torch.int16).int()).abs() <= 1).all()


class Stack(nn.Module):
    """MaskedLinear layers of two weight dtypes, one under a 2-program n, and an unfrozen bias (a plain parameter)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.q = MaskedLinear(40, 30, density=0.5, seed=2, name="q")  # n = 600
        self.v = MaskedLinear(48, 40, density=0.75, seed=2, name="v")  # n = 1440: two programs
        self.o = MaskedLinear(30, 20, density=0.3, seed=2, name="o", dtype=torch.bfloat16)
        self.k = MaskedLinear(20, 10, density=0.4, seed=2, name="k")
        self.o.bias.requires_grad_(True)

    def masked(self):
        return (self.q, self.v, self.o, self.k)


@triton_only
def test_optimizer_steps_triton_in_one_launch_per_group_and_dtype(monkeypatch):
    with randmask.use_backend("torch"):
        ours, ref = Stack(), Stack()

    def optimizer(model):  # two groups: the second with its own lr and no weight decay
        return MaskedAdamW([{"params": [model.q.delta, model.v.delta, model.o.delta, model.o.bias]},
                            {"params": [model.k.delta], "lr": 1e-2, "weight_decay": 0.0}], **HYPER)

    opt, ref_opt = optimizer(ours), optimizer(ref)
    names = {layer.delta: layer.name for layer in ours.masked()}
    launches, single_launches = [], []  # the names of the deltas each launch steps
    real = ma.masked_adamw_multi_triton
    monkeypatch.setattr(ma, "masked_adamw_multi_triton",
                        lambda batch, **k: launches.append([names[entry[2]] for entry in batch]) or real(batch, **k))
    monkeypatch.setattr(ma, "masked_adamw_triton", lambda *a, **k: single_launches.append(a))
    gen = torch.Generator().manual_seed(3)
    for step in range(3):
        for model in (ours, ref):
            model.zero_grad()
        for param, ref_param in zip(ours.parameters(), ref.parameters()):
            # v has no gradient at the first step, so its step count lags q's in the same launch
            if param.requires_grad and (step or param is not ours.v.delta):
                param.grad = torch.randn(param.shape, generator=gen).to(param.dtype)
                ref_param.grad = param.grad.clone()
        versions = [(layer.delta._version, layer.weight._version) for layer in ours.masked()]
        launches.clear()
        with randmask.use_backend("triton"):
            opt.step()
        with randmask.use_backend("torch"):
            ref_opt.step()
        # one launch for the first group's fp32 deltas, one for its bf16 delta, one for the second group
        assert launches == [["q", "v"] if step else ["q"], ["o"], ["k"]]
        for layer, (delta_version, weight_version) in zip(ours.masked(), versions):
            if layer.delta.grad is not None:  # bumped like the in-place ops of the CPU path
                assert layer.delta._version > delta_version and layer.weight._version > weight_version
    assert single_launches == []
    assert opt.state[ours.v.delta]["step"].item() == 2 and opt.state[ours.q.delta]["step"].item() == 3
    for layer, ref_layer in zip(ours.masked(), ref.masked()):
        state, ref_state = opt.state[layer.delta], ref_opt.state[ref_layer.delta]
        assert torch.equal(state["step"], ref_state["step"])
        # as test_triton_kernel_matches_twin: m and v to 2 ulps (bitwise on an AVX512 build), delta to fp32 rounding
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(state[key], ref_state[key], rtol=2**-22, atol=0)
        torch.testing.assert_close(layer.delta, ref_layer.delta, rtol=2**-20, atol=1e-7)
        rows, cols = layer.positions()
        merged = (layer.base.float() + layer.delta.detach()).to(layer.weight.dtype)
        if layer.weight.dtype == torch.bfloat16:
            assert_bf16_within_one_ulp(layer.weight[rows, cols], merged)
        else:
            assert torch.equal(layer.weight[rows, cols], merged)
        outside = ~mask_of(layer)
        assert torch.equal(layer.weight[outside], ref_layer.weight[outside])
    assert torch.equal(ours.o.bias, ref.o.bias)  # the plain AdamW path, the same on both backends
    synced = []
    monkeypatch.setattr(ops, "sparse_update", lambda *args: synced.append(1))
    with torch.no_grad():
        for layer in ours.masked():
            layer(torch.randn(3, layer.in_features).to(layer.weight.dtype))
    assert synced == []  # the step marked the layers synced


@triton_only
def test_torch_optimizer_hook_syncs_in_one_launch_per_dtype(monkeypatch):
    # after a torch AdamW step the hook writes every layer's merged entries: on the Triton backend one launch for
    # the fp32 weights and one for the bf16 one, and the same weights as a sync per layer
    monkeypatch.setattr(ops, "_forced", "triton")  # the whole test, fixture teardown included
    ours, ref = Stack(), Stack()
    launches = []
    multi = su.sparse_update_multi_triton
    monkeypatch.setattr(su, "sparse_update_multi_triton", lambda batch: launches.append(len(batch)) or multi(batch))
    opts = [torch.optim.AdamW([layer.delta for layer in model.masked()], lr=1e-2) for model in (ours, ref)]
    opts[1].writes_merged_weights = True  # the hook leaves the reference alone: it syncs layer by layer below
    for model, opt in zip((ours, ref), opts):
        for layer in model.masked():
            layer.delta.grad = torch.randn(layer.n, generator=torch.Generator().manual_seed(layer.n))
        opt.step()
    assert launches == [3, 1]  # q, v, k (fp32) and o (bf16)
    for layer, ref_layer in zip(ours.masked(), ref.masked()):
        assert torch.equal(layer.delta, ref_layer.delta)
        assert layer.delta._version == layer._synced_version  # marked synced: the forward will not write again
        ref_layer.sync()
        assert torch.equal(layer.weight, ref_layer.weight)


# ---------------------------------------------------------------- (d) state_dict round trip
@pytest.mark.usefixtures("torch_backend")
def test_state_dict_resume_is_identical():
    data = batches(15)

    def fresh():
        model = make_tiny()
        opt = MaskedAdamW([{"params": [model.fc1.delta, model.fc1.bias]},
                           {"params": [model.fc2.delta], "lr": 1e-2, "weight_decay": 0.0}], **HYPER)
        return model, opt

    model, opt = fresh()
    train(model, opt, data[:5])
    saved = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, saved)
    train(model, opt, data[5:10])

    resumed, resumed_opt = fresh()
    saved.seek(0)
    checkpoint = torch.load(saved)
    assert checkpoint["opt"]["state"][0]["step"].item() == 5.0
    resumed.load_state_dict(checkpoint["model"])
    resumed_opt.load_state_dict(checkpoint["opt"])
    train(resumed, resumed_opt, data[5:10])
    for layer, other in zip(model.masked(), resumed.masked()):
        assert torch.equal(layer.delta, other.delta) and torch.equal(layer.weight, other.weight)
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[layer.delta][key], resumed_opt.state[other.delta][key])
    assert torch.equal(model.fc1.bias, resumed.fc1.bias)
    assert [g["lr"] for g in resumed_opt.param_groups] == [HYPER["lr"], 1e-2]


# ---------------------------------------------------------------- (e) bad arguments
@pytest.mark.parametrize("kwargs,error,match", [
    ({"lr": -1e-3}, ValueError, "Invalid learning rate"),
    ({"lr": float("nan")}, ValueError, "Invalid learning rate"),
    ({"eps": -1e-8}, ValueError, "Invalid epsilon"),
    ({"betas": (1.0, 0.999)}, ValueError, "index 0"),
    ({"betas": (0.9, -0.1)}, ValueError, "index 1"),
    ({"weight_decay": -0.1}, ValueError, "Invalid weight_decay"),
    ({"betas": (0.9,)}, TypeError, "pair"),
    ({"lr": "0.1"}, TypeError, "lr must be a real number"),
    ({"amsgrad": True}, TypeError, "does not support amsgrad"),
    ({"maximize": False}, TypeError, "does not support maximize"),
    ({"foreach": True, "fused": True}, TypeError, "does not support foreach, fused"),
    ({"capturable": False}, TypeError, "does not support capturable"),
    ({"differentiable": False}, TypeError, "does not support differentiable"),
    ({"weight_decy": 0.1}, TypeError, "unexpected keyword arguments: weight_decy"),
])
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        MaskedAdamW([nn.Parameter(torch.zeros(3))], **kwargs)


def test_bad_param_groups_and_gradients():
    param = nn.Parameter(torch.zeros(5, 3))
    opt = MaskedAdamW([param])
    with pytest.raises(ValueError, match="Invalid learning rate"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))], "lr": -1.0})
    with pytest.raises(TypeError, match="does not support amsgrad"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))], "amsgrad": True})
    assert len(opt.param_groups) == 1  # nothing half-added
    param.grad = torch.randn(5, 3).to_sparse()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()
