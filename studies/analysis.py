"""Loss-landscape measurements for a masked model: the two quantities the paper's explanation rests on.

Research tooling for the reproduction studies (studies/study_finetune.py, studies/study_linreg.py), not part of the
library. Xu & Zhang (ICML 2024) explain why random masking needs (and tolerates) a large learning rate: restricting
training to a random p-fraction of the weights makes the loss flatter (the top Hessian eigenvalue shrinks, so the
largest stable gradient-descent step 2 / lambda_max grows) and puts the solutions farther from the pretrained weights.

    hessian_top_eigenvalue(loss_fn, params)  -> (lambda, vector, iterations): the Hessian eigenvalue of largest
                                                magnitude w.r.t. `params` (power iteration on Hessian-vector products)
    delta_norm(model)                         -> ||delta||: how far training has moved the masked weights from W0
    differentiable_masked_layers(layers)      -> context in which MaskedLinear layers run a twice-differentiable
                                                plain-torch forward (used by hessian_top_eigenvalue automatically)

Why a separate forward for second order: MaskedLinear's autograd Function computes grad_delta with an opaque custom
op that has no autograd formula, so a double backward through it raises ("no autograd formula was registered"). Its
backward also takes grad_x = grad_y @ W with the merged weight as a constant, so even a differentiable masked
gradient would miss d(grad_x)/d(delta). Inside `differentiable_masked_layers` a layer instead computes
F.linear(x, W_eff) with W_eff = weight.index_put((rows, cols), base + delta) from ordinary torch ops: same value as
the merged weight, and torch differentiates it any number of times. The cost is one dense copy of each such weight
per forward, which is fine for analysis and not meant for training.

Typical use on a randmask model (with studies/ on sys.path):

    import analysis
    params = [p for p in model.parameters() if p.requires_grad]          # the deltas
    lam, vec, its = analysis.hessian_top_eigenvalue(lambda: loss_of(model, batch), params)
    dist = analysis.delta_norm(model)
"""
import contextlib
import math
import types
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from randmask import MaskedLinear, masked_layers
from randmask.layer import layer_of

__all__ = ["delta_norm", "differentiable_masked_layers", "hessian_top_eigenvalue", "hessian_vector_product"]


# ---------------------------------------------------------------------------------------------- twice-differentiable
def _twice_differentiable_forward(self: MaskedLinear, x: torch.Tensor) -> torch.Tensor:
    """MaskedLinear's forward from plain torch ops: y = x W_eff^T + b, W_eff = W0 with base + delta at the mask."""
    rows, cols = self.mask.positions(self.weight.device)
    # base + delta in fp32 then one rounding to the weight dtype: the value sync() writes (round(W0_k + delta_k)).
    # The cast's gradient is the identity, so the derivatives are those of the unrounded map.
    merged = (self.base.to(torch.float32) + self.delta).to(self.weight.dtype)
    # Out-of-place index_put on a detached weight: the masked entries come only from `merged`, so W_eff is right even
    # if the weight has not been synced since the last in-place change of delta.
    weight_eff = self.weight.detach().index_put((rows, cols), merged)
    return F.linear(x, weight_eff, self.bias)


def _as_masked_layers(layers) -> list:
    if isinstance(layers, nn.Module):
        return [layer for _, layer in masked_layers(layers)]
    found = list(layers)
    for layer in found:
        if not isinstance(layer, MaskedLinear):
            raise TypeError(f"expected MaskedLinear layers, got {type(layer).__name__}")
    return found


@contextlib.contextmanager
def differentiable_masked_layers(layers: "nn.Module | Iterable[MaskedLinear]"):
    """Within this context the given MaskedLinear layers (or every masked layer of a model) compute their forward
    with plain torch ops, so losses built inside can be differentiated twice w.r.t. the deltas.

    The forward is overridden on the instances only (an instance attribute shadows the class method) and restored
    on exit, also when nested or when the body raises."""
    patched = []
    try:
        for layer in _as_masked_layers(layers):
            patched.append((layer, layer.__dict__.get("forward")))
            layer.forward = types.MethodType(_twice_differentiable_forward, layer)
        yield
    finally:
        for layer, previous in reversed(patched):
            if previous is None:
                del layer.forward
            else:
                layer.forward = previous


# ---------------------------------------------------------------------------------------------- Hessian
def _dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    # Reductions in fp64: a bf16/fp16 parameter's vector is stored in its own dtype, but summing millions of products
    # in that dtype would swamp the Rayleigh quotient with rounding.
    return float(sum(torch.sum(x.double() * y.double()) for x, y in zip(a, b)))


