"""The selected set must look like a uniformly random n-subset: row, column and 16x16-block counts, and the overlap
between two keys' masks, neither clumped (upper tail) nor too regular (lower tail).

Every p-value is two-sided and rejected below ALPHA = 1e-9 per tail; this file computes fewer than 500 of them, so a
correct implementation fails with probability < 1e-6 (Bonferroni). The same checks must reject structured masks of
the same size (a contiguous run, an affine lattice), which shows they have power.
"""
import math

import pytest
import torch

from randmask import layer_key, mask_positions

ALPHA = 1e-9
SHAPES = [(256, 256), (64, 1024), (1024, 64), (251, 241), (1, 65537), (65537, 1)]
DENSITIES = [0.01, 0.1, 0.3]


def chi2_tails(stat: float, df: int) -> tuple[float, float]:
    """(P[X <= stat], P[X >= stat]) for X ~ chi-square(df)."""
    s, d = torch.tensor(stat, dtype=torch.float64), torch.tensor(df / 2, dtype=torch.float64)
    return torch.special.gammainc(d, s / 2).item(), torch.special.gammaincc(d, s / 2).item()


def cell_chi2(cells: torch.Tensor, sizes: torch.Tensor, n: int, numel: int) -> tuple[float, float]:
    """Counts of an n-subset in cells partitioning the positions (sizes = positions per cell). For a uniform subset
    drawn without replacement, sum (c - e)^2 / e ~ (N - n) / (N - 1) * chi-square(k - 1)."""
    keep = sizes > 0
    expected = n * sizes[keep].double() / numel
    stat = ((cells[keep].double() - expected) ** 2 / expected).sum().item()
    return chi2_tails(stat * (numel - 1) / (numel - n), int(keep.sum()) - 1)


def binned(index: torch.Tensor, extent: int, bins: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Counts of index values in `bins` near-equal bins of [0, extent), and each bin's width."""
    bin_of = lambda v: v * bins // extent  # noqa: E731
    return (torch.bincount(bin_of(index), minlength=bins),
            torch.bincount(bin_of(torch.arange(extent)), minlength=bins))


def mask_pvalues(rows, cols, shape) -> dict[str, tuple[float, float]]:
    out_features, in_features = shape
    n, numel = rows.numel(), out_features * in_features
    results = {}
    for label, index, extent in (("rows", rows, out_features), ("cols", cols, in_features)):
        bins = min(extent, max(2, n // 25), 512)  # >= 25 expected per bin keeps the chi-square approximation sound
        if extent > 1:
            counts, widths = binned(index, extent, bins)
            results[label] = cell_chi2(counts, widths * (numel // extent), n, numel)
    # Joint structure: g x g blocks of the matrix (a flat g*g-way split for a vector), where lattices show up.
    g = max(2, min(16, math.isqrt(n // 25)))
    if min(shape) > 1:
        rc, rw = binned(rows, out_features, g)
        cc, cw = binned(cols, in_features, g)
        counts = torch.bincount((rows * g // out_features) * g + cols * g // in_features, minlength=g * g)
        results["blocks"] = cell_chi2(counts, (rw[:, None] * cw[None, :]).flatten(), n, numel)
    else:
        counts, widths = binned(rows * in_features + cols, numel, g * g)
        results["blocks"] = cell_chi2(counts, widths, n, numel)
    return results


def assert_uniform(pvalues: dict, context: str):
    for label, (lower, upper) in pvalues.items():
        assert upper > ALPHA, f"{context}: {label} counts are clumped (p = {upper:.2e})"
        assert lower > ALPHA, f"{context}: {label} counts are too regular (p = {lower:.2e})"


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("density", DENSITIES)
def test_counts_look_uniform(shape, density):
    n = round(density * shape[0] * shape[1])
    for seed in range(4):
        rows, cols = mask_positions(shape, n, layer_key(seed, "model.layers.0.mlp.up_proj"))
        assert_uniform(mask_pvalues(rows, cols, shape), f"{shape} n={n} seed={seed}")


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_overlap_between_keys_is_hypergeometric(shape):
    """Two keys' n-subsets overlap in X ~ Hypergeometric(N, n, n) values. Over 40 key pairs the mean overlap
    (z-test) and the spread (sum of squared z ~ chi-square(40)) must both fit."""
    numel = shape[0] * shape[1]
    n = numel // 10
    mean = n * n / numel
    var = n * (n / numel) * ((numel - n) / numel) * ((numel - n) / (numel - 1))
    zs = []
    for pair in range(40):
        a = mask_positions(shape, n, layer_key(pair, "k.a"))
        b = mask_positions(shape, n, layer_key(pair, "k.b"))
        flat_a, flat_b = a[0] * shape[1] + a[1], b[0] * shape[1] + b[1]
        overlap = torch.isin(flat_a, flat_b).sum().item()
        zs.append((overlap - mean) / math.sqrt(var))
    z_mean = sum(zs) / math.sqrt(len(zs))
    assert abs(z_mean) < 6.1, f"mean overlap off by {z_mean:.1f} sigma"  # two-sided normal tail at 6.1 is ~1e-9
    lower, upper = chi2_tails(sum(z * z for z in zs), len(zs))
    assert min(lower, upper) > ALPHA, f"overlap spread off: p = {lower:.2e} / {upper:.2e}"


def test_masks_ignore_thread_count():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = mask_positions((300, 700), 50_000, layer_key(9, "t"))
        torch.set_num_threads(max(2, threads))
        many = mask_positions((300, 700), 50_000, layer_key(9, "t"))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], many[0]) and torch.equal(one[1], many[1])


# ------------------------------------------------------------------ the checks have power against structure
def _flat_to_positions(flat, shape):
    return flat // shape[1], flat % shape[1]


@pytest.mark.parametrize("shape", [(256, 256), (251, 241), (1, 65537)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_checks_reject_a_contiguous_run(shape):
    numel = shape[0] * shape[1]
    n = round(0.1 * numel)
    flat = (torch.arange(n) + 12345) % numel  # what a degenerate Feistel over Z_1 x Z_N produces
    pvalues = mask_pvalues(*_flat_to_positions(flat, shape), shape)
    assert min(min(p) for p in pvalues.values()) < ALPHA


@pytest.mark.parametrize("shape", [(256, 256), (251, 241), (1, 65537)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_checks_reject_an_affine_lattice(shape):
    """(a k + b) mod N is a bijection, but its points are spread far more evenly than random ones."""
    numel = shape[0] * shape[1]
    n = round(0.1 * numel)
    a = next(m for m in range(int(numel * 0.618), numel) if math.gcd(m, numel) == 1)
    flat = (torch.arange(n) * a + 777) % numel
    pvalues = mask_pvalues(*_flat_to_positions(flat, shape), shape)
    assert min(p[0] for p in pvalues.values()) < ALPHA  # the lower tail: too regular
