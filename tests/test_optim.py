"""MaskedAdamW against torch.optim.AdamW followed by a sync, and its Triton kernels (run by the interpreter,
TRITON_INTERPRET=1 from conftest.py): the single-matrix one against the torch twin, the multi-tensor one against
a launch of the single-matrix one per matrix."""
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
    syncs = []  # the weights written by a layer's own sync or by the optimizer hook's
    real, real_many = layer_module.sparse_update, layer_module.sparse_update_many
    monkeypatch.setattr(layer_module, "sparse_update", lambda *args: syncs.append(args[0]) or real(*args))
    monkeypatch.setattr(layer_module, "sparse_update_many",
                        lambda updates: syncs.extend(u[0] for u in updates) or real_many(updates))
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


def multi_batch(dtype, gen):
    """[weight, base, delta, exp_avg, exp_avg_sq, key] lists for one multi-tensor launch: different shapes and n (a
    1-row matrix, a transposed Conv1D-like view over 2 programs, an n = 0 one) and keys whose 32-bit halves are
    small and >= 2^31, which the single-matrix kernel gets as i32 and as i64 arguments."""
    matrices = []
    for shape, n, transposed, key in (((1, 1031), 700, False, 3 << 32 | 5), ((40, 61), 1500, True, KEY),
                                      ((5, 7), 0, False, KEY), ((9, 13), 20, False, 2**64 - 1)):
        weight = torch.randn(shape[::-1] if transposed else shape, generator=gen).to(dtype)
        weight = weight.T if transposed else weight
        rows, cols = positions(shape, n, key)
        matrices.append([weight, weight[rows, cols], *(torch.zeros(n) for _ in range(3)), key])
    return matrices


@triton_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("weight_decay,beta1", [(0.0, 0.9), (0.1, 0.3)], ids=["no-decay", "decay-lerp-from-end"])
def test_multi_tensor_kernel_matches_one_launch_each(dtype, weight_decay, beta1):
    gen = torch.Generator().manual_seed(6)
    ours = multi_batch(dtype, gen)
    initial = [weight.clone() for weight, *_ in ours]
    ref = [[t.clone() if torch.is_tensor(t) else t for t in matrix] for matrix in ours]
    hyper = {"lr": 1e-2, "beta1": beta1, "beta2": 0.999, "eps": 1e-8, "weight_decay": weight_decay}
    for steps in ((1, 3, 1, 2), (2, 4, 2, 3), (3, 5, 3, 4)):  # each matrix its own step count
        grads = [torch.randn(delta.numel(), generator=gen) for _, _, delta, *_ in ours]
        ma.masked_adamw_multi_triton([(weight, base, delta, grad, exp_avg, exp_avg_sq, key, step)
                                      for (weight, base, delta, exp_avg, exp_avg_sq, key), grad, step
                                      in zip(ours, grads, steps)], **hyper)
        for (weight, base, delta, exp_avg, exp_avg_sq, key), grad, step in zip(ref, grads, steps):
            ma.masked_adamw_triton(weight, base, delta, grad, exp_avg, exp_avg_sq, key, step=step, **hyper)
        for matrix, ref_matrix in zip(ours, ref):  # the same kernel body and scalars: bitwise equal
            for name, got, want in zip(("weight", "base", "delta", "exp_avg", "exp_avg_sq"), matrix, ref_matrix):
                assert torch.equal(got, want), name
    for (weight, _, delta, *_, key), w0 in zip(ours, initial):
        outside = torch.ones(weight.shape, dtype=torch.bool)
        outside[positions(tuple(weight.shape), delta.numel(), key)] = False
        assert torch.equal(weight[outside], w0[outside])  # bitwise untouched outside the mask
        assert delta.numel() == 0 or delta.abs().min() > 0


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
    monkeypatch.setenv("RANDMASK_BACKEND", "torch")
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
        monkeypatch.setenv("RANDMASK_BACKEND", "triton")
        opt.step()
        monkeypatch.setenv("RANDMASK_BACKEND", "torch")
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
    monkeypatch.setattr(layer_module, "sparse_update", lambda *args: synced.append(1))
    with torch.no_grad():
        for layer in ours.masked():
            layer(torch.randn(3, layer.in_features).to(layer.weight.dtype))
    assert synced == []  # the step marked the layers synced


