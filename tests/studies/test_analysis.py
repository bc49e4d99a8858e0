"""studies/analysis.py: Hessian top eigenvalue (power iteration on double-backward HVPs) and delta_norm.

Every check is against an independent reference: numpy's eigvalsh of the known matrix, central finite differences
of first-order gradients taken through MaskedLinear's own (real) backward, an explicit formula for the Hessian of a
least-squares loss, or a norm computed by hand."""
import math
import pathlib
import sys

import numpy as np
import pytest
import torch

import randmask

STUDIES = pathlib.Path(__file__).resolve().parents[2] / "studies"
sys.path.insert(0, str(STUDIES))
from analysis import delta_norm, differentiable_masked_layers, hessian_top_eigenvalue, hessian_vector_product  # noqa: E402

torch.set_num_threads(1)


def symmetric_with_spectrum(eigenvalues, seed):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((len(eigenvalues), len(eigenvalues))))
    return q @ np.diag(eigenvalues) @ q.T


def quadratic(a: np.ndarray, dtype=torch.float64):
    """loss(x) = 0.5 x^T A x over one parameter vector; Hessian A."""
    x = torch.randn(a.shape[0], dtype=dtype, generator=torch.Generator().manual_seed(1), requires_grad=True)
    a_t = torch.tensor(a, dtype=dtype)
    return x, lambda: 0.5 * x @ a_t @ x


@pytest.mark.parametrize("spectrum", [
    [9.0, 4.0, 2.5, 1.0, 0.5, -0.3, 0.1, 0.0],        # positive definite-ish, dominant +9
    [-7.0, 3.0, 2.0, 1.0, -1.0, 0.5, 0.2, -0.1],      # dominant eigenvalue negative: returned with its sign
])
def test_top_eigenvalue_of_known_quadratic(spectrum):
    a = symmetric_with_spectrum(spectrum, seed=0)
    reference = np.linalg.eigvalsh(a)
    largest_magnitude = reference[np.argmax(np.abs(reference))]
    x, loss_fn = quadratic(a)
    eigenvalue, vector, used = hessian_top_eigenvalue(loss_fn, [x], iters=500, tol=1e-8,
                                                      generator=torch.Generator().manual_seed(0))
    assert eigenvalue == pytest.approx(largest_magnitude, rel=1e-3)
    assert used < 500
    v = vector[0].numpy()
    assert np.linalg.norm(v) == pytest.approx(1.0, rel=1e-9)
    # the vector is an eigenvector: A v = lambda v
    assert np.linalg.norm(a @ v - largest_magnitude * v) < 1e-2 * abs(largest_magnitude)


def test_params_of_different_dtypes_and_an_unused_param():
    """The Hessian over [x64 (fp64), x32 (fp32)] of 0.5 z^T A z with z = concat; an unused param adds a zero row."""
    a = symmetric_with_spectrum([5.0, 2.0, 1.0, 0.5, 0.25, 0.1], seed=3)
    x64 = torch.randn(4, dtype=torch.float64, requires_grad=True)
    x32 = torch.randn(2, dtype=torch.float32, requires_grad=True)
    unused = torch.randn(3, requires_grad=True)
    a_t = torch.tensor(a)

    def loss_fn():
        z = torch.cat([x64, x32.double()])
        return 0.5 * z @ a_t @ z

    eigenvalue, vector, _ = hessian_top_eigenvalue(loss_fn, [x64, x32, unused], iters=300, tol=1e-9,
                                                   generator=torch.Generator().manual_seed(2))
    assert eigenvalue == pytest.approx(np.linalg.eigvalsh(a)[-1], rel=1e-3)
    assert [v.dtype for v in vector] == [torch.float64, torch.float32, torch.float32]
    assert float(vector[2].abs().max()) < 1e-6


def tiny_masked_network(seed=0):
    """Linear(6->8) -> tanh -> Linear(8->3), both MaskedLinear, with nonzero deltas."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    net.requires_grad_(False)
    net[0] = randmask.MaskedLinear.from_linear(net[0], n=20, seed=seed, name="0")
    net[2] = randmask.MaskedLinear.from_linear(net[2], n=10, seed=seed, name="2")
    with torch.no_grad():
        for _, layer in randmask.masked_layers(net):
            layer.delta.normal_(0, 0.3)
    x, target = torch.randn(7, 6), torch.randn(7, 3)
    return net, (lambda: ((net(x) - target) ** 2).mean())


def finite_difference_hvp(loss_fn, params, vector, eps=3e-3):
    """(grad(p + eps v) - grad(p - eps v)) / (2 eps), the gradients through MaskedLinear's own backward."""
    def gradient_at(step):
        with torch.no_grad():
            for p, v in zip(params, vector):
                p.add_(step * v)  # in place: bumps delta's version, so the next forward syncs the weight
        grads = torch.autograd.grad(loss_fn(), params)
        with torch.no_grad():
            for p, v in zip(params, vector):
                p.sub_(step * v)
        return grads

    plus, minus = gradient_at(eps), gradient_at(-eps)
    return [(a - b) / (2 * eps) for a, b in zip(plus, minus)]


def relative_error(a, b):
    num = math.sqrt(sum(float(((x - y) ** 2).sum()) for x, y in zip(a, b)))
    return num / math.sqrt(sum(float((y ** 2).sum()) for y in b))


