"""Fixtures of the op tests: the native library's vector-loop versions."""
import pytest

from randmask.kernels import native

ISAS = ("avx512f", "avx2", "portable")


@pytest.fixture(params=ISAS)
def isa(request):
    """Each vector-loop version of the native library this CPU can run, selected for the test."""
    lib, reason = native.status()
    if lib is None:
        pytest.skip(reason)
    if lib.randmask_cpu_select_isa(request.param.encode()) != 0:
        pytest.skip(f"this CPU cannot run the {request.param} loops")
    yield request.param
    assert lib.randmask_cpu_select_isa(b"best") == 0
