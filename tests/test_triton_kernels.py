"""The Triton kernels, run by the interpreter (TRITON_INTERPRET=1, set in conftest.py) on CPU tensors, against the
committed mask-scheme-1 vectors and the torch twins. The interpreter costs ~15-50 ms per program instance here, so
every grid is a few programs."""
import json
import os
import pathlib
from collections import defaultdict

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from randmask.kernels import masked_grad as mg  # noqa: E402
from randmask.kernels import sparse_update as su  # noqa: E402
from randmask.kernels.mask_addressing import (  # noqa: E402
    feistel_radices, flat_to_slot_torch, slot_to_flat, slot_to_flat_torch, split_key)
from randmask.kernels.positions import mask_positions_triton, mask_slots_triton  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="runs the Triton kernels on CPU tensors: needs TRITON_INTERPRET=1")

VECTORS = pathlib.Path(__file__).parent / "vectors" / "mask_scheme1.txt"
RESULTS = pathlib.Path(__file__).parent.parent / "benchmarks" / "results"
KEY = 0x0123456789ABCDEF
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _slot_to_flat_kernel(slots_ptr, flat_ptr, count, numel, a_radix, b_radix, k0, k1, BLOCK: tl.constexpr):
    # flat[i] = sigma(slots[i]): the device function on arbitrary slots (the launchers only enumerate 0..n-1)
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    flat = slot_to_flat(tl.load(slots_ptr + i, mask=i < count, other=0), numel, a_radix, b_radix, k0, k1)
    tl.store(flat_ptr + i, flat, mask=i < count)


def _vector_groups():
    groups = defaultdict(list)
    for line in VECTORS.read_text().splitlines():
        if line and not line.startswith("#"):
            out_features, in_features, key, slot, row, col = map(int, line.split())
            groups[(out_features, in_features, key)].append((slot, row, col))
    return groups


def _positions_torch(shape, n, key):
    flat = slot_to_flat_torch(torch.arange(n), shape[0] * shape[1], key)
    return flat // shape[1], flat % shape[1]