@pytest.mark.parametrize("which", ["all", "first_layer_only"])
def test_hvp_matches_finite_differences_on_masked_network(which):
    net, loss_fn = tiny_masked_network()
    params = [p for p in net.parameters() if p.requires_grad]
    assert len(params) == 2  # the two deltas
    if which == "first_layer_only":  # the second layer keeps its own forward (its delta still requires grad)
        params = params[:1]
    generator = torch.Generator().manual_seed(5)
    vector = [torch.randn(p.shape, generator=generator) for p in params]
    hvp = hessian_vector_product(loss_fn, params, vector)
    reference = finite_difference_hvp(loss_fn, params, vector)
    assert relative_error(hvp, reference) < 2e-3
    # the layers are back on their own forward afterwards
    assert all("forward" not in layer.__dict__ for _, layer in randmask.masked_layers(net))


def test_differentiable_forward_equals_the_layer_forward():
    net, loss_fn = tiny_masked_network(seed=1)
    with torch.no_grad():
        net[0].delta.add_(0.1)  # not yet synced into the weight: the twin reads delta directly
        x = torch.randn(4, 6)
        expected = net(x)  # the real forward syncs first
    with differentiable_masked_layers(net):
        got = net(x)
        assert net[0].forward.__func__ is not randmask.MaskedLinear.forward
    assert torch.equal(got.detach(), expected)
    assert "forward" not in net[0].__dict__


def test_top_eigenvalue_of_masked_least_squares_matches_explicit_hessian():
    """One MaskedLinear(in, out), loss = mean over samples and outputs of (y - t)^2 / 2:
    H[k, l] = [r_k == r_l] * sum_t x[t, c_k] x[t, c_l] / (T * out)."""
    torch.manual_seed(3)
    samples, d_in, d_out = 9, 12, 4
    layer = randmask.MaskedLinear.from_linear(torch.nn.Linear(d_in, d_out, bias=False).requires_grad_(False),
                                              n=18, seed=3, name="w")
    x, target = torch.randn(samples, d_in), torch.randn(samples, d_out)
    loss_fn = lambda: 0.5 * ((layer(x) - target) ** 2).mean()  # noqa: E731
    rows, cols = (t.numpy() for t in layer.positions())
    xn = x.double().numpy()
    explicit = (rows[:, None] == rows[None, :]) * (xn[:, cols].T @ xn[:, cols]) / (samples * d_out)
    eigenvalue, _, _ = hessian_top_eigenvalue(loss_fn, [layer.delta], iters=300, tol=1e-7,
                                              generator=torch.Generator().manual_seed(0))
    assert eigenvalue == pytest.approx(np.linalg.eigvalsh(explicit)[-1], rel=1e-3)
    v = torch.randn(layer.n, generator=torch.Generator().manual_seed(1))
    hvp = hessian_vector_product(loss_fn, [layer.delta], [v])[0]
    np.testing.assert_allclose(hvp.double().numpy(), explicit @ v.double().numpy(), rtol=1e-4, atol=1e-6)


def test_delta_norm_is_the_norm_of_all_deltas():
    net, _ = tiny_masked_network(seed=2)
    assert delta_norm(net) > 0
    with torch.no_grad():
        net[0].delta.zero_()
        net[0].delta[:3] = torch.tensor([3.0, 0.0, 4.0])
        net[2].delta.zero_()
        net[2].delta[-1] = 12.0
    assert delta_norm(net) == pytest.approx(math.sqrt(9 + 16 + 144), rel=1e-12)  # = 13
    with torch.no_grad():
        net[2].delta.zero_()
    assert delta_norm(net[0]) == pytest.approx(5.0, rel=1e-12)
    assert delta_norm(torch.nn.Linear(3, 3)) == 0.0  # no masked layer: nothing travelled


def test_top_eigenvalue_on_a_transformer_with_fused_attention():
    # A Llama built with the default (sdpa) attention: its fused CPU kernel's backward has no derivative, so the
    # Hessian needs the math backend, which the analysis selects itself. Reference: the explicit Hessian, column by
    # column from Hessian-vector products on unit vectors, and numpy's eigenvalues.
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")
    model = LlamaForCausalLM(config).double()
    randmask.apply(model, randmask.RandMaskConfig(density=0.03, target_modules=["q_proj", "v_proj"]))
    params = [p for p in model.parameters() if p.requires_grad]
    sizes = [p.numel() for p in params]
    batch = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(5))
    loss_fn = lambda: model(input_ids=batch, labels=batch).loss  # noqa: E731
    columns = []
    for i in range(sum(sizes)):
        unit = torch.zeros(sum(sizes), dtype=torch.float64)
        unit[i] = 1
        columns.append(torch.cat([h.flatten() for h in
                                  hessian_vector_product(loss_fn, params, list(unit.split(sizes)))]))
    hessian = torch.stack(columns, 1).numpy()
    eigenvalues = np.linalg.eigvalsh((hessian + hessian.T) / 2)
    by_magnitude = eigenvalues[np.argsort(-np.abs(eigenvalues))]
    assert abs(by_magnitude[1]) < 0.9 * abs(by_magnitude[0])  # a gap: power iteration converges
    lam, _, _ = hessian_top_eigenvalue(loss_fn, params, iters=300, tol=1e-10,
                                       generator=torch.Generator().manual_seed(0))
    assert lam == pytest.approx(by_magnitude[0], rel=1e-4)
