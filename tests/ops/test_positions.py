"""positions (slot -> (row, col)) and slots ((row, col) -> slot) on every backend, against the committed vectors of
mask scheme 1 and the pure-Python reference (tests/ops/reference.py, written from the specification)."""
import pytest
import reference
import torch
from op_cases import KEY, implementations

import randmask
from randmask import ops
from randmask.kernels.mask_addressing import feistel_radices, slot_to_flat_torch, split_key

SHAPES = [(1, 1), (2, 3), (1, 1031), (1031, 1), (97, 89), (64, 64)]


@pytest.mark.parametrize("impl", implementations("positions"))
def test_positions_reproduce_the_committed_vectors(impl):
    for (out_features, in_features, key), entries in reference.vectors().items():
        slot, row, col = torch.tensor(entries).T
        if slot.max() >= 10**4:  # whole prefixes of small matrices; the big ones' listed slots are checked below
            continue
        rows, cols = ops.run("positions", impl, (out_features, in_features), int(slot.max()) + 1, key, "cpu")
        assert torch.equal(rows[slot], row) and torch.equal(cols[slot], col), (out_features, in_features, key)


if ops.HAS_TRITON:
    import triton
    import triton.language as tl

    from randmask.kernels.mask_addressing import slot_to_flat

    @triton.jit
    def slot_to_flat_kernel(slots_ptr, flat_ptr, count, numel, a_radix, b_radix, k0, k1, BLOCK: tl.constexpr):
        # flat[i] = sigma(slots[i]): the device function on arbitrary slots (the launchers enumerate 0..n-1 only)
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        flat = slot_to_flat(tl.load(slots_ptr + i, mask=i < count, other=0), numel, a_radix, b_radix, k0, k1)
        tl.store(flat_ptr + i, flat, mask=i < count)


def test_twin_and_triton_device_function_on_the_listed_slots_of_every_shape():
    # matrices of up to 2^31 entries: sigma of the listed slots alone
    if ops.available_backends("cpu")["triton"]:
        pytest.skip(ops.available_backends("cpu")["triton"])
    groups = reference.vectors()
    assert len(groups) == 70  # 14 shapes x 5 keys
    for (out_features, in_features, key), entries in groups.items():
        slot, row, col = torch.tensor(entries).T.contiguous()
        numel = out_features * in_features
        assert torch.equal(slot_to_flat_torch(slot, numel, key), row * in_features + col)
        flat = torch.empty_like(slot)
        slot_to_flat_kernel[(1,)](slot, flat, len(slot), numel, *feistel_radices(numel), *split_key(key), BLOCK=32)
        assert torch.equal(flat, row * in_features + col), (out_features, in_features, key)


@pytest.mark.parametrize("impl", implementations("slots"))
def test_slots_reproduce_the_committed_vectors(impl):
    for (out_features, in_features, key), entries in reference.vectors().items():
        slot, row, col = torch.tensor(entries).T.contiguous()
        shape = (out_features, in_features)
        assert torch.equal(ops.run("slots", impl, row, col, shape, out_features * in_features, key), slot)
        n = int(slot.median())  # slots >= n are not trainable: -1
        assert torch.equal(ops.run("slots", impl, row, col, shape, n, key), torch.where(slot < n, slot, -1))


@pytest.mark.parametrize("impl", implementations("positions"))
@pytest.mark.parametrize("shape", SHAPES)
def test_positions_match_the_reference(impl, shape):
    numel = shape[0] * shape[1]
    for n in sorted({0, 1, numel // 3, numel}):
        rows, cols = ops.run("positions", impl, shape, n, KEY, "cpu")
        want_rows, want_cols = reference.positions(shape, n, KEY)
        assert rows.dtype == cols.dtype == torch.int64 and rows.shape == (n,)
        assert torch.equal(rows, want_rows) and torch.equal(cols, want_cols), (shape, n)


@pytest.mark.parametrize("impl", implementations("slots"))
@pytest.mark.parametrize("shape", SHAPES)
def test_slots_match_the_reference(impl, shape):
    numel = shape[0] * shape[1]
    every = torch.arange(numel)
    # every position, laid out (in, out) and transposed: a non-contiguous 2-D query
    rows, cols = (every // shape[1]).view(shape).t(), (every % shape[1]).view(shape).t()
    for n in sorted({0, 1, numel // 3, numel}):
        got = ops.run("slots", impl, rows, cols, shape, n, KEY)
        assert got.shape == rows.shape and torch.equal(got, reference.slots(rows, cols, shape, n, KEY)), (shape, n)


@pytest.mark.parametrize("shape", [(1, 97), (97, 1), (53, 47), (193, 61), (7, 1000), (1, 4099)])
def test_native_positions_in_every_isa(isa, shape):
    numel = shape[0] * shape[1]
    for n in sorted({1, numel // 3, numel}):
        assert all(torch.equal(a, b) for a, b in zip(ops.run("positions", "native", shape, n, KEY, "cpu"),
                                                      reference.positions(shape, n, KEY))), (shape, n)


@pytest.mark.parametrize("backend", ["torch", "triton", "native"])
def test_public_functions_run_each_backend(backend):
    reason = ops.available_backends("cpu")[backend]
    if reason:
        pytest.skip(reason)
    shape, n, key = (97, 89), 700, 2**64 - 1
    every = torch.arange(shape[0] * shape[1])
    calls = []
    table = ops.IMPLEMENTATIONS
    with pytest.MonkeyPatch.context() as patch:
        for op in ("positions", "slots"):
            for name, impl in table[op].items():
                patch.setitem(table[op], name, ops.Impl(impl.backend, lambda *a, _fn=impl.fn, _n=name: calls.append(
                    _n) or _fn(*a), impl.takes))
        with randmask.use_backend(backend):
            rows, cols = randmask.mask_positions(shape, n, key)
            slots = randmask.mask_slots(every // shape[1], every % shape[1], shape, n, key)
    assert calls == [backend, "torch" if backend == "native" else backend]  # native has no slots: its twin runs
    assert all(torch.equal(a, b) for a, b in zip((rows, cols), reference.positions(shape, n, key)))
    assert torch.equal(slots, reference.slots(every // shape[1], every % shape[1], shape, n, key))