def _gradient_graph(loss_fn: Callable[[], torch.Tensor], params: Sequence[torch.Tensor]):
    """grad(loss) w.r.t. params with its graph kept, the masked layers of `params` on their differentiable forward."""
    layers = {id(layer): layer for layer in map(layer_of, params) if layer is not None}
    # The math attention backend: the fused ones (flash, memory-efficient) have backward ops without derivatives,
    # so a transformer's loss built with them cannot be differentiated twice.
    with differentiable_masked_layers(layers.values()), sdpa_kernel(SDPBackend.MATH):
        loss = loss_fn()
    if loss.dim() != 0:
        raise ValueError(f"loss_fn must return a scalar, got shape {tuple(loss.shape)}")
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    # A parameter the loss does not use has a zero gradient and a zero Hessian row: keep it as an explicit zero.
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def _hvp_from_graph(grads, params, vector) -> list:
    """H v = d(g . v)/d(params), by one backward through the kept gradient graph."""
    live = [(i, g) for i, g in enumerate(grads) if g.requires_grad]
    out = [torch.zeros_like(p) for p in params]
    if not live:  # the loss is at most linear in params: H = 0
        return out
    products = torch.autograd.grad([g for _, g in live], params, grad_outputs=[vector[i] for i, _ in live],
                                   retain_graph=True, allow_unused=True)
    return [torch.zeros_like(p) if h is None else h.to(p.dtype) for p, h in zip(params, products)]


def hessian_vector_product(loss_fn: Callable[[], torch.Tensor], params: Sequence[torch.Tensor],
                           vector: Sequence[torch.Tensor]) -> list:
    """H v for the Hessian of loss_fn() w.r.t. params (a list of tensors shaped like params)."""
    params = list(params)
    grads = _gradient_graph(loss_fn, params)
    return [h.detach() for h in _hvp_from_graph(grads, params, [v.to(p.dtype) for p, v in zip(params, vector)])]


def hessian_top_eigenvalue(loss_fn: Callable[[], torch.Tensor], params: Sequence[torch.Tensor], iters: int = 20,
                           tol: float = 1e-3, generator: torch.Generator | None = None):
    """The eigenvalue of largest magnitude of the Hessian of loss_fn() w.r.t. params, by power iteration.

    loss_fn: a callable returning the scalar loss (e.g. a fixed batch's loss); called ONCE. Its gradient is built
             with create_graph=True and every iteration backpropagates through that same graph (retain_graph=True):
             one forward and one first backward in all, then one double backward per iteration, instead of a fresh
             forward + backward + double backward each time. The price is holding the graph for the whole run.
    params:  tensors requiring grad, e.g. [p for p in model.parameters() if p.requires_grad] (a randmask model's
             deltas). MaskedLinear layers owning one of them are switched to a twice-differentiable forward while
             loss_fn runs (see the module docstring); other masked layers keep their own forward, which is exact
             here because their weights are constants w.r.t. params.
    iters, tol: at most `iters` Hessian-vector products; stop once the Rayleigh quotient changes by less than
             tol * |quotient| between two iterations. The error then is usually well below tol when the top
             eigenvalue is separated from the rest; with |lambda_2| close to |lambda_1| convergence is slow.
    generator: seeds the random start vector (standard normal on the CPU, then moved to each param's device/dtype).

    Returns (eigenvalue, vector, iterations_used): eigenvalue is the Rayleigh quotient v.Hv as a float, and its
    sign is kept: when the largest-magnitude eigenvalue is negative (a saddle or a maximum direction dominates),
    that negative value is returned, not the largest algebraic one. vector is a list of unit-norm (over all params
    together) detached tensors shaped like params, in their dtypes. If the loss has two eigenvalues of equal
    magnitude and opposite sign at the top, power iteration does not converge and the last quotient is returned.
    """
    params = list(params)
    if not params:
        raise ValueError("params is empty")
    for p in params:
        if not p.requires_grad:
            raise ValueError("every tensor in params must require grad")
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")

    # The start vector is drawn in fp32 on the CPU so a seed gives the same direction on every device and dtype.
    vector = [torch.randn(p.shape, generator=generator, dtype=torch.float32).to(device=p.device, dtype=p.dtype)
              for p in params]
    norm = math.sqrt(_dot(vector, vector))
    vector = [v / norm for v in vector]

    grads = _gradient_graph(loss_fn, params)
    eigenvalue, previous = 0.0, None
    used = 0
    for used in range(1, iters + 1):  # noqa: B007 (returned: the iterations used)
        product = [h.detach() for h in _hvp_from_graph(grads, params, vector)]
        eigenvalue = _dot(vector, product)  # Rayleigh quotient, |vector| = 1
        product_norm = math.sqrt(_dot(product, product))
        if product_norm == 0.0:  # vector lies in the null space (or H = 0): nothing to iterate on
            break
        vector = [h / product_norm for h in product]
        if previous is not None and abs(eigenvalue - previous) < tol * abs(eigenvalue):
            break
        previous = eigenvalue
    return eigenvalue, [v.detach() for v in vector], used


# ---------------------------------------------------------------------------------------------- distance travelled
@torch.no_grad()
def delta_norm(model: nn.Module) -> float:
    """||delta||_2 over every masked layer of `model`: the distance of the masked weights from the pretrained W0
    (the deltas start at zero), accumulated in fp64. Measured in delta's fp32, before rounding into the weight."""
    total = 0.0
    for _, layer in masked_layers(model):
        total += float(torch.sum(layer.delta.double() ** 2))
    return math.sqrt(total)
