"""Which kernel runs: every op's table of implementations, and the one selector that picks among them.

The library reads in this order: randmask/mask.py (seed -> layer key -> mask -> positions), this file (which kernel
computes each op), randmask/layer.py (the autograd Function and MaskedLinear), randmask/model.py (the model API).

    op                  torch (twins: any device,       triton (CUDA tensors)          native (CPU library)
                        the test oracles)
    positions           slot_to_flat_torch              mask_positions_triton          positions_native
    slots               flat_to_slot_torch              mask_slots_triton              -
    masked_grad         torch-gather | torch-dense      triton-gather | triton-matmul  native | torch-dense
    gather_weight       gather_weight_torch             gather_weight_triton           gather_weight_native
    sparse_update       sparse_update_torch             sparse_update_triton           sparse_update_native
    sparse_update_many  one sparse_update each          one launch per device, dtype   one sparse_update each
    adamw               torch's single-tensor AdamW     one launch per device, dtype   torch's fused CPU AdamW,
                        ops (+ the merged write)        (AdamW + merged write fused)   then the native write
    sparse_add          sparse_add_torch                sparse_add_triton              sparse_add_native
    sparse_add_t        the same three, transposed

Backends by device: CUDA tensors run triton when it is installed, else torch; CPU tensors run native when the
library is built (kernels/native.py), else torch. `RANDMASK_BACKEND=torch|triton|native` forces one for the process
(read once, at the first call); `with use_backend(name):` forces one for a block (tests, benchmarks). Forcing triton
on CPU tensors works only under TRITON_INTERPRET=1 (how the tests run the Triton kernels); forcing a backend that
cannot run the tensors at hand is an error that says why.

`select(op, device, dtypes, **problem)` is the one place that chooses: the backend's implementations of the op that
take these dtypes (the torch twins when there are none), then the op's crossover rule among them, whose constants
live in randmask/tuning.py. Every implementation of an op takes the same arguments (the table's lambdas adapt the
kernels' own signatures), so adding a backend or an op is one entry here.
"""
import contextlib
import dataclasses
import os
import sys
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch.autograd.graph import increment_version

from randmask import tuning
from randmask.kernels import masked_adamw as adamw_op
from randmask.kernels import masked_grad as grad_op
from randmask.kernels import native
from randmask.kernels import sparse_add as add_op
from randmask.kernels import sparse_update as update_op
from randmask.kernels.mask_addressing import flat_to_slot_torch, slot_to_flat_torch
from randmask.kernels.matrix_table import WEIGHT_DTYPES

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # triton is optional: every op then runs its native kernel or torch twin
    HAS_TRITON = False

BACKENDS = ("torch", "triton", "native")


# ---------------------------------------------------------------------------------------------------- backends
_UNREAD = object()
_env_backend = _UNREAD  # RANDMASK_BACKEND, read at the first call
_forced = None  # use_backend's choice, which wins over the environment


def _checked(name) -> str | None:
    name = (name or "").strip().lower() or None
    if name is not None and name not in BACKENDS:
        raise ValueError(f"the randmask backend must be one of {BACKENDS}, got {name!r}")
    return name


def forced_backend() -> str | None:
    """The backend forced by use_backend or RANDMASK_BACKEND, or None (each device's default)."""
    global _env_backend
    if _forced is not None:
        return _forced
    if _env_backend is _UNREAD:
        _env_backend = _checked(os.environ.get("RANDMASK_BACKEND"))
    return _env_backend


@contextlib.contextmanager
def use_backend(name: str | None):
    """Run every op in the block on backend `name` ("torch", "triton", "native"; None: each device's default)."""
    global _forced
    before, _forced = _forced, _checked(name)
    try:
        yield
    finally:
        _forced = before


def _unavailable(backend: str, device: torch.device) -> str:
    """Why `backend` cannot run tensors on `device`, or "" when it can."""
    if backend == "triton":
        if not HAS_TRITON:
            return "triton is not installed"
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            return f"the Triton kernels run {device.type} tensors only under TRITON_INTERPRET=1"
    elif backend == "native":
        if device.type != "cpu":
            return f"the native kernels run CPU tensors, not {device.type} tensors"
        library, reason = native.status()
        if library is None:
            return f"the native CPU kernels are not built ({reason})"
    return ""


def backend_for(device) -> str:
    """'torch', 'triton' or 'native': the backend that runs ops on tensors on `device`."""
    device = device if isinstance(device, torch.device) else torch.device(device)
    choice = forced_backend()
    if choice is None:  # each device's default (the path of every call in training: kept short)
        if device.type == "cuda":
            return "triton" if HAS_TRITON else "torch"
        return "native" if device.type == "cpu" and native.status()[0] is not None else "torch"
    reason = _unavailable(choice, device)
    if reason:
        raise RuntimeError(f"randmask backend {choice!r} is forced (RANDMASK_BACKEND or use_backend), but {reason}")
    return choice


