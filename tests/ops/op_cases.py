"""Shared by the op tests: every implementation of an op as a test parameter, inputs, comparisons.

An implementation whose backend cannot run here is still listed, skipped with the reason (triton needs
TRITON_INTERPRET=1, set by tests/conftest.py; native needs the library, built by `pip install -e .` or pointed to by
$RANDMASK_NATIVE_LIB, which ctest sets to the library it just built)."""
import pytest
import torch

from randmask import ops

KEY = 0x0123456789ABCDEF
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def implementations(op, *, backends=None):
    """pytest params, one per implementation of `op` (of `backends`, if given), skipped where it cannot run."""
    reasons = ops.available_backends("cpu")
    return [pytest.param(name, id=name, marks=pytest.mark.skipif(bool(reasons[impl.backend]),
                                                                  reason=reasons[impl.backend] or "runs"))
            for name, impl in ops.IMPLEMENTATIONS[op].items() if backends is None or impl.backend in backends]


def activations(shape, tokens, dtype, layout="contiguous", seed=7):
    """x (T, in) and grad_y (T, out); "strided": x a transposed (in, T) buffer, grad_y every other column."""
    gen = torch.Generator().manual_seed(seed)
    out_features, in_features = shape
    if layout == "contiguous":
        return (torch.randn(tokens, in_features, generator=gen).to(dtype),
                torch.randn(tokens, out_features, generator=gen).to(dtype))
    return (torch.randn(in_features, tokens, generator=gen).to(dtype).t(),
            torch.randn(tokens, 2 * out_features, generator=gen).to(dtype)[:, ::2])


def assert_bf16_within_one_ulp(got, want):
    """The Triton interpreter narrows fp32 to bf16 by dropping the low 16 bits (truncation) where a GPU and torch round
    to nearest even: the same sign, so the two bit patterns differ by at most one."""
    assert ((got.view(torch.int16).int() - want.view(torch.int16).int()).abs() <= 1).all()