@triton_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_multi_matrix_sync_matches_one_launch_each(dtype):
    # the one-launch merged-weight write (the step hook's, for torch optimizers) against sparse_update_triton per
    # matrix: bitwise, other entries untouched, n = 0 and a transposed weight included
    from randmask.kernels import sparse_update as su

    gen = torch.Generator().manual_seed(8)
    ours = multi_batch(dtype, gen)
    for _, _, delta, *_ in ours:
        delta.copy_(torch.randn(delta.numel(), generator=gen))
    ref = [[t.clone() if torch.is_tensor(t) else t for t in matrix] for matrix in ours]
    initial = [weight.clone() for weight, *_ in ours]
    su.sparse_update_multi_triton([(weight, base, delta, key) for weight, base, delta, _, _, key in ours])
    for weight, base, delta, _, _, key in ref:
        su.sparse_update_triton(weight, base, delta, key)
    for (weight, _, delta, _, _, key), (ref_weight, *_), w0 in zip(ours, ref, initial):
        assert torch.equal(weight, ref_weight)
        outside = torch.ones(weight.shape, dtype=torch.bool)
        outside[positions(tuple(weight.shape), delta.numel(), key)] = False
        assert torch.equal(weight[outside], w0[outside]) and (delta.numel() == 0 or not torch.equal(weight, w0))
    fp32, bf16 = multi_batch(torch.float32, gen)[0], multi_batch(torch.bfloat16, gen)[1]
    with pytest.raises(ValueError, match="one dtype and device"):
        su.sparse_update_multi_triton([(fp32[0], fp32[1], fp32[2], fp32[5]), (bf16[0], bf16[1], bf16[2], bf16[5])])
    with pytest.raises(ValueError, match="fp32 deltas"):
        su.sparse_update_multi_triton([(fp32[0], fp32[1], fp32[2].double(), fp32[5])])
    with pytest.raises(ValueError, match="1-D base and delta of one length"):
        su.sparse_update_multi_triton([(fp32[0], fp32[1], fp32[2][:-1], fp32[5])])


@triton_only
def test_torch_optimizer_hook_syncs_in_one_launch_per_dtype(monkeypatch):
    # after a torch AdamW step the hook writes every layer's merged entries: on the Triton backend one launch for
    # the fp32 weights and one for the bf16 one, and the same weights as a sync per layer
    from randmask.kernels import sparse_update as su

    monkeypatch.setenv("RANDMASK_BACKEND", "triton")
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


@triton_only
def test_multi_tensor_kernel_refuses_bad_batches():
    gen = torch.Generator().manual_seed(7)
    hyper = {"lr": 1e-2, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.0}
    fp32, bf16 = multi_batch(torch.float32, gen)[0], multi_batch(torch.bfloat16, gen)[3]
    before = [t.clone() for t in fp32[:5]]

    def launch(*matrices, step=1):
        ma.masked_adamw_multi_triton([(*m[:3], torch.ones(m[2].numel()), *m[3:], step) for m in matrices], **hyper)

    with pytest.raises(ValueError, match="one dtype and device: got torch.bfloat16 .* batch of torch.float32"):
        launch(fp32, bf16)
    with pytest.raises(ValueError, match="weights must be one of"):
        launch([fp32[0].to(torch.int32), fp32[1].to(torch.int32), *fp32[2:]])
    with pytest.raises(ValueError, match="step"):
        launch(fp32, step=0)
    with pytest.raises(ValueError, match="exp_avg is updated in place and must be contiguous"):
        launch([*fp32[:3], torch.zeros(2 * fp32[2].numel())[::2], *fp32[4:]])
    with pytest.raises(ValueError, match="base must be"):
        launch([fp32[0], fp32[1].to(torch.bfloat16), *fp32[2:]])
    with pytest.raises(ValueError, match="n must be in"):
        launch([fp32[0][:, :1], fp32[1], *fp32[2:]])
    assert all(torch.equal(t, t0) for t, t0 in zip(fp32[:5], before))  # checked before anything is written


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
