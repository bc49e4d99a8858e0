"""masked_grad, g[k] = sum_t grad_y[t, r_k] x[t, c_k], on every implementation against the float64 reference, and
what each implementation alone has to get right (the native library's vector loops and thread counts, the Triton
gather's token splits and block shapes, the matmul way's row blocks)."""
import pytest
import reference
import torch
from op_cases import DTYPES, KEY, activations, implementations

from randmask import MatrixMask, ops
from randmask.kernels import masked_grad as mg

# (out, in, n, tokens): 1xN, Nx1, n = 0, n = N, primes, T = 0, tokens not a multiple of any block, few slots
CASES = [(1, 97, 30, 5), (89, 1, 89, 33), (53, 47, 0, 17), (53, 47, 53 * 47, 17), (64, 48, 300, 0),
         (70, 90, 300, 77), (33, 130, 1, 40), (7, 1000, 20, 40)]
# bigger ones for the compiled implementations: several token chunks, slots grouped by row, a handful of slots
# (the native path without transposes), two transpose tiles wide
BIG_CASES = [(101, 67, 1500, 300), (576, 192, 4000, 130), (300, 200, 10, 50), (30, 1500, 4000, 37)]


def check(g, x, grad_y, shape, n, key=KEY):
    """g against the float64 reference, within the fp32 rounding bound of a T-term sum of fp32 products."""
    assert g.dtype == torch.float32 and g.shape == (n,)
    want = reference.masked_grad(x, grad_y, shape, n, key)
    rows, cols = reference.positions(shape, n, key)
    magnitude = (grad_y.double().t().abs() @ x.double().abs())[rows, cols]
    bound = (x.shape[0] + 2) * 2.0**-24 * magnitude
    assert ((g.double() - want).abs() <= bound).all(), (shape, n, (g.double() - want).abs().max().item())


def run(impl, x, grad_y, shape, n, key=KEY):
    return ops.run("masked_grad", impl, x, grad_y, MatrixMask(shape, n, key))


@pytest.mark.parametrize("layout", ["contiguous", "strided"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("impl", implementations("masked_grad"))
def test_every_implementation_matches_the_reference(impl, dtype, layout):
    for out_features, in_features, n, tokens in CASES:
        x, grad_y = activations((out_features, in_features), tokens, dtype, layout, seed=n + tokens)
        check(run(impl, x, grad_y, (out_features, in_features), n), x, grad_y, (out_features, in_features), n)


@pytest.mark.parametrize("impl", implementations("masked_grad", backends=("torch", "native")))
def test_bigger_shapes(impl):
    for dtype in (torch.float32, torch.bfloat16):
        for out_features, in_features, n, tokens in BIG_CASES:
            x, grad_y = activations((out_features, in_features), tokens, dtype, "strided", seed=n)
            check(run(impl, x, grad_y, (out_features, in_features), n), x, grad_y, (out_features, in_features), n)


@pytest.mark.parametrize("impl", implementations("masked_grad"))
def test_mixed_dtypes(impl):
    x, _ = activations((40, 70), 45, torch.bfloat16)
    _, grad_y = activations((40, 70), 45, torch.float32)
    check(run(impl, x, grad_y, (40, 70), 900), x, grad_y, (40, 70), 900)


@pytest.mark.parametrize("impl", implementations("masked_grad", backends=("torch", "native")))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_every_half_value_is_widened_exactly(impl, dtype):
    # x = every finite half-precision value, grad_y = 1: g[k] = x[0, c_k] exactly
    values = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype)
    x = torch.where(torch.isfinite(values.float()), values, torch.zeros((), dtype=dtype)).reshape(1, -1)
    g = run(impl, x, torch.ones(1, 1, dtype=dtype), (1, x.shape[1]), x.shape[1])
    assert torch.equal(g, x.float()[0, reference.positions((1, x.shape[1]), x.shape[1], KEY)[1]])


# ---------------------------------------------------------------------------------------------------- native
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_native_in_every_isa(isa, dtype):
    for out_features, in_features, n, tokens in CASES + BIG_CASES:
        for layout in ("contiguous", "strided"):
            x, grad_y = activations((out_features, in_features), tokens, dtype, layout, seed=n + tokens)
            check(run("native", x, grad_y, (out_features, in_features), n), x, grad_y,
                  (out_features, in_features), n)


@pytest.mark.parametrize("shape", [(576, 192), (40, 1500)])  # (40, 1500): two transpose tiles wide
def test_native_is_the_same_for_any_thread_count(shape):
    if ops.available_backends("cpu")["native"]:
        pytest.skip(ops.available_backends("cpu")["native"])
    x, grad_y = activations(shape, 300, torch.float32)
    threads = torch.get_num_threads()
    try:
        results = []
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            results.append(run("native", x, grad_y, shape, 20000))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(results[0], r) for r in results[1:])


