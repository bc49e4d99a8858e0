"""The public mask functions (randmask/mask.py): layer keys, the committed vectors through the public API, the
bijection, exact counts, O(n) cost, and clear errors. tests/ops/test_positions.py holds every backend of positions
and slots to the reference."""
import ast
import math
import pathlib
import subprocess
import sys

import pytest
import torch

import randmask
from randmask import MatrixMask, count_for_density, layer_key, mask_positions, mask_slots, ops
from randmask.kernels.mask_addressing import cdiv, slot_to_flat_torch

VECTORS = pathlib.Path(__file__).parent / "vectors"


def read_vectors():
    lines = (VECTORS / "mask_scheme1.txt").read_text().splitlines()
    return [tuple(int(v) for v in line.split()) for line in lines if line and not line.startswith("#")]


pytestmark = pytest.mark.usefixtures("torch_backend")


def test_torch_positions_match_committed_vectors():
    cases = {}
    for out_features, in_features, key, slot, row, col in read_vectors():
        cases.setdefault((out_features, in_features, key), []).append((slot, row, col))
    assert len(cases) == 70
    for (out_features, in_features, key), entries in cases.items():
        numel = out_features * in_features
        slots = torch.tensor([s for s, _, _ in entries])
        rows, cols = torch.tensor([r for _, r, _ in entries]), torch.tensor([c for _, _, c in entries])
        flat = slot_to_flat_torch(slots, numel, key)  # the listed slots only: some matrices have 2^31 entries
        assert torch.equal(flat, rows * in_features + cols), (out_features, in_features, key)
        assert torch.equal(mask_slots(rows, cols, (out_features, in_features), numel, key), slots)
        if numel <= 2 * 10**5:  # the public enumeration of a whole prefix
            n = int(slots.max()) + 1
            all_rows, all_cols = mask_positions((out_features, in_features), n, key)
            assert torch.equal(all_rows[slots], rows) and torch.equal(all_cols[slots], cols)
            below = mask_slots(rows, cols, (out_features, in_features), int(slots.min()), key)
            assert (below == -1).all()  # with n = smallest listed slot, none of them is trainable


def test_layer_keys_match_committed_vectors():
    lines = (VECTORS / "layer_keys.txt").read_text().splitlines()[1:]
    assert len(lines) == 25
    for line in lines:
        seed, name, key = line.split("\t")
        assert layer_key(int(seed), ast.literal_eval(name)) == int(key)


@pytest.mark.full
def test_layer_key_is_stable_across_processes():
    code = "from randmask import layer_key; print(layer_key(123, 'model.layers.7.self_attn.v_proj'))"
    env_hashes = []
    for hash_seed in ("1", "2"):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={"PYTHONHASHSEED": hash_seed, "PATH": "/usr/bin:/bin"})
        env_hashes.append(int(out.stdout))
    assert env_hashes[0] == env_hashes[1] == layer_key(123, "model.layers.7.self_attn.v_proj")
    assert layer_key(0, "a") != layer_key(1, "a") != layer_key(1, "b")


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (7, 1), (2, 3), (7, 5), (97, 89), (64, 48), (1, 1000), (999, 2)])
def test_full_mask_is_a_permutation_and_slots_invert_it(shape):
    numel = shape[0] * shape[1]
    for key in (0, 2**64 - 1, layer_key(5, "p")):
        rows, cols = mask_positions(shape, numel, key)
        flat = rows * shape[1] + cols
        assert torch.equal(flat.sort().values, torch.arange(numel))
        grid_r, grid_c = torch.meshgrid(torch.arange(shape[0]), torch.arange(shape[1]), indexing="ij")
        slots = mask_slots(grid_r, grid_c, shape, numel, key)
        assert torch.equal(slots[rows, cols], torch.arange(numel))
        # A prefix of slots is the trainable set for smaller n: exactly n positions, -1 elsewhere.
        n = numel // 3
        partial = mask_slots(grid_r, grid_c, shape, n, key)
        assert (partial >= 0).sum() == n
        assert torch.equal(partial[rows[:n], cols[:n]], torch.arange(n))


def test_prefix_property_and_exact_counts():
    key = layer_key(0, "x")
    big = mask_positions((300, 200), 5000, key)
    small = mask_positions((300, 200), 1234, key)
    assert torch.equal(big[0][:1234], small[0]) and torch.equal(big[1][:1234], small[1])
    assert count_for_density((300, 200), 0.01) == 600
    assert count_for_density((4096, 4096), 1e-5) == 168
    assert count_for_density((7, 3), 0.0) == 0 and count_for_density((7, 3), 1.0) == 21


def test_empty_and_degenerate_inputs():
    rows, cols = mask_positions((5, 5), 0, 1)
    assert rows.shape == cols.shape == (0,) and rows.dtype == torch.int64
    assert mask_positions((0, 5), 0, 1)[0].numel() == 0
    assert mask_slots(torch.tensor([0, 4]), torch.tensor([4, 0]), (5, 5), 0, 1).tolist() == [-1, -1]


@pytest.mark.parametrize("backend", ["torch", "native"])
def test_enumeration_is_linear_in_n_not_in_matrix_size(backend):
    """8192 x 8192 (67M entries) at n = 1000: the memory torch allocates tracks n (a dense O(out*in) step would
    allocate hundreds of MiB)."""
    if ops.available_backends("cpu")[backend]:
        pytest.skip(ops.available_backends("cpu")[backend])
    key = layer_key(0, "big")

    def allocated(shape):
        with randmask.use_backend(backend), torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            positions = mask_positions(shape, 1000, key)
        return sum(max(event.cpu_memory_usage, 0) for event in prof.events()), positions

    small, _ = allocated((64, 64))
    big, (rows, cols) = allocated((8192, 8192))
    assert big < 2 * small + 65536, (big, small)  # 16,384x the entries, the same n: about the same memory
    assert rows.max() > 4096 and cols.max() > 4096


@pytest.mark.parametrize("call,error,match", [
    (lambda: mask_positions((4, 4), 17, 0), ValueError, r"n must be in \[0, 16\]"),
    (lambda: mask_positions((4, 4), -1, 0), ValueError, r"n must be in \[0, 16\]"),
    (lambda: mask_positions((4, 4, 4), 1, 0), ValueError, "shape must be"),
    (lambda: mask_positions((70000, 70000), 1, 0), ValueError, "at most 2147483647 entries"),
    (lambda: mask_positions((4, 4), 1, -3), ValueError, "unsigned 64-bit"),
    (lambda: mask_slots(torch.tensor([4]), torch.tensor([0]), (4, 4), 3, 0), ValueError, "outside a 4x4"),
    (lambda: mask_slots(torch.tensor([0.5]), torch.tensor([0]), (4, 4), 3, 0), TypeError, "integer tensors"),
    (lambda: count_for_density((4, 4), 2.0), ValueError, r"density must be a number in \[0, 1\]"),
    (lambda: layer_key("0", "x"), TypeError, "seed must be an int"),
    (lambda: MatrixMask((4, 4), 3, 2**64), ValueError, "unsigned 64-bit"),
])
def test_bad_arguments_are_clear_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_cdiv_is_the_ceiling_of_the_quotient():
    # the launchers' grid sizes (cdiv stands in for triton.cdiv, which is slow from Python)
    for a in range(0, 300):
        for b in (1, 2, 7, 32, 128, 1024):
            assert cdiv(a, b) == math.ceil(a / b)
    assert cdiv(2**40 + 1, 2**20) == 2**20 + 1