def available_backends(device="cpu") -> dict[str, str]:
    """{backend: "" if it can run tensors on `device`, else why not}."""
    device = torch.device(device)
    return {backend: _unavailable(backend, device) for backend in BACKENDS}


# ---------------------------------------------------------------------------------------------------- the table
@dataclasses.dataclass(frozen=True)
class Impl:
    """One implementation of an op: the backend it belongs to, the function (the op's common signature), and which
    tensor dtypes it takes (a predicate over the dtypes the caller passes; None: any)."""
    backend: str
    fn: Callable
    takes: Callable | None = None


def _dtypes_in(*allowed):
    allowed = frozenset(allowed)
    return lambda dtypes: all(d in allowed for d in dtypes)


_NATIVE_DTYPES = _dtypes_in(*native.DTYPE_CODES)  # fp32, fp16, bf16


class AdamWParam(NamedTuple):
    """One parameter of an AdamW step. `step` is its step count after this step's increment (a scalar tensor);
    `merged` is (weight, base, mask) for a MaskedLinear's delta, whose weight[r_k, c_k] = base[k] + delta[k] is
    written with the step, else None."""
    param: torch.Tensor
    grad: torch.Tensor
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    step: torch.Tensor
    merged: tuple | None


def _positions_torch(shape, n, key, device):
    flat = slot_to_flat_torch(torch.arange(n, dtype=torch.int64, device=device), shape[0] * shape[1], key)
    return torch.div(flat, shape[1], rounding_mode="floor"), flat % shape[1]


def _slots_torch(rows, cols, shape, n, key):
    slots = flat_to_slot_torch((rows * shape[1] + cols).flatten(), shape[0] * shape[1], key)
    return torch.where(slots < n, slots, -1).view(rows.shape)


def _positions_triton(shape, n, key, device):
    from randmask.kernels.positions import mask_positions_triton

    return mask_positions_triton(*shape, n, key, device)


def _slots_triton(rows, cols, shape, n, key):
    from randmask.kernels.positions import mask_slots_triton

    return mask_slots_triton(rows, cols, *shape, n, key)


def _sparse_update_each(updates) -> None:
    for weight, base, delta, mask in updates:
        sparse_update(weight, base, delta, mask)


def _sparse_update_one_launch(updates) -> None:
    batches = {}
    for weight, base, delta, mask in updates:
        batches.setdefault((weight.device, weight.dtype), []).append((weight, base, delta, mask.key))
    for batch in batches.values():
        update_op.sparse_update_multi_triton(batch)


def _adamw_torch(params, hyper) -> None:
    """torch's single-tensor AdamW, op for op, then the merged write at the mask's cached positions."""
    for p in params:
        if p.merged is None:
            param, grad, exp_avg, exp_avg_sq = p.param, p.grad, p.exp_avg, p.exp_avg_sq
            if torch.is_complex(param):  # as torch: complex values step as pairs of reals
                param, grad, exp_avg, exp_avg_sq = map(torch.view_as_real, (param, grad, exp_avg, exp_avg_sq))
            adamw_op.adamw_torch(param, grad, exp_avg, exp_avg_sq, step=p.step.item(), **hyper)
        else:
            weight, base, mask = p.merged
            adamw_op.masked_adamw_torch(weight, base, p.param, p.grad, p.exp_avg, p.exp_avg_sq, mask.key,
                                        step=p.step.item(), positions=mask.positions(weight.device), **hyper)


def _adamw_one_launch(params, hyper) -> None:
    """The deltas whose weights share a device and dtype in one Triton launch (AdamW and the merged write fused);
    plain parameters by the torch ops."""
    batches = {}
    for p in params:
        if p.merged is None:
            _adamw_torch([p], hyper)
        else:
            batches.setdefault((p.param.device, p.merged[0].dtype), []).append(p)
    for batch in batches.values():
        adamw_op.masked_adamw_multi_triton(
            [(weight, base, p.param, p.grad, p.exp_avg, p.exp_avg_sq, mask.key, p.step.item())
             for p in batch for weight, base, mask in (p.merged,)], **hyper)
        # written through pointers: bump the versions as the in-place torch ops of the other paths do
        increment_version([t for p in batch for t in (p.param, p.merged[0], p.exp_avg, p.exp_avg_sq)])