def test_native_refuses_bad_arguments():
    from randmask.kernels import native

    if ops.available_backends("cpu")["native"]:
        pytest.skip(ops.available_backends("cpu")["native"])
    x, grad_y = torch.randn(4, 3), torch.randn(4, 2)
    with pytest.raises(ValueError, match="n must be in"):
        native.masked_grad_native(x, grad_y, 7, KEY)
    with pytest.raises(ValueError, match="share T"):
        native.masked_grad_native(x, torch.randn(5, 2), 1, KEY)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        native.masked_grad_native(x.double(), grad_y.double(), 1, KEY)
    with pytest.raises(ValueError, match="unsigned 64-bit"):
        native.masked_grad_native(x, grad_y, 1, -1)
    with pytest.raises(ValueError, match="CPU tensors"):
        native.masked_grad_native(x.to("meta"), grad_y.to("meta"), 1, KEY)


# ---------------------------------------------------------------------------------------------------- Triton
triton_ready = pytest.mark.skipif(bool(ops.available_backends("cpu")["triton"]),
                                  reason=ops.available_backends("cpu")["triton"] or "runs")


@triton_ready
@pytest.mark.parametrize("tokens", [300, 1000])
def test_triton_gather_splits_tokens(tokens):
    # few slots over many tokens: the kernel splits the tokens over programs (the last split short), then adds the
    # partial sums in a fixed order; the result must not depend on the split
    x, grad_y = activations((70, 90), tokens, torch.float32, "strided")
    for n in (1, 130):
        assert mg._tokens_per_split(-(-n // mg.GATHER_BLOCK_K), tokens, x.device) < tokens  # this case splits
        check(mg.masked_grad_gather_triton(x, grad_y, n, KEY), x, grad_y, (70, 90), n)


@triton_ready
@pytest.mark.parametrize("block_k,block_t", [(512, 8), (4096, 1)])
def test_triton_gather_block_shapes(monkeypatch, block_k, block_t):
    # wide slot blocks over few tokens (a program's slots sharing token rows), as gpu_check.sh sweeps them
    monkeypatch.setattr(mg, "GATHER_BLOCK_K", block_k)
    monkeypatch.setattr(mg, "GATHER_BLOCK_T", block_t)
    x, grad_y = activations((70, 90), 45, torch.float32, "strided")
    for n in (1, 700):
        check(mg.masked_grad_gather_triton(x, grad_y, n, KEY), x, grad_y, (70, 90), n)


@triton_ready
@pytest.mark.parametrize("block_rows", [pytest.param(1, marks=pytest.mark.full), 16, 69])  # 1: 70 launches
def test_triton_matmul_way_in_row_blocks(monkeypatch, block_rows):
    # blocks of output rows (the last one short): every slot is taken from the block holding its row, exactly once,
    # and no block is bigger than the budget
    x, grad_y = activations((70, 90), 20, torch.float32, "strided")
    monkeypatch.setattr(mg, "TEMP_BYTES", 4 * 90 * block_rows)
    blocks = []
    mm = mg._mm_fp32
    monkeypatch.setattr(mg, "_mm_fp32", lambda a, b: blocks.append(a.shape[0]) or mm(a, b))
    for n in (1, 300, 70 * 90):
        blocks.clear()
        check(mg.masked_grad_matmul_triton(x, grad_y, n, KEY), x, grad_y, (70, 90), n)
        assert max(blocks) == block_rows and sum(blocks) == 70


def test_half_operands_reach_cublas_as_they_are(monkeypatch):
    # on a GPU, fp16/bf16 operands go to cuBLAS with an fp32 result (never rounded to bf16); elsewhere they are upcast.
    # Checked on the CPU by what _mm_fp32 asks torch.mm for.
    calls = []
    mm = torch.mm
    monkeypatch.setattr(torch, "mm", lambda a, b, **kw: calls.append((a.dtype, kw)) or mm(a.float(), b.float()))
    a, b = torch.randn(3, 4).bfloat16(), torch.randn(4, 5).bfloat16()
    assert mg._mm_fp32(a, b).dtype == torch.float32 and calls == [(torch.float32, {})]
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    calls.clear()
    mg._mm_fp32(a, b)
    direct = (torch.bfloat16, {"out_dtype": torch.float32})
    assert calls == ([direct] if mg._MM_FP32_OUT else [(torch.float32, {})])
    # the dense twin too: one such product per block of output rows, whatever the token count
    x, grad_y = activations((70, 90), 77, torch.bfloat16)
    rows, cols = reference.positions((70, 90), 2000, KEY)
    calls.clear()
    g = mg.masked_grad_dense_torch(x, grad_y, rows, cols)
    monkeypatch.undo()
    check(g, x, grad_y, (70, 90), 2000)
    assert calls == ([direct] if mg._MM_FP32_OUT else [])


def test_dense_twin_without_host_syncs(monkeypatch):
    # on a GPU the dense twin picks each block's slots by a mask over all slots (no nonzero(), which waits for the
    # device and cannot be captured in a CUDA graph); forced here on the CPU, with nonzero made to fail
    monkeypatch.setattr(mg, "SYNC_FREE_DEVICES", ("cpu",))
    monkeypatch.setattr(mg, "TEMP_BYTES", 4 * 90 * 16)  # several row blocks
    x, grad_y = activations((70, 90), 30, torch.float32)
    rows, cols = reference.positions((70, 90), 2000, KEY)
    monkeypatch.setattr(torch.Tensor, "nonzero", lambda *a, **k: pytest.fail("nonzero called"))
    g = mg.masked_grad_dense_torch(x, grad_y, rows, cols)
    monkeypatch.undo()
    check(g, x, grad_y, (70, 90), 2000)
