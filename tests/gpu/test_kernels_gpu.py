"""The gpu tier (`pytest -m gpu`, run by benchmarks/gpu_check.sh): every Triton implementation on a CUDA device at
GPU sizes, against the torch twins on the same device (which tests/ops holds to the independent references on the
CPU); the dense twin inside a CUDA graph; MaskedLinear and MaskedAdamW end to end on the GPU.

Positions and slots bit-identical; the masked gradient within fp32 accumulation error of the twin on the same
(rounded) inputs; gather and update bitwise (on a GPU fp32 -> bf16 rounds to nearest even, like torch); the fused
AdamW step to fp32 rounding, the one-launch kernels bitwise equal to one launch per matrix.

Without a GPU, RANDMASK_GPU_SMOKE=1 runs the same tests at tiny sizes on the CPU under the Triton interpreter (the
full tier does, tests/test_gpu_smoke.py), so these tests are themselves tested where no GPU is."""
import os

import pytest
import torch

import randmask
from randmask import MatrixMask, layer_key, ops
from randmask.kernels import masked_adamw as adamw_op
from randmask.kernels import masked_grad as grad_op
from randmask.kernels import sparse_update as update_op

ON_GPU = torch.cuda.is_available()
SMOKE = not ON_GPU and os.environ.get("RANDMASK_GPU_SMOKE") == "1"
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not (ON_GPU or SMOKE), reason="needs a CUDA device")]
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
KEY = layer_key(0, "gpu_check")


def sizes(gpu, smoke):
    return smoke if SMOKE else gpu


def same_weights(got, want) -> bool:
    """Bitwise; in the CPU smoke run bf16 within one unit in the last place (the interpreter narrows by truncation)."""
    if SMOKE and got.dtype == torch.bfloat16:
        return bool(((got.view(torch.int16).int() - want.view(torch.int16).int()).abs() <= 1).all())
    return torch.equal(got, want)


@pytest.fixture(scope="module", autouse=True)
def triton_backend_runs():
    reason = ops.available_backends(DEVICE)["triton"]
    if reason:
        pytest.skip(reason)


def twin_positions(shape, n):
    return ops.run("positions", "torch", shape, n, KEY, DEVICE)


@pytest.mark.parametrize("shape", sizes([(1, 65537), (65537, 1), (97, 89), (4096, 14336)], [(1, 300), (97, 89)]))
def test_positions_and_slots(shape):
    n = min(shape[0] * shape[1], 200_000)
    rows, cols = ops.run("positions", "triton", shape, n, KEY, DEVICE)
    want_rows, want_cols = twin_positions(shape, n)
    assert torch.equal(rows, want_rows) and torch.equal(cols, want_cols)
    assert torch.equal(ops.run("slots", "triton", rows, cols, shape, n, KEY), torch.arange(n, device=DEVICE))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,tokens", sizes([((576, 1536), 512), ((4096, 4096), 4096), ((1024, 20000), 256)],
                                               [((40, 56), 40)]))
