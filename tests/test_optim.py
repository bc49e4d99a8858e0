"""MaskedAdamW against torch.optim.AdamW followed by a sync, and its Triton kernel (run by the interpreter,
TRITON_INTERPRET=1 from conftest.py) against the torch twin."""
import io
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import randmask.layer as layer_module
from randmask import MaskedLinear
from randmask.kernels import masked_adamw as ma
from randmask.kernels import native
from randmask.optim import MaskedAdamW

HYPER = {"lr": 3e-2, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.1}
KEY = 0x0123456789ABCDEF


@pytest.fixture
def torch_backend(monkeypatch):
    monkeypatch.setenv("RANDMASK_BACKEND", "torch")


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
def test_matches_adamw_then_sync(dtype, backend, monkeypatch):
    if backend == "native" and not native.HAS_NATIVE:
        pytest.skip(f"native kernels not built: {native.NATIVE_REASON}")
    monkeypatch.setenv("RANDMASK_BACKEND", backend)
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
    syncs = []
    real = layer_module.sparse_update
    monkeypatch.setattr(layer_module, "sparse_update", lambda *args: syncs.append(args[0]) or real(*args))
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
    # the counter does see syncs: a torch optimizer's step makes the layers sync
    train(model, torch.optim.AdamW(model.parameters(), **HYPER), [(x, target)])
    with torch.no_grad():
        model(x2)
    assert len(syncs) >= 2


# ---------------------------------------------------------------- (c) the Triton kernel (interpreted) vs the twin
triton_only = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" or ma.triton is None,
                                 reason="runs the Triton kernel on CPU tensors: needs triton and TRITON_INTERPRET=1")


def positions(shape, n, key=KEY):
    from randmask.kernels.mask_addressing import slot_to_flat_torch

    flat = slot_to_flat_torch(torch.arange(n), shape[0] * shape[1], key)
    return flat // shape[1], flat % shape[1]


def assert_bf16_within_one_ulp(got, ref):
    # The interpreter turns fp32 into bf16 by dropping the low 16 bits (truncation); a GPU and torch round to nearest
    # even. Same sign, so the bit patterns of the two results differ by at most one.
    assert ((got.view(torch.int16).int() - ref.view(torch.int16).int()).abs() <= 1).all()


@triton_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("beta1", [0.9, 0.3], ids=["lerp-from-start", "lerp-from-end"])
def test_triton_kernel_matches_twin(dtype, beta1):
    shape = (40, 61)
    gen = torch.Generator().manual_seed(5)
    weight0 = torch.randn(shape[1], shape[0], generator=gen).to(dtype).T  # non-contiguous (out, in), like Conv1D
    # n = 0, one slot, and 2 and 3 programs of BLOCK = 1024 (the last one partly masked)
    for n in (0, 1, 1500, shape[0] * shape[1]):
        rows, cols = positions(shape, n)
        base = weight0[rows, cols]
        weight, ref_weight = weight0.clone(), weight0.clone()
        ours = [torch.zeros(n) for _ in range(3)]  # delta, exp_avg, exp_avg_sq
        ref = [torch.zeros(n) for _ in range(3)]
        for step in (1, 2, 3):
            grad = torch.randn(n, generator=gen)
            hyper = {"lr": 1e-2, "beta1": beta1, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.1, "step": step}
            ma.masked_adamw_triton(weight, base, ours[0], grad, ours[1], ours[2], KEY, **hyper)
            ma.masked_adamw_torch(ref_weight, base, ref[0], grad, ref[1], ref[2], KEY, **hyper,
                                  positions=(rows, cols))
            # To fp32 rounding: the kernel's sqrt is IEEE round-to-nearest, torch's CPU sqrt is not always (1 ulp);
            # m and v follow torch's fma placement (bitwise here, on an AVX512 build), 2 ulps allowed.
            for got, want in zip(ours[1:], ref[1:]):
                torch.testing.assert_close(got, want, rtol=2**-22, atol=0)
            torch.testing.assert_close(ours[0], ref[0], rtol=2**-21, atol=1e-2 * 2**-21)
            merged = (base.float() + ours[0]).to(dtype)  # what sync writes for the kernel's own delta
            if dtype == torch.bfloat16:
                assert_bf16_within_one_ulp(weight[rows, cols], merged)
            else:
                assert torch.equal(weight[rows, cols], merged)
            outside = torch.ones(shape, dtype=torch.bool)
            outside[rows, cols] = False
            assert torch.equal(weight[outside], weight0[outside])
        if n:
            assert ours[0].abs().min() > 0


@triton_only
def test_optimizer_dispatches_to_triton(monkeypatch):
    pytest.importorskip("transformers")
    monkeypatch.setenv("RANDMASK_BACKEND", "torch")
    layers = []
    for _ in range(2):
        torch.manual_seed(0)
        layers.append(MaskedLinear(40, 30, density=0.5, seed=2, name="q"))  # n = 600: one program
    ours, ref = layers
    launches = []
    real = ma.masked_adamw_triton
    monkeypatch.setattr(ma, "masked_adamw_triton", lambda *a, **k: launches.append(a[0]) or real(*a, **k))
    opt, ref_opt = MaskedAdamW(ours.parameters(), **HYPER), MaskedAdamW(ref.parameters(), **HYPER)
    gen = torch.Generator().manual_seed(3)
    for _ in range(2):
        grad = torch.randn(600, generator=gen)
        ours.delta.grad, ref.delta.grad = grad.clone(), grad.clone()
        version = ours.delta._version
        monkeypatch.setenv("RANDMASK_BACKEND", "triton")
        opt.step()
        monkeypatch.setenv("RANDMASK_BACKEND", "torch")
        ref_opt.step()
        assert ours.delta._version > version  # bumped like the in-place ops of the CPU path
    assert len(launches) == 2 and launches[0] is ours.weight
    torch.testing.assert_close(ours.delta, ref.delta, rtol=2**-20, atol=1e-7)
    rows, cols = ours.positions()
    assert torch.equal(ours.weight[rows, cols], ours.base + ours.delta.detach())
    synced = []
    monkeypatch.setattr(layer_module, "sparse_update", lambda *args: synced.append(1))
    with torch.no_grad():
        ours(torch.randn(3, 40))
    assert synced == []


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
    weight, base = torch.zeros(4, 5), torch.zeros(3)
    vectors = [torch.zeros(3) for _ in range(4)]
    hyper = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.0}
    with pytest.raises(ValueError, match="step"):
        ma.masked_adamw_torch(weight, base, *vectors, KEY, **hyper, step=0)
    with pytest.raises(ValueError, match="grad must be fp32"):
        ma.masked_adamw_torch(weight, base, vectors[0], torch.zeros(4), *vectors[2:], KEY, **hyper, step=1)
    with pytest.raises(ValueError, match="base must be"):
        ma.masked_adamw_torch(weight, base.half(), *vectors, KEY, **hyper, step=1)