def _adamw_fused_cpu(params, hyper) -> None:
    """torch's fused multi-tensor AdamW kernel (what AdamW(fused=True) runs on a CPU) on every parameter in one call,
    then the native merged write of each delta."""
    torch._fused_adamw_([p.param for p in params], [p.grad for p in params], [p.exp_avg for p in params],
                        [p.exp_avg_sq for p in params], [], [p.step for p in params], amsgrad=False,
                        lr=hyper["lr"], beta1=hyper["beta1"], beta2=hyper["beta2"],
                        weight_decay=hyper["weight_decay"], eps=hyper["eps"], maximize=False)
    for p in params:
        if p.merged is not None:
            weight, base, mask = p.merged
            sparse_update(weight, base, p.param, mask)


def _sparse_add_torch(out, src, delta, mask, transpose):
    rows, cols = mask.positions(out.device)
    return add_op.sparse_add_torch(out, src, delta, *((cols, rows) if transpose else (rows, cols)))


def _sparse_add_impls(transpose: bool) -> dict:
    """The implementations of sparse_add (transpose=False) or sparse_add_t: one kernel each, told the direction."""
    return {
        "torch": Impl("torch", lambda out, src, d, mask: _sparse_add_torch(out, src, d, mask, transpose)),
        "triton": Impl("triton", lambda out, src, d, mask: add_op.sparse_add_triton(
            out, src, d, mask.n, mask.key, mask.shape, transpose)),
        "native": Impl("native", lambda out, src, d, mask: native.sparse_add_native(
            out, src, d, mask.n, mask.key, mask.shape, transpose), _NATIVE_DTYPES),
    }


_REAL = lambda dtypes: not any(d.is_complex for d in dtypes)  # noqa: E731

IMPLEMENTATIONS: dict[str, dict[str, Impl]] = {
    # (shape, n, key, device) -> (rows, cols), int64 of length n
    "positions": {
        "torch": Impl("torch", _positions_torch),
        "triton": Impl("triton", _positions_triton),
        "native": Impl("native", lambda shape, n, key, device: native.positions_native(shape, n, key)),
    },
    # (rows, cols, shape, n, key) -> slot of each position (int64), -1 where it is not trainable
    "slots": {
        "torch": Impl("torch", _slots_torch),
        "triton": Impl("triton", _slots_triton),
    },
    # (x (T, in), grad_y (T, out), mask) -> g, fp32 of length n
    "masked_grad": {
        "torch-gather": Impl("torch", lambda x, gy, mask: grad_op.masked_grad_gather_torch(
            x, gy, *mask.positions(x.device))),
        "torch-dense": Impl("torch", lambda x, gy, mask: grad_op.masked_grad_dense_torch(
            x, gy, *mask.positions(x.device))),
        "triton-gather": Impl("triton", lambda x, gy, mask: grad_op.masked_grad_gather_triton(x, gy, mask.n, mask.key)),
        "triton-matmul": Impl("triton", lambda x, gy, mask: grad_op.masked_grad_matmul_triton(x, gy, mask.n, mask.key)),
        "native": Impl("native", lambda x, gy, mask: native.masked_grad_native(x, gy, mask.n, mask.key),
                       _NATIVE_DTYPES),
    },
    # (weight, mask) -> base, the n masked entries in the weight's dtype
    "gather_weight": {
        "torch": Impl("torch", lambda w, mask: update_op.gather_weight_torch(w, *mask.positions(w.device))),
        "triton": Impl("triton", lambda w, mask: update_op.gather_weight_triton(w, mask.n, mask.key)),
        "native": Impl("native", lambda w, mask: native.gather_weight_native(w, mask.n, mask.key), _NATIVE_DTYPES),
    },
    # (weight, base, delta, mask) -> None: weight[r_k, c_k] = round(base[k] + delta[k]) in place
    "sparse_update": {
        "torch": Impl("torch", lambda w, b, d, mask: update_op.sparse_update_torch(w, b, d, *mask.positions(w.device))),
        "triton": Impl("triton", lambda w, b, d, mask: update_op.sparse_update_triton(w, b, d, mask.key)),
        "native": Impl("native", lambda w, b, d, mask: native.sparse_update_native(w, b, d, mask.key),
                       _NATIVE_DTYPES),
    },
    # ([(weight, base, delta, mask), ...]) -> None; dtypes: (weight, delta)
    "sparse_update_many": {
        "torch": Impl("torch", _sparse_update_each),
        "triton": Impl("triton", _sparse_update_one_launch,
                       lambda dtypes: dtypes[0] in WEIGHT_DTYPES and dtypes[1] == torch.float32),
        "native": Impl("native", _sparse_update_each),
    },
    # (out (T, out), x (T, in), delta, mask) -> None: out[t, r_k] += delta[k] x[t, c_k] in place
    "sparse_add": _sparse_add_impls(transpose=False),
    # (out (T, in), grad_y (T, out), delta, mask) -> None: out[t, c_k] += delta[k] grad_y[t, r_k] in place
    "sparse_add_t": _sparse_add_impls(transpose=True),
    # ([AdamWParam, ...], hyper) -> None; dtypes: (param,)
    "adamw": {
        "torch": Impl("torch", _adamw_torch),
        "triton": Impl("triton", _adamw_one_launch),
        "native": Impl("native", _adamw_fused_cpu, _REAL),
    },
}


