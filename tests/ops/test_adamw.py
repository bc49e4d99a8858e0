"""adamw: one AdamW step on a list of parameters, with the merged write weight[r_k, c_k] = round(base[k] + delta[k])
for the deltas among them, on every implementation against torch.optim.AdamW followed by that write (bitwise where
the implementation runs torch's own AdamW kernel, to fp32 rounding for the Triton kernels); and the Triton kernels'
own checks (the fused single-matrix kernel against the torch twin, the one-launch kernel against one launch each)."""
import pytest
import reference
import torch
from op_cases import KEY, assert_bf16_within_one_ulp, implementations

from randmask import MatrixMask, ops
from randmask.kernels import masked_adamw as ma

HYPER = {"lr": 3e-2, "beta1": 0.9, "beta2": 0.99, "eps": 1e-8, "weight_decay": 0.1}
# what each implementation reproduces bitwise: torch's single-tensor step, or the fused kernel of AdamW(fused=True)
TORCH_ADAMW = {"torch": {"foreach": False}, "native": {"fused": True}, "triton": {"foreach": False}}


def problem(dtype, seed=0):
    """Two deltas (a row-major weight and a transposed one, of `dtype`) and a plain fp32 parameter."""
    gen = torch.Generator().manual_seed(seed)
    deltas = []
    for shape, n, transposed in (((40, 61), 1500, False), ((16, 32), 150, True)):
        weight = torch.randn(shape[::-1] if transposed else shape, generator=gen).to(dtype)
        weight = weight.t() if transposed else weight
        rows, cols = reference.positions(shape, n, KEY)
        deltas.append((weight, weight[rows, cols].clone(), torch.zeros(n)))
    return deltas, torch.randn(7, 3, generator=gen)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("impl", implementations("adamw"))
def test_every_implementation_matches_torch_adamw_then_the_write(impl, dtype):
    deltas, plain = problem(dtype)
    ref_deltas = [torch.nn.Parameter(d.clone()) for _, _, d in deltas]
    ref_plain = torch.nn.Parameter(plain.clone())
    ref_opt = torch.optim.AdamW([*ref_deltas, ref_plain], lr=HYPER["lr"], betas=(HYPER["beta1"], HYPER["beta2"]),
                                eps=HYPER["eps"], weight_decay=HYPER["weight_decay"], **TORCH_ADAMW[impl])
    tensors = [d for _, _, d in deltas] + [plain]
    states = [(torch.zeros_like(t), torch.zeros_like(t), torch.tensor(0.0)) for t in tensors]
    merged = [(w, b, MatrixMask(tuple(w.shape), d.numel(), KEY)) for w, b, d in deltas] + [None]
    initial = [w.clone() for w, _, _ in deltas]
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        grads = [torch.randn(t.shape, generator=gen) for t in tensors]
        for (_, _, step), _ in zip(states, tensors):
            step += 1
        ops.run("adamw", impl, [ops.AdamWParam(t, g, m, v, step, mrg)
                                for t, g, (m, v, step), mrg in zip(tensors, grads, states, merged)], HYPER)
        for p, g in zip([*ref_deltas, ref_plain], grads):
            p.grad = g.clone()
        ref_opt.step()
        for t, ref_t, (m, v, _), ref_p in zip(tensors, [*ref_deltas, ref_plain], states, ref_opt.state.values()):
            if impl == "triton":  # the kernel's sqrt is round-to-nearest, torch's CPU sqrt is not always (1 ulp)
                torch.testing.assert_close(t, ref_t.detach(), rtol=2**-20, atol=1e-7)
                torch.testing.assert_close(m, ref_p["exp_avg"], rtol=2**-22, atol=0)
                torch.testing.assert_close(v, ref_p["exp_avg_sq"], rtol=2**-22, atol=0)
            else:
                assert torch.equal(t, ref_t.detach()) and torch.equal(m, ref_p["exp_avg"])
                assert torch.equal(v, ref_p["exp_avg_sq"])
        for (weight, base, delta), w0 in zip(deltas, initial):
            want = reference.sparse_update(w0, base, delta, KEY)
            if impl == "triton" and dtype == torch.bfloat16:
                assert_bf16_within_one_ulp(weight, want)
            else:
                assert torch.equal(weight, want)
    assert all(d.abs().min() > 0 for _, _, d in deltas)  # every trained value moved


@pytest.mark.parametrize("impl", implementations("adamw", backends=("torch",)))
def test_complex_parameters_step_as_pairs_of_reals(impl):
    param = torch.randn(5, dtype=torch.complex64)
    ref = torch.nn.Parameter(param.clone())
    grad = torch.randn(5, dtype=torch.complex64)
    m, v = torch.zeros_like(param), torch.zeros_like(param)
    ops.run("adamw", impl, [ops.AdamWParam(param, grad, m, v, torch.tensor(1.0), None)], HYPER)
    ref.grad = grad.clone()
    torch.optim.AdamW([ref], lr=HYPER["lr"], betas=(HYPER["beta1"], HYPER["beta2"]), eps=HYPER["eps"],
                      weight_decay=HYPER["weight_decay"], foreach=False).step()
    assert torch.equal(param, ref.detach())


def test_selector_sends_complex_parameters_to_the_twin():
    assert ops.select("adamw", "cpu", (torch.complex64,)) == "torch"


# ---------------------------------------------------------------------------------------------------- Triton kernels
triton_ready = pytest.mark.skipif(bool(ops.available_backends("cpu")["triton"]),
                                  reason=ops.available_backends("cpu")["triton"] or "runs")


