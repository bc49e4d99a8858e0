"""sparse_add (out[t, r_k] += delta[k] x[t, c_k]) and sparse_add_t (out[t, c_k] += delta[k] grad_y[t, r_k]) on every
implementation, against the float64 dense reference out + x S(delta)^T; bitwise the same from run to run and across
thread counts; nothing outside the touched columns moves."""
import pytest
import reference
import torch
from op_cases import DTYPES, KEY, assert_bf16_within_one_ulp, implementations

from randmask import MatrixMask, ops

# (shape, n): 1xN, Nx1, n = 0, n = N (every entry), primes, more slots than one row or column holds
CASES = [((1, 97), 50), ((89, 1), 89), ((53, 47), 0), ((13, 11), 143), ((70, 90), 7), ((61, 67), 1200)]
TOKENS = (1, 5, 37)
OPS = ("sparse_add", "sparse_add_t")


def inputs(op, shape, n, tokens, dtype, seed, strided=False):
    gen = torch.Generator().manual_seed(seed)
    out_features, in_features = shape
    dst, src = (out_features, in_features) if op == "sparse_add" else (in_features, out_features)
    out = torch.randn(tokens, dst, generator=gen).to(dtype)
    out[:, ::3] = -0.0  # a -0.0 where no slot reaches must keep its sign
    x = torch.randn(tokens, 2 * src if strided else src, generator=gen).to(dtype)
    delta = torch.randn(n, generator=gen) * 0.5
    return out, (x[:, ::2] if strided else x), delta


def check_against_reference(op, got, before, src, delta, shape):
    want = reference.sparse_add(before, src, delta, shape, KEY, transpose=op == "sparse_add_t")
    rows, cols = reference.positions(shape, delta.numel(), KEY)
    touched = (cols if op == "sparse_add_t" else rows).unique()
    untouched = torch.ones(got.shape[1], dtype=torch.bool)
    untouched[touched] = False
    bits = torch.int16 if got.element_size() == 2 else torch.int32 if got.element_size() == 4 else torch.int64
    assert torch.equal(got[:, untouched].view(bits), before[:, untouched].view(bits))  # unreached columns: same bits
    # one rounding to the output's dtype, plus fp32 accumulation over the terms of each element
    dense = torch.zeros(shape, dtype=torch.float64)
    dense[rows, cols] = delta.double().abs()
    magnitude = before.double().abs() + src.double().abs() @ (dense if op == "sparse_add_t" else dense.t())
    eps = torch.finfo(got.dtype).eps
    assert ((got.double() - want).abs() <= eps * want.abs() + 1e-6 * magnitude + 1e-30).all()


@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("impl", implementations("sparse_add"))
def test_matches_the_dense_float64_reference(impl, op, dtype, strided):
    for shape, n in CASES:
        for tokens in TOKENS if impl != "triton" else TOKENS[1:2]:  # interpreted: token blocks are tested below
            out, src, delta = inputs(op, shape, n, tokens, dtype, seed=n + tokens, strided=strided)
            got = out.clone()
            ops.run(op, impl, got, src, delta, MatrixMask(shape, n, KEY))
            check_against_reference(op, got, out, src, delta, shape)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("impl", implementations("sparse_add"))
def test_bitwise_the_same_on_every_run(impl, op):
    shape, n = (61, 67), 1200
    out, src, delta = inputs(op, shape, n, 37, torch.float32, seed=3)
    first, second = out.clone(), out.clone()
    ops.run(op, impl, first, src, delta, MatrixMask(shape, n, KEY))
    ops.run(op, impl, second, src, delta, MatrixMask(shape, n, KEY))
    assert torch.equal(first, second)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("impl", implementations("sparse_add", backends=("torch", "native")))
def test_bitwise_the_same_on_every_thread_count(impl, op):
    shape, n = (300, 200), 9000
    out, src, delta = inputs(op, shape, n, 129, torch.float32, seed=4)
    results = []
    threads = torch.get_num_threads()
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            got = out.clone()
            ops.run(op, impl, got, src, delta, MatrixMask(shape, n, KEY))
            results.append(got)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(results[0], r) for r in results[1:])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", OPS)
def test_native_in_every_isa(isa, op, dtype):
    for shape, n in CASES + [((300, 200), 9000)]:
        out, src, delta = inputs(op, shape, n, 37, dtype, seed=n)
        got = out.clone()
        ops.run(op, "native", got, src, delta, MatrixMask(shape, n, KEY))
        check_against_reference(op, got, out, src, delta, shape)


@pytest.mark.parametrize("op", OPS)
def test_the_dispatched_op_is_the_selected_implementation(op):
    shape, n = (61, 67), 1200
    out, src, delta = inputs(op, shape, n, 9, torch.float32, seed=5)
    mask = MatrixMask(shape, n, KEY)
    got, want = out.clone(), out.clone()
    getattr(ops, op)(got, src, delta, mask)
    # a CPU tensor's default: the native library when it is built (fp32 is among its dtypes), else the torch twin
    name = "native" if not ops.available_backends("cpu")["native"] else "torch"
    assert ops.select(op, "cpu", (out.dtype, src.dtype)) == name
    ops.run(op, name, want, src, delta, mask)
    assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", DTYPES + (torch.float64,), ids=str)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("impl", implementations("sparse_add", backends=("triton",)))
def test_triton_is_the_twin_bitwise_over_token_blocks(impl, op, dtype):
    """The same sums in the same order as the torch twin: bitwise its result over more tokens than one program holds,
    for a transposed out and a strided src (bf16: within one ulp, the interpreter narrows by truncation)."""
    for shape, n, tokens in [((61, 67), 300, 150), ((1, 97), 97, 129), ((300, 7), 2000, 3)]:
        before, src, delta = inputs(op, shape, n, tokens, dtype, seed=n, strided=True)
        before = before.t().contiguous().t()  # (T, dst) with the tokens contiguous
        got, want = before.clone(), before.clone()
        mask = MatrixMask(shape, n, KEY)
        ops.run(op, impl, got, src, delta, mask)
        ops.run(op, "torch", want, src, delta, mask)
        if dtype == torch.bfloat16:
            assert_bf16_within_one_ulp(got, want)
        else:
            assert torch.equal(got, want)
