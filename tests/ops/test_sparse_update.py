"""gather_weight (base[k] = weight[r_k, c_k]) and sparse_update (weight[r_k, c_k] = round(base[k] + delta[k]), nothing
else written) on every implementation, bit-exact against the reference; the one-launch sparse_update_many; the
rounding of every half-precision value."""
import math

import pytest
import reference
import torch
from op_cases import DTYPES, KEY, assert_bf16_within_one_ulp, implementations

from randmask import MatrixMask, ops
from randmask.kernels import sparse_update as su

# (shape, n): 1xN, Nx1, n = 0, n = N, primes, a prime-ish matrix, and one over several blocks of 1024 slots
CASES = [((1, 97), 50), ((89, 1), 89), ((53, 47), 0), ((53, 47), 2491), ((70, 90), 7), ((1, 1031), 1031)]
BIG_CASES = [((300, 200), 25000)]


def weight_of(shape, dtype, transposed, seed):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(shape[::-1] if transposed else shape, generator=gen).to(dtype)
    return weight.t() if transposed else weight  # transposed: a GPT-2 Conv1D's (in, out) storage seen as (out, in)


def bits(t):
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32 if t.element_size() == 4 else torch.int64)


def check_update(impl, weight, base, delta):
    want = reference.sparse_update(weight, base, delta, KEY)
    got = weight.clone()
    ops.run("sparse_update", impl, got, base, delta, MatrixMask(tuple(weight.shape), base.numel(), KEY))
    rows, cols = reference.positions(tuple(weight.shape), base.numel(), KEY)
    outside = torch.ones(weight.shape, dtype=torch.bool)
    outside[rows, cols] = False
    assert torch.equal(bits(got[outside]), bits(weight[outside]))  # bitwise: nothing else moved
    if impl == "triton" and weight.dtype == torch.bfloat16:
        assert_bf16_within_one_ulp(got[rows, cols], want[rows, cols])
    else:
        assert torch.equal(bits(got), bits(want))