# ---------------------------------------------------------------- addressing
def test_committed_vectors_both_directions():
    groups = _vector_groups()
    assert len(groups) == 70  # 14 shapes x 5 keys
    for (out_features, in_features, key), entries in groups.items():
        slots, rows, cols = torch.tensor(entries).T.contiguous()
        numel = out_features * in_features
        flat = torch.empty_like(slots)
        _slot_to_flat_kernel[(1,)](slots, flat, len(slots), numel, *feistel_radices(numel), *split_key(key),
                                   BLOCK=32)
        where = f"{out_features}x{in_features} key {key}"
        assert torch.equal(flat // in_features, rows) and torch.equal(flat % in_features, cols), where
        # inverse through the launcher; with n = median slot, every slot >= n must come back as -1
        n = int(slots.median())
        expected = torch.where(slots < n, slots, -1)
        assert torch.equal(mask_slots_triton(rows, cols, out_features, in_features, n, key), expected), where


@pytest.mark.parametrize("shape", [(1, 1), (2, 3), (1, 1031), (1031, 1), (97, 89), (64, 64)])
def test_positions_and_slots_match_twin(shape):
    numel = shape[0] * shape[1]
    rows_all = torch.arange(numel) // shape[1]
    cols_all = torch.arange(numel) % shape[1]
    for n in sorted({0, 1, numel // 3, numel}):
        rows, cols = mask_positions_triton(*shape, n, KEY, "cpu")
        ref_rows, ref_cols = _positions_torch(shape, n, KEY)
        assert rows.dtype == torch.int64 and torch.equal(rows, ref_rows) and torch.equal(cols, ref_cols), (shape, n)
        # every position of the matrix, laid out (in, out) and transposed: a non-contiguous 2-D query
        slots = mask_slots_triton(rows_all.view(shape).T, cols_all.view(shape).T, *shape, n, KEY)
        ref = flat_to_slot_torch(torch.arange(numel), numel, KEY)
        assert torch.equal(slots, torch.where(ref < n, ref, -1).view(shape).T), (shape, n)
        assert torch.equal(slots.T.reshape(-1)[rows * shape[1] + cols], torch.arange(n))


def test_public_api_dispatches_to_triton(monkeypatch):
    from randmask.addressing import mask_positions, mask_slots

    shape, n, key = (97, 89), 700, 2**64 - 1
    every = torch.arange(shape[0] * shape[1])
    monkeypatch.setenv("RANDMASK_BACKEND", "torch")
    ref_rows, ref_cols = mask_positions(shape, n, key)
    ref_slots = mask_slots(every // shape[1], every % shape[1], shape, n, key)
    monkeypatch.setenv("RANDMASK_BACKEND", "triton")
    rows, cols = mask_positions(shape, n, key)
    assert torch.equal(rows, ref_rows) and torch.equal(cols, ref_cols)
    assert torch.equal(mask_slots(every // shape[1], every % shape[1], shape, n, key), ref_slots)


# ---------------------------------------------------------------- masked gradient
def _activations(shape, tokens, dtype, contiguous):
    """x (T, in) and grad_y (T, out); non-contiguous: x a transposed (in, T) buffer, grad_y every other column."""
    gen = torch.Generator().manual_seed(7)
    out_features, in_features = shape
    if contiguous:
        return (torch.randn(tokens, in_features, generator=gen).to(dtype),
                torch.randn(tokens, out_features, generator=gen).to(dtype))
    return (torch.randn(in_features, tokens, generator=gen).to(dtype).T,
            torch.randn(tokens, 2 * out_features, generator=gen).to(dtype)[:, ::2])


# T = 77 and 40 are not multiples of the gather's token block (32).
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,tokens,contiguous", [((70, 90), 77, False), ((33, 130), 40, True)])
@pytest.mark.parametrize("launcher", [mg.masked_grad_gather_triton, mg.masked_grad_matmul_triton],
                         ids=["gather", "matmul"])
def test_masked_grad_matches_twin(launcher, shape, tokens, contiguous, dtype):
    x, grad_y = _activations(shape, tokens, dtype, contiguous)
    assert x.is_contiguous() == contiguous and grad_y.is_contiguous() == contiguous
    numel = shape[0] * shape[1]
    # the matmul way costs the same at any n; the gather kernel's grid grows with n, so it gets smaller counts
    counts = (0, 1, numel // 3, numel) if launcher is mg.masked_grad_matmul_triton else (0, 1, 300)
    for n in counts:
        rows, cols = _positions_torch(shape, n, KEY)
        got = launcher(x, grad_y, n, KEY)
        assert got.dtype == torch.float32 and got.shape == (n,)
        # same fp32 products, another summation order
        torch.testing.assert_close(got, mg.masked_grad_gather_torch(x, grad_y, rows, cols), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("tokens", [300, 1000])
def test_masked_grad_gather_token_split(tokens):
    # few slots over many tokens: the gather kernel splits the tokens over programs (the last split short), then
    # adds the partial sums; the result must not depend on the split
    x, grad_y = _activations((70, 90), tokens, torch.float32, False)
    for n in (1, 130):
        blocks = -(-n // mg.GATHER_BLOCK_K)
        assert mg._tokens_per_split(blocks, tokens, x.device) < tokens  # this case does split
        rows, cols = _positions_torch((70, 90), n, KEY)
        torch.testing.assert_close(mg.masked_grad_gather_triton(x, grad_y, n, KEY),
                                   mg.masked_grad_gather_torch(x, grad_y, rows, cols), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("block_k,block_t", [(512, 8), (4096, 1)])
def test_masked_grad_gather_block_shapes(monkeypatch, block_k, block_t):
    # the wide block shapes gpu_check.sh sweeps (a program's slots sharing few token rows) give the twin's result
    monkeypatch.setattr(mg, "GATHER_BLOCK_K", block_k)
    monkeypatch.setattr(mg, "GATHER_BLOCK_T", block_t)
    x, grad_y = _activations((70, 90), 45, torch.float32, False)
    for n in (1, 700):
        rows, cols = _positions_torch((70, 90), n, KEY)
        torch.testing.assert_close(mg.masked_grad_gather_triton(x, grad_y, n, KEY),
                                   mg.masked_grad_gather_torch(x, grad_y, rows, cols), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("block_rows", [1, 16, 69])
def test_masked_grad_matmul_row_blocks(monkeypatch, block_rows):
    # the matmul way in blocks of output rows (the last one short): every slot is taken from the block holding its
    # row, exactly once, and no block is bigger than the budget
    x, grad_y = _activations((70, 90), 20, torch.float32, False)
    monkeypatch.setattr(mg, "TEMP_BYTES", 4 * 90 * block_rows)
    blocks = []
    mm = mg._mm_fp32
    monkeypatch.setattr(mg, "_mm_fp32", lambda a, b: blocks.append(a.shape[0]) or mm(a, b))
    for n in (1, 300, 70 * 90):
        blocks.clear()
        rows, cols = _positions_torch((70, 90), n, KEY)
        torch.testing.assert_close(mg.masked_grad_matmul_triton(x, grad_y, n, KEY),
                                   mg.masked_grad_gather_torch(x, grad_y, rows, cols), rtol=1e-5, atol=1e-5)
        assert max(blocks) == block_rows and sum(blocks) == 70


@pytest.mark.parametrize("launcher", [mg.masked_grad_gather_triton, mg.masked_grad_matmul_triton,
                                      mg.masked_grad_triton])
def test_masked_grad_no_tokens(launcher):
    x, grad_y = torch.empty(0, 9), torch.empty(0, 5)
    assert torch.equal(launcher(x, grad_y, 20, KEY), torch.zeros(20))


@pytest.mark.parametrize("way", ["gather", "matmul"])
def test_masked_grad_dispatch_ways(monkeypatch, way):
    # the dispatcher runs the way the cost model names, and that way gives the twin's result
    launched = []
    for name in ("gather", "matmul"):
        launcher = getattr(mg, f"masked_grad_{name}_triton")
        monkeypatch.setattr(mg, f"masked_grad_{name}_triton",
                            lambda *args, name=name, launcher=launcher: launched.append(name) or launcher(*args))
    monkeypatch.setattr(mg, "masked_grad_way_gpu", lambda *shape: way)
    x, grad_y = _activations((20, 50), 40, torch.float32, False)
    rows, cols = _positions_torch((20, 50), 300, KEY)
    torch.testing.assert_close(mg.masked_grad_triton(x, grad_y, 300, KEY),
                               mg.masked_grad_gather_torch(x, grad_y, rows, cols), rtol=1e-5, atol=1e-5)
    assert launched == [way]


def test_masked_grad_dispatcher_asks_the_cost_model(monkeypatch):
    asked = []
    way = mg.masked_grad_way_gpu
    monkeypatch.setattr(mg, "masked_grad_way_gpu", lambda *a: asked.append(a) or way(*a))
    for dtype, half in ((torch.float32, False), (torch.bfloat16, True)):
        asked.clear()
        x, grad_y = _activations((20, 50), 8, dtype, True)
        mg.masked_grad_triton(x, grad_y, 30, KEY)
        assert asked == [(30, 8, 20, 50, half)]  # (n, tokens, out, in, half-precision operands)


def test_gpu_cost_model_slows_the_matmul_for_fp32():
    # fp32 operands make cuBLAS's matmul ~15x slower (TF32 off, torch's default), ~2x with TF32: the crossover moves
    # to a higher density; at 1e-3 of a 4096x4096 layer over 8192 tokens the half matmul wins, the fp32 one not
    n = round(1e-3 * 4096 * 4096)
    assert mg.masked_grad_way_gpu(n, 8192, 4096, 4096) == "matmul"
    allow_tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        assert mg.masked_grad_way_gpu(n, 8192, 4096, 4096, half=False) == "gather"
        torch.backends.cuda.matmul.allow_tf32 = True
        assert mg.masked_grad_way_gpu(n, 8192, 4096, 4096, half=False) == "matmul"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32


def test_matmul_way_keeps_fp32_products_of_half_inputs(monkeypatch):
    # on a GPU, fp16/bf16 operands reach cuBLAS as they are with an fp32 result (never rounded to bf16); elsewhere
    # they are upcast. Checked on the CPU by what _mm_fp32 asks torch.mm for.
    calls = []
    mm = torch.mm
    monkeypatch.setattr(torch, "mm", lambda a, b, **kw: calls.append((a.dtype, kw)) or mm(a.float(), b.float()))
    a, b = torch.randn(3, 4).bfloat16(), torch.randn(4, 5).bfloat16()
    assert mg._mm_fp32(a, b).dtype == torch.float32 and calls == [(torch.float32, {})]
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    calls.clear()
    mg._mm_fp32(a, b)
    direct = (torch.bfloat16, {"out_dtype": torch.float32})
    assert calls == [direct] if mg._MM_FP32_OUT else [(torch.float32, {})]
    # the dense twin too: one such product per block of output rows, whatever the token count
    x, grad_y = _activations((70, 90), 77, torch.bfloat16, True)
    rows, cols = _positions_torch((70, 90), 2000, KEY)
    calls.clear()
    torch.testing.assert_close(mg.masked_grad_dense_torch(x, grad_y, rows, cols),
                               mg.masked_grad_gather_torch(x, grad_y, rows, cols), rtol=1e-5, atol=1e-4)
    assert calls == [direct] if mg._MM_FP32_OUT else calls == []


@pytest.mark.parametrize("table", ["masked_grad_cuda_bfloat16.json", "masked_grad_cuda_bfloat16_T8192.json"])
def test_gpu_cost_model_picks_the_measured_fastest_way(table):
    # the stored GPU tables (benchmarks/bench_masked_grad.py, a column per way): in every row, the way the cost model
    # picks measured within 10% of the faster of the two. The matmul way's own column (triton-matmul) is read where
    # the table has it; tables from before it existed have its nearest twin, matmul-gather (the same cuBLAS matmul
    # with a bf16 result, then a torch gather).
    data = json.loads((RESULTS / table).read_text())
    tokens = data["args"]["tokens"]
    rows = [(shape, row) for shape, shape_rows in data["shapes"].items() for row in shape_rows]
    assert len(rows) >= 5
    for shape, row in rows:
        column = {"gather": "triton-gather",
                  "matmul": "triton-matmul" if "triton-matmul" in row["ms"] else "matmul-gather"}
        out_features, in_features = map(int, shape.split("x"))
        way = mg.masked_grad_way_gpu(row["n"], tokens, out_features, in_features)
        fastest = min(row["ms"][name] for name in column.values())
        assert row["ms"][column[way]] <= 1.10 * fastest, (shape, tokens, row["density"], way, row["ms"])


# ---------------------------------------------------------------- sparse weight access
def _assert_bf16_within_one_ulp(got, ref):
    # The interpreter turns fp32 into bf16 by dropping the low 16 bits (truncation); a GPU and torch round to nearest
    # even. Same sign, so the bit patterns of the two results differ by at most one.
    assert ((got.view(torch.int16).int() - ref.view(torch.int16).int()).abs() <= 1).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(70, 90), (1, 1031)])
def test_gather_and_update_match_twins(shape, dtype):
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(shape[1], shape[0], generator=gen).to(dtype).T  # non-contiguous (out, in)
    numel = shape[0] * shape[1]
    for n in (0, 7, numel // 2, numel):
        rows, cols = _positions_torch(shape, n, KEY)
        base = su.gather_weight_triton(weight, n, KEY)
        assert base.dtype == dtype and torch.equal(base, su.gather_weight_torch(weight, rows, cols))
        delta = torch.randn(n, generator=gen) * 0.1
        got, ref = weight.clone(), weight.clone()
        assert su.sparse_update_triton(got, base, delta, KEY) is got
        su.sparse_update_torch(ref, base, delta, rows, cols)
        untouched = torch.ones(shape, dtype=torch.bool)
        untouched[rows, cols] = False
        assert torch.equal(got[untouched], weight[untouched])  # bitwise: only the n masked entries move
        if dtype == torch.bfloat16:
            _assert_bf16_within_one_ulp(got[rows, cols], ref[rows, cols])
        else:
            assert torch.equal(got, ref)


def test_gather_rows_takes_the_slots_of_its_block():
    # a block of rows [row_begin, row_begin + rows) of a (70, 90) matrix: the slots whose row it holds get their
    # value (cast to base's dtype), every other entry of base keeps what it had
    gen = torch.Generator().manual_seed(5)
    weight = torch.randn(70, 90, generator=gen)
    n = 2000
    rows, cols = _positions_torch((70, 90), n, KEY)
    for row_begin, block_rows in ((0, 70), (0, 1), (13, 20), (69, 1)):
        base = torch.full((n,), -7.0, dtype=torch.float64)
        su.gather_rows_triton(weight[row_begin:row_begin + block_rows], base, n, KEY, (70, 90), row_begin)
        held = (rows >= row_begin) & (rows < row_begin + block_rows)
        assert torch.equal(base[held], weight[rows[held], cols[held]].double())
        assert (base[~held] == -7.0).all()
    with pytest.raises(ValueError, match="not a block of rows"):
        su.gather_rows_triton(weight[60:], torch.zeros(n), n, KEY, (70, 90), 61)
    with pytest.raises(ValueError, match="base must be contiguous"):
        su.gather_rows_triton(weight, torch.zeros(n + 1), n, KEY, (70, 90), 0)


def test_gpu_check_script_smoke():
    # benchmarks/check_triton_gpu.py (what gpu_check.sh runs on a GPU) at tiny sizes under the interpreter: the
    # script itself works and its checks pass
    import os
    import pathlib
    import subprocess
    import sys

    script = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "check_triton_gpu.py"
    out = subprocess.run([sys.executable, str(script), "--smoke"], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "TRITON_INTERPRET": "1"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "all Triton kernels agree with their torch twins" in out.stdout