@triton_ready
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("beta1", [0.9, 0.3], ids=["lerp-from-start", "lerp-from-end"])
def test_fused_kernel_matches_the_twin(dtype, beta1):
    shape = (40, 61)
    gen = torch.Generator().manual_seed(5)
    weight0 = torch.randn(shape[1], shape[0], generator=gen).to(dtype).t()  # non-contiguous (out, in), like Conv1D
    # n = 0, one slot, and 2 and 3 programs of 1024 slots (the last one partly masked)
    for n in (0, 1, 1500, shape[0] * shape[1]):
        rows, cols = reference.positions(shape, n, KEY)
        base = weight0[rows, cols]
        weight, ref_weight = weight0.clone(), weight0.clone()
        ours, ref = [torch.zeros(n) for _ in range(3)], [torch.zeros(n) for _ in range(3)]  # delta, m, v
        for step in (1, 2, 3):
            grad = torch.randn(n, generator=gen)
            hyper = {"lr": 1e-2, "beta1": beta1, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.1, "step": step}
            ma.masked_adamw_triton(weight, base, ours[0], grad, ours[1], ours[2], KEY, **hyper)
            ma.masked_adamw_torch(ref_weight, base, ref[0], grad, ref[1], ref[2], KEY, **hyper, positions=(rows, cols))
            # m and v follow torch's fma placement (2 ulps allowed), delta to fp32 rounding (the sqrt)
            for got, want in zip(ours[1:], ref[1:]):
                torch.testing.assert_close(got, want, rtol=2**-22, atol=0)
            torch.testing.assert_close(ours[0], ref[0], rtol=2**-21, atol=1e-2 * 2**-21)
            merged = (base.float() + ours[0]).to(dtype)  # what a sync writes for the kernel's own delta
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
    """[weight, base, delta, exp_avg, exp_avg_sq, key] lists for one multi-matrix launch: different shapes and n (a
    1-row matrix, a transposed view over 2 programs, n = 0) and keys whose 32-bit halves are small and >= 2^31, which
    the single-matrix kernel gets as i32 and as i64 arguments."""
    out = []
    for shape, n, transposed, key in (((1, 1031), 700, False, 3 << 32 | 5), ((40, 61), 1500, True, KEY),
                                      ((5, 7), 0, False, KEY), ((9, 13), 20, False, 2**64 - 1)):
        weight = torch.randn(shape[::-1] if transposed else shape, generator=gen).to(dtype)
        weight = weight.t() if transposed else weight
        rows, cols = reference.positions(shape, n, key)
        out.append([weight, weight[rows, cols], *(torch.zeros(n) for _ in range(3)), key])
    return out


@triton_ready
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("weight_decay,beta1", [(0.0, 0.9), (0.1, 0.3)], ids=["no-decay", "decay-lerp-from-end"])
def test_one_launch_kernel_is_bitwise_one_launch_each(dtype, weight_decay, beta1):
    gen = torch.Generator().manual_seed(6)
    ours = multi_batch(dtype, gen)
    initial = [weight.clone() for weight, *_ in ours]
    ref = [[t.clone() if torch.is_tensor(t) else t for t in matrix] for matrix in ours]
    hyper = {**HYPER, "beta1": beta1, "weight_decay": weight_decay}
    for steps in ((1, 3, 1, 2), (2, 4, 2, 3), (3, 5, 3, 4)):  # each matrix its own step count
        grads = [torch.randn(delta.numel(), generator=gen) for _, _, delta, *_ in ours]
        ma.masked_adamw_multi_triton([(w, b, d, g, m, v, key, step) for (w, b, d, m, v, key), g, step
                                      in zip(ours, grads, steps)], **hyper)
        for (w, b, d, m, v, key), g, step in zip(ref, grads, steps):
            ma.masked_adamw_triton(w, b, d, g, m, v, key, step=step, **hyper)
        for matrix, ref_matrix in zip(ours, ref):  # the same kernel body and scalars: bitwise equal
            for name, got, want in zip(("weight", "base", "delta", "exp_avg", "exp_avg_sq"), matrix, ref_matrix):
                assert torch.equal(got, want), name
    for (weight, _, delta, *_, key), w0 in zip(ours, initial):
        outside = torch.ones(weight.shape, dtype=torch.bool)
        outside[reference.positions(tuple(weight.shape), delta.numel(), key)] = False
        assert torch.equal(weight[outside], w0[outside])  # bitwise untouched outside the mask
        assert delta.numel() == 0 or delta.abs().min() > 0


@triton_ready
def test_one_launch_kernel_refuses_bad_batches_before_writing():
    gen = torch.Generator().manual_seed(7)
    fp32, bf16 = multi_batch(torch.float32, gen)[0], multi_batch(torch.bfloat16, gen)[3]
    before = [t.clone() for t in fp32[:5]]

    def launch(*matrices, step=1):
        ma.masked_adamw_multi_triton([(*m[:3], torch.ones(m[2].numel()), *m[3:], step) for m in matrices], **HYPER)

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


def test_twin_refuses_bad_arguments():
    weight, base = torch.zeros(4, 5), torch.zeros(3)
    vectors = [torch.zeros(3) for _ in range(4)]
    hyper = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.0}
    with pytest.raises(ValueError, match="step"):
        ma.masked_adamw_torch(weight, base, *vectors, KEY, **hyper, step=0)
    with pytest.raises(ValueError, match="grad must be fp32"):
        ma.masked_adamw_torch(weight, base, vectors[0], torch.zeros(4), *vectors[2:], KEY, **hyper, step=1)
    with pytest.raises(ValueError, match="base must be"):
        ma.masked_adamw_torch(weight, base.half(), *vectors, KEY, **hyper, step=1)