@pytest.mark.parametrize("transposed", [False, True], ids=["rowmajor", "transposed"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("impl", implementations("gather_weight"))
def test_gather_is_a_bit_copy(impl, dtype, transposed):
    for shape, n in CASES + (BIG_CASES if impl != "triton" else []):
        weight = weight_of(shape, dtype, transposed, n)
        base = ops.run("gather_weight", impl, weight, MatrixMask(shape, n, KEY))
        rows, cols = reference.positions(shape, n, KEY)
        assert base.dtype == dtype and torch.equal(bits(base), bits(weight[rows, cols])), (shape, n)


@pytest.mark.parametrize("transposed", [False, True], ids=["rowmajor", "transposed"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("impl", implementations("sparse_update"))
def test_update_writes_the_rounded_sum_and_nothing_else(impl, dtype, transposed):
    for shape, n in CASES + (BIG_CASES if impl != "triton" else []):
        weight = weight_of(shape, dtype, transposed, n)
        rows, cols = reference.positions(shape, n, KEY)
        gen = torch.Generator().manual_seed(n + 1)
        for base in (weight[rows, cols], torch.randn(n, generator=gen)):  # the weight's dtype, or fp32
            check_update(impl, weight, base, torch.randn(n, generator=gen) * 1e-2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_native_in_every_isa(isa, dtype):
    for shape, n in CASES + BIG_CASES:
        weight = weight_of(shape, dtype, True, n)
        rows, cols = reference.positions(shape, n, KEY)
        base = ops.run("gather_weight", "native", weight, MatrixMask(shape, n, KEY))
        assert torch.equal(bits(base), bits(weight[rows, cols]))
        check_update("native", weight, base, torch.randn(n, generator=torch.Generator().manual_seed(n)))


@pytest.mark.parametrize("impl", implementations("sparse_update", backends=("torch", "native")))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_every_half_value_widens_exactly(impl, dtype):
    # all 65536 bit patterns as base, delta 0, an fp32 weight: float(base) + 0, bit for bit (NaN stays NaN)
    values = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype)
    weight = torch.zeros(1, values.numel())
    got = weight.clone()
    ops.run("sparse_update", impl, got, values, torch.zeros(values.numel()), MatrixMask((1, values.numel()),
                                                                                          values.numel(), KEY))
    want = reference.sparse_update(weight, values, torch.zeros(values.numel()), KEY)
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("impl", implementations("sparse_update", backends=("torch", "native")))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_narrowing_rounds_to_nearest_even(impl, dtype):
    # fp32 values all over the exponent range, plus ties, overflow and subnormal edges: weight = round(0 + delta)
    gen = torch.Generator().manual_seed(7)
    patterns = torch.randint(-(2**31), 2**31 - 1, (1 << 16,), generator=gen, dtype=torch.int64).to(torch.int32)
    edges = torch.tensor([65504.0, 65519.99, 65520.0, 1e9, -1e9, 2.0**-24, 2.0**-25, 3 * 2.0**-26, 3 * 2.0**-25,
                          1 + 2.0**-11, 1 + 3 * 2.0**-11, 1 + 2.0**-8, 1 + 3 * 2.0**-8, 3.3895e38, float("inf"),
                          -float("inf"), 0.0, -0.0, 2.0**-126, 2.0**-149])
    delta = torch.cat([patterns.view(torch.float32), edges])
    delta = torch.where(torch.isnan(delta), torch.zeros(()), delta)  # NaN payloads: torch's own paths disagree
    side = math.isqrt(delta.numel()) + 1
    weight = torch.zeros(side, side, dtype=dtype)
    check_update(impl, weight, torch.zeros(delta.numel()), delta)


@pytest.mark.parametrize("impl", implementations("sparse_update"))
def test_nan_stays_nan(impl):
    weight = torch.zeros(4, 4, dtype=torch.bfloat16)
    mask = MatrixMask((4, 4), 16, KEY)
    ops.run("sparse_update", impl, weight, torch.zeros(16), torch.full((16,), float("nan")), mask)
    assert torch.isnan(weight.float()).all()


def test_native_refuses_bad_arguments():
    from randmask.kernels import native

    if ops.available_backends("cpu")["native"]:
        pytest.skip(ops.available_backends("cpu")["native"])
    with pytest.raises(ValueError, match="1-D of one length"):
        native.sparse_update_native(torch.zeros(3, 3), torch.zeros(2), torch.zeros(3), KEY)
    with pytest.raises(ValueError, match="n must be in"):
        native.sparse_update_native(torch.zeros(3, 3), torch.zeros(10), torch.zeros(10), KEY)
    with pytest.raises(ValueError, match="unsigned 64-bit"):
        native.gather_weight_native(torch.zeros(3, 3), 2, -1)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        native.gather_weight_native(torch.zeros(3, 3, dtype=torch.float64), 2, KEY)


# ---------------------------------------------------------------------------------------------------- many at once
def matrices(dtype, gen):
    """(weight, base, delta, key) of several matrices: different shapes and n (a 1-row matrix, a transposed view
    over two programs, n = 0) and keys whose 32-bit halves are small and >= 2^31."""
    out = []
    for shape, n, transposed, key in (((1, 1031), 700, False, 3 << 32 | 5), ((40, 61), 1500, True, KEY),
                                      ((5, 7), 0, False, KEY), ((9, 13), 20, False, 2**64 - 1)):
        weight = weight_of(shape, dtype, transposed, n)
        rows, cols = reference.positions(shape, n, key)
        out.append((weight, weight[rows, cols], torch.randn(n, generator=gen), key))
    return out


@pytest.mark.parametrize("impl", implementations("sparse_update_many"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_many_equals_one_update_each(impl, dtype):
    batch = matrices(dtype, torch.Generator().manual_seed(8))
    got = [(w.clone(), b, d, MatrixMask(tuple(w.shape), d.numel(), k)) for w, b, d, k in batch]
    ops.run("sparse_update_many", impl, got)
    for (weight, base, delta, key), (result, *_) in zip(batch, got):
        want = reference.sparse_update(weight, base, delta, key)
        if impl == "triton" and dtype == torch.bfloat16:
            assert_bf16_within_one_ulp(result, want)
        else:
            assert torch.equal(result, want)


@pytest.mark.skipif(bool(ops.available_backends("cpu")["triton"]), reason=ops.available_backends("cpu")["triton"])
def test_one_launch_is_bitwise_one_launch_each_and_refuses_bad_batches():
    gen = torch.Generator().manual_seed(8)
    for dtype in (torch.float32, torch.bfloat16):
        batch = matrices(dtype, gen)
        ours = [(w.clone(), b, d, k) for w, b, d, k in batch]
        su.sparse_update_multi_triton(ours)
        for (weight, base, delta, key), (result, *_) in zip(batch, ours):
            single = weight.clone()
            su.sparse_update_triton(single, base, delta, key)
            assert torch.equal(result, single)
    fp32, bf16 = matrices(torch.float32, gen)[0], matrices(torch.bfloat16, gen)[1]
    with pytest.raises(ValueError, match="one dtype and device"):
        su.sparse_update_multi_triton([fp32, bf16])
    with pytest.raises(ValueError, match="fp32 deltas"):
        su.sparse_update_multi_triton([(fp32[0], fp32[1], fp32[2].double(), fp32[3])])
    with pytest.raises(ValueError, match="1-D base and delta of one length"):
        su.sparse_update_multi_triton([(fp32[0], fp32[1], fp32[2][:-1], fp32[3])])


@pytest.mark.skipif(bool(ops.available_backends("cpu")["triton"]), reason=ops.available_backends("cpu")["triton"])
def test_gather_rows_takes_the_slots_of_its_block():
    # a block of rows [row_begin, row_begin + rows) of a (70, 90) matrix (the matmul way's blocks of grad_y^T x):
    # the slots whose row it holds get their value (cast to base's dtype); every other entry of base keeps its value
    weight = torch.randn(70, 90, generator=torch.Generator().manual_seed(5))
    n = 2000
    rows, cols = reference.positions((70, 90), n, KEY)
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