def test_masked_grad(dtype, shape, tokens):
    # (1024, 20000): the matmul way in two blocks of output rows (64 MiB of fp32 each at most)
    gen = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, shape[1], generator=gen).to(DEVICE, dtype)
    grad_y = torch.randn(tokens, shape[0], generator=gen).to(DEVICE, dtype)
    # a value is a sum of `tokens` products of unit normals: its typical size is sqrt(tokens), whatever the mask (the
    # largest |value| of a 1-value mask can be near 0 and made the relative error meaningless)
    scale = tokens ** 0.5
    for density in (1e-4, 1e-2, 0.2):
        mask = MatrixMask(shape, max(1, round(density * shape[0] * shape[1])), KEY)
        want = ops.run("masked_grad", "torch-gather", x, grad_y, mask)
        for impl in ("triton-gather", "triton-matmul", "torch-dense"):
            err = (ops.run("masked_grad", impl, x, grad_y, mask) - want).abs().max().item() / scale
            assert err < 1e-4, (impl, density, err)
        with randmask.use_backend("triton"):
            assert (ops.masked_grad(x, grad_y, mask) - want).abs().max().item() / scale < 1e-4


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gather_update_and_fused_adamw(dtype):
    weight = torch.randn(*sizes((4096, 1024), (64, 48)), device=DEVICE).to(dtype)
    n = sizes(50_000, 300)
    mask = MatrixMask(tuple(weight.shape), n, KEY)
    rows, cols = twin_positions(tuple(weight.shape), n)
    base = ops.run("gather_weight", "triton", weight, mask)
    assert torch.equal(base, weight[rows, cols])
    delta = torch.randn(n, device=DEVICE) * 1e-2
    ours, want = weight.clone(), weight.clone()
    ops.run("sparse_update", "triton", ours, base, delta, mask)
    ops.run("sparse_update", "torch", want, base, delta, mask)
    assert same_weights(ours, want)
    hyper = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)
    fused = [weight.clone(), delta.clone(), torch.zeros(n, device=DEVICE), torch.zeros(n, device=DEVICE)]
    twin = [weight.clone(), delta.clone(), torch.zeros(n, device=DEVICE), torch.zeros(n, device=DEVICE)]
    for step in (1, 2, 3):
        grad = torch.randn(n, device=DEVICE)
        w, d, m, v = fused
        adamw_op.masked_adamw_triton(w, base, d, grad, m, v, KEY, step=step, **hyper)
        w, d, m, v = twin
        adamw_op.masked_adamw_torch(w, base, d, grad, m, v, KEY, step=step, positions=(rows, cols), **hyper)
    assert ((fused[1] - twin[1]).abs().max() / twin[1].abs().max()).item() < 1e-6
    torch.testing.assert_close(fused[2], twin[2], rtol=2**-22, atol=0)
    assert same_weights(fused[0][rows, cols], (base.float() + fused[1]).to(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_one_launch_kernels_equal_one_launch_each(dtype):
    hyper = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)
    batch = []
    for i, (shape, n) in enumerate([(sizes((4096, 1024), (64, 48)), sizes(50_000, 300)), ((97, 89), 3000),
                                    ((64, 48), 0)]):
        w = torch.randn(*shape, device=DEVICE).to(dtype)
        w = w.t().contiguous().t() if i == 1 else w  # a transposed (Conv1D-style) weight
        batch.append((w, update_op.gather_weight_triton(w, n, KEY + i), torch.zeros(n, device=DEVICE),
                      torch.randn(n, device=DEVICE), torch.zeros(n, device=DEVICE), torch.zeros(n, device=DEVICE),
                      KEY + i, 1 + i))
    per_matrix = [tuple(t.clone() if torch.is_tensor(t) else t for t in item) for item in batch]
    for *tensors, matrix_key, step in per_matrix:
        adamw_op.masked_adamw_triton(*tensors, matrix_key, step=step, **hyper)
    adamw_op.masked_adamw_multi_triton(batch, **hyper)
    assert all(torch.equal(x, y) for one, many in zip(per_matrix, batch) for x, y in zip(one[:6], many[:6]))
    for *tensors, matrix_key, _ in per_matrix:  # the step hook's merged-weight write, likewise
        update_op.sparse_update_triton(tensors[0], tensors[1], tensors[2] + 1e-3, matrix_key)
    update_op.sparse_update_multi_triton([(w, b, d + 1e-3, k) for w, b, d, *_, k, _ in batch])
    assert all(torch.equal(one[0], many[0]) for one, many in zip(per_matrix, batch))


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a CUDA device")
def test_dense_twin_runs_inside_a_cuda_graph():
    # the GPU path without Triton (and torch.compile's reduce-overhead mode on the torch backend) must not
    # synchronize with the host: two row blocks of a 4096 x 4096 layer, bf16 operands
    x = torch.randn(1024, 4096, device=DEVICE).to(torch.bfloat16)
    grad_y = torch.randn(1024, 4096, device=DEVICE).to(torch.bfloat16)
    rows, cols = twin_positions((4096, 4096), 167772)
    want = grad_op.masked_grad_gather_torch(x, grad_y, rows, cols)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        grad_op.masked_grad_dense_torch(x, grad_y, rows, cols)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = grad_op.masked_grad_dense_torch(x, grad_y, rows, cols)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(captured, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


@pytest.mark.parametrize("mode", ["merged", "additive"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_masked_linear_and_masked_adamw_triton_equal_the_twins(dtype, mode):
    in_features, out_features = sizes((576, 1536), (48, 40))
    results = {}
    for backend in ("triton", "torch"):
        with randmask.use_backend(backend):
            torch.manual_seed(0)
            linear = torch.nn.Linear(in_features, out_features).to(DEVICE, dtype)
            layer = randmask.MaskedLinear.from_linear(linear, density=sizes(5e-4, 0.05), name="mlp.up", mode=mode)
            opt = randmask.MaskedAdamW([layer.delta], lr=1e-2)
            x = torch.randn(4, sizes(128, 8), in_features, device=DEVICE).to(dtype).requires_grad_(True)
            layer(x).float().square().mean().backward()
            grad = layer.delta.grad.clone()
            opt.step()
            results[backend] = (grad, layer.delta.detach().clone(), x.grad)
    (grad, delta, grad_x), (want_grad, want_delta, want_grad_x) = results["triton"], results["torch"]
    torch.testing.assert_close(grad_x, want_grad_x)
    torch.testing.assert_close(grad, want_grad, rtol=1e-5, atol=1e-5 * want_grad.abs().max().item())
    torch.testing.assert_close(delta, want_delta, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("op", ["sparse_add", "sparse_add_t"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,n,tokens", sizes([((4096, 4096), 1678, 8192), ((1536, 576), 20349, 512),
                                                  ((1, 65537), 3000, 300), ((65537, 1), 3000, 300)],
                                                 [((97, 89), 300, 150)]))
def test_sparse_add_is_the_cpu_twin_bitwise(op, dtype, shape, n, tokens):
    # the twin on the CPU (in slot order, deterministic; on a GPU index_add_ adds in any order) is the reference;
    # with no fma both round each product and add in slot order
    dst, src_width = shape if op == "sparse_add" else shape[::-1]
    gen = torch.Generator().manual_seed(n)
    out = torch.randn(tokens, dst, generator=gen).to(dtype)
    src = torch.randn(tokens, src_width, generator=gen).to(dtype)
    delta = torch.randn(n, generator=gen)
    mask = MatrixMask(shape, n, KEY)
    want = out.clone()
    ops.run(op, "torch", want, src, delta, mask)
    got = out.to(DEVICE, copy=True)
    ops.run(op, "triton", got, src.to(DEVICE), delta.to(DEVICE), mask)
    again = out.to(DEVICE, copy=True)
    ops.run(op, "triton", again, src.to(DEVICE), delta.to(DEVICE), mask)
    assert torch.equal(got, again)  # the same bits on every run
    assert same_weights(got.cpu(), want)


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a CUDA device")
def test_sparse_add_needs_no_host_sync_and_runs_inside_a_cuda_graph():
    shape, n = (4096, 4096), 16777
    mask = MatrixMask(shape, n, KEY)
    x = torch.randn(512, 4096, device=DEVICE).to(torch.bfloat16)
    out = torch.randn(512, 4096, device=DEVICE).to(torch.bfloat16)
    delta = torch.randn(n, device=DEVICE)
    want = out.clone()
    ops.run("sparse_add", "triton", want, x, delta, mask)  # warm-up (compiles) outside the checks
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        eager = out.clone()
        ops.run("sparse_add", "triton", eager, x, delta, mask)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    captured = out.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.run("sparse_add", "triton", captured, x, delta, mask)
    captured.copy_(out)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(eager, want) and torch.equal(captured, want)