# ---------------------------------------------------------------------------------------------------- the selector
def _masked_grad_rule(backend, device, dtypes, n, tokens, out_features, in_features) -> str:
    density = n / max(1, out_features * in_features)
    if backend == "triton":
        half = len(set(dtypes)) == 1 and dtypes[0] in (torch.float16, torch.bfloat16)
        return "triton-gather" if gather_is_cheaper(n, tokens, out_features, in_features, half) else "triton-matmul"
    if backend == "native":  # the native gather, or above the crossover the dense twin (BLAS)
        return "torch-dense" if density > tuning.CPU.native_dense_density else "native"
    return "torch-dense" if density > tuning.CPU.twin_dense_density else "torch-gather"


def gather_is_cheaper(n: int, tokens: int, out_features: int, in_features: int, half: bool = True) -> bool:
    """Whether the Triton gather beats the matmul way for n slots of an (out, in) matrix over `tokens` tokens, by
    tuning.GPU's cost model (half: fp16/bf16 operands, which cuBLAS takes on tensor cores)."""
    gpu = tuning.GPU
    matmul_s = gpu.matmul_s if half else gpu.matmul_s * (
        gpu.matmul_tf32_factor if torch.backends.cuda.matmul.allow_tf32 else gpu.matmul_fp32_factor)
    gather = gpu.gather_fixed_s + n * tokens * gpu.gather_s
    matmul = gpu.matmul_fixed_s + out_features * in_features * tokens * matmul_s + n * gpu.matmul_slot_s
    return gather <= matmul


_RULES = {"masked_grad": _masked_grad_rule}  # ops with several implementations in one backend


def _candidates(op: str, backend: str, dtypes: tuple) -> tuple[str, list[str]]:
    """(backend, names): the backend's implementations of `op` that take these dtypes, or else the torch twins."""
    table = IMPLEMENTATIONS[op]
    names = [name for name, impl in table.items()
             if impl.backend == backend and (impl.takes is None or impl.takes(dtypes))]
    if names:
        return backend, names
    return "torch", [name for name, impl in table.items() if impl.backend == "torch"]


_CANDIDATES = {}  # (op, backend, dtypes) -> _candidates(...): the table does not change while the process runs


def select(op: str, device, dtypes=(), **problem) -> str:
    """The name of the implementation of `op` that runs for tensors of these dtypes on `device` (problem: the sizes
    the op's crossover rule reads)."""
    key = (op, backend_for(device), tuple(dtypes))
    found = _CANDIDATES.get(key)
    if found is None:
        found = _CANDIDATES[key] = _candidates(*key)
    backend, names = found
    rule = _RULES.get(op)
    return rule(backend, device, dtypes, **problem) if rule is not None else names[0]


def run(op: str, name: str, *args):
    """Call implementation `name` of `op` directly (tests and benchmarks compare them side by side)."""
    return IMPLEMENTATIONS[op][name].fn(*args)


def implementations(op: str, device="cpu") -> list[str]:
    """The names of the implementations of `op` whose backend can run tensors on `device` here."""
    device = torch.device(device)
    return [name for name, impl in IMPLEMENTATIONS[op].items() if not _unavailable(impl.backend, device)]


# ---------------------------------------------------------------------------------------------------- the ops
def positions(shape, n: int, key: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols), int64 of length n on `device`: slot k sits at (rows[k], cols[k])."""
    return run("positions", select("positions", device), shape, n, key, device)


def slots(rows: torch.Tensor, cols: torch.Tensor, shape, n: int, key: int) -> torch.Tensor:
    """The slot of each (rows[i], cols[i]) (int64 tensors of one shape, inside the matrix), -1 where not trainable."""
    return run("slots", select("slots", rows.device), rows, cols, shape, n, key)


def masked_grad(x: torch.Tensor, grad_y: torch.Tensor, mask) -> torch.Tensor:
    """g[k] = sum_t grad_y[t, r_k] x[t, c_k] for 2-D x (T, in) and grad_y (T, out): fp32 of length mask.n."""
    name = select("masked_grad", x.device, (x.dtype, grad_y.dtype), n=mask.n, tokens=x.shape[0],
                  out_features=mask.shape[0], in_features=mask.shape[1])
    return run("masked_grad", name, x, grad_y, mask)


def gather_weight(weight: torch.Tensor, mask) -> torch.Tensor:
    """The n values weight[r_k, c_k], in the weight's dtype."""
    return run("gather_weight", select("gather_weight", weight.device, (weight.dtype,)), weight, mask)


def row_shard(weight: torch.Tensor):
    """(local rows, index of the first) of a weight that FSDP2 shards by rows (a DTensor placed Shard(0) on a 1-D
    mesh; torch.chunk's split: ceil(out / ranks) rows a rank), or None for a plain tensor."""
    if "torch.distributed.tensor" not in sys.modules:  # no DTensor can exist yet
        return None
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(weight, DTensor):
        return None
    if tuple(weight.placements) != (Shard(0),):
        raise NotImplementedError(f"randmask writes into weights sharded by rows (FSDP2's Shard(0) on a 1-D mesh), "
                                  f"got placements {weight.placements}")
    chunk = -(-weight.shape[0] // weight.device_mesh.size())
    return weight.to_local(), chunk * weight.device_mesh.get_local_rank()


def _sparse_update_shard(shard, base, delta, mask) -> None:
    """sparse_update on this rank's rows of a row-sharded weight: the slots whose row falls there (O(n), torch ops;
    no communication: every rank derives the same positions from the key)."""
    local, first = shard
    rows, cols = mask.positions(local.device)
    mine = (rows >= first) & (rows < first + local.shape[0])
    with torch.no_grad():
        update_op.sparse_update_torch(local, base[mine], delta[mine], rows[mine] - first, cols[mine])


def sparse_update(weight: torch.Tensor, base: torch.Tensor, delta: torch.Tensor, mask) -> None:
    """weight[r_k, c_k] = round_to_weight_dtype(float(base[k]) + delta[k]), in place; nothing else is touched. A
    row-sharded weight (FSDP2) gets the entries of its own rows."""
    shard = row_shard(weight)
    if shard is not None:
        return _sparse_update_shard(shard, base, delta, mask)
    name = select("sparse_update", weight.device, (weight.dtype, base.dtype, delta.dtype))
    run("sparse_update", name, weight, base, delta, mask)


def sparse_update_many(updates) -> None:
    """sparse_update for every (weight, base, delta, mask) of `updates`; on the triton backend, those whose weights
    share a device and dtype in one launch (one launch per layer would cost its host time each)."""
    groups = {}
    for update in updates:
        weight, _, delta, _ = update
        shard = row_shard(weight)
        if shard is not None:
            _sparse_update_shard(shard, *update[1:])
            continue
        groups.setdefault(select("sparse_update_many", weight.device, (weight.dtype, delta.dtype)), []).append(update)
    for name, group in groups.items():
        run("sparse_update_many", name, group)


def adamw(params, *, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    """One AdamW step (decoupled weight decay; torch.optim.AdamW's math with amsgrad=False, maximize=False) on every
    AdamWParam of `params`, in place, with the merged weight write of every delta among them."""
    hyper = {"lr": lr, "beta1": beta1, "beta2": beta2, "eps": eps, "weight_decay": weight_decay}
    groups = {}
    for p in params:
        groups.setdefault(select("adamw", p.param.device, (p.param.dtype,)), []).append(p)
    for name, group in groups.items():
        run("adamw", name, group, hyper)


def sparse_add(out: torch.Tensor, x: torch.Tensor, delta: torch.Tensor, mask) -> None:
    """out[t, r_k] += delta[k] x[t, c_k] in place for 2-D out (T, out) and x (T, in): out += x S(delta)^T, the
    additive forward (kernels/sparse_add.py: fp32 sums in slot order, one rounding per element, deterministic)."""
    name = select("sparse_add", out.device, (out.dtype, x.dtype))
    run("sparse_add", name, out, x, delta, mask)


def sparse_add_t(out: torch.Tensor, grad_y: torch.Tensor, delta: torch.Tensor, mask) -> None:
    """out[t, c_k] += delta[k] grad_y[t, r_k] in place for 2-D out (T, in) and grad_y (T, out): out += grad_y S(delta),
    the additive backward's grad_x term."""
    name = select("sparse_add_t", out.device, (out.dtype, grad_y.dtype))
    run("sparse_add_t", name, out, grad_y, delta, mask)
