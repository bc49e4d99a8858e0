"""On a GPU: every Triton kernel against its torch twin, in fp32, fp16 and bf16 (run by benchmarks/gpu_check.sh).

Positions and slots must be bit-identical; the masked gradient (gather kernel, matmul way, dispatcher) within
fp32 accumulation error of the twin on the same (rounded) inputs; gather/update and the fused MaskedAdamW step equal
the twins (weights exactly: on a GPU fp32 -> bf16 rounds to nearest, like torch). Exits 1 on any failure.
"""
import argparse
import sys

import torch

from randmask import layer_key
from randmask.kernels import masked_adamw as adamw_op
from randmask.kernels import masked_grad as grad_op
from randmask.kernels import positions as positions_op
from randmask.kernels import sparse_update as update_op
from randmask.kernels.mask_addressing import slot_to_flat_torch

DEVICE = torch.device("cuda")
# (positions shapes, masked-gradient (shape, tokens) cases, update weight shape, n); --smoke shrinks them so the
# script itself can be checked on a CPU under TRITON_INTERPRET=1.
# (1024, 20000): the matmul way in two blocks of output rows (64 MiB of fp32 each at most).
SIZES = {"full": ([(1, 65537), (65537, 1), (97, 89), (4096, 14336)],
                  [((576, 1536), 512), ((4096, 4096), 4096), ((1024, 20000), 256)], (4096, 1024), 50_000),
         "smoke": ([(1, 300), (97, 89)], [((40, 56), 40)], (64, 48), 300)}
failures = []


def check(ok: bool, what: str):
    print(("ok   " if ok else "FAIL ") + what, flush=True)
    if not ok:
        failures.append(what)


def same_weights(got, ref) -> bool:
    """Bitwise equal; under the CPU interpreter (--smoke) bf16 within one unit in the last place, because the
    interpreter rounds fp32 -> bf16 by truncation where a GPU and torch round to nearest even."""
    if DEVICE.type == "cpu" and got.dtype == torch.bfloat16:
        return bool(((got.view(torch.int16).int() - ref.view(torch.int16).int()).abs() <= 1).all())
    return torch.equal(got, ref)


def twin_positions(shape, n, key):
    flat = slot_to_flat_torch(torch.arange(n, device=DEVICE), shape[0] * shape[1], key)
    return flat // shape[1], flat % shape[1]


def main():
    global DEVICE
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (needs TRITON_INTERPRET=1)")
    args = parser.parse_args()
    if args.smoke:
        DEVICE = torch.device("cpu")
    position_shapes, grad_cases, weight_shape, update_n = SIZES["smoke" if args.smoke else "full"]
    key = layer_key(0, "gpu_check")
    for shape in position_shapes:
        n = min(shape[0] * shape[1], 200_000)
        rows, cols = positions_op.mask_positions_triton(*shape, n, key, DEVICE)
        ref_rows, ref_cols = twin_positions(shape, n, key)
        check(torch.equal(rows, ref_rows) and torch.equal(cols, ref_cols), f"positions {shape} n={n}")
        slots = positions_op.mask_slots_triton(rows, cols, *shape, n, key)
        check(torch.equal(slots, torch.arange(n, device=DEVICE)), f"slots {shape} n={n}")
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for (out_features, in_features), tokens in grad_cases:
            x = torch.randn(tokens, in_features, device=DEVICE).to(dtype)
            grad_y = torch.randn(tokens, out_features, device=DEVICE).to(dtype)
            for density in (1e-4, 1e-2, 0.2):
                n = max(1, round(density * out_features * in_features))
                rows, cols = twin_positions((out_features, in_features), n, key)
                ref = grad_op.masked_grad_gather_torch(x, grad_y, rows, cols)
                scale = ref.abs().max().item() + 1e-6
                for name, fn in [("gather", grad_op.masked_grad_gather_triton),
                                 ("matmul", grad_op.masked_grad_matmul_triton),
                                 ("dispatch", grad_op.masked_grad_triton)]:
                    err = (fn(x, grad_y, n, key) - ref).abs().max().item() / scale
                    check(err < 1e-4, f"masked_grad {name} {dtype} {out_features}x{in_features} T={tokens} "
                                      f"density={density}: rel err {err:.1e}")
        weight = torch.randn(*weight_shape, device=DEVICE).to(dtype)
        n = update_n
        rows, cols = twin_positions(tuple(weight.shape), n, key)
        base = update_op.gather_weight_triton(weight, n, key)
        check(torch.equal(base, weight[rows, cols]), f"gather {dtype}")
        delta = torch.randn(n, device=DEVICE) * 1e-2
        ours, ref = weight.clone(), weight.clone()
        update_op.sparse_update_triton(ours, base, delta, key)
        update_op.sparse_update_torch(ref, base, delta, rows, cols)
        check(same_weights(ours, ref), f"sparse update {dtype}")
        grad = torch.randn(n, device=DEVICE)
        states = [[delta.clone(), torch.zeros(n, device=DEVICE), torch.zeros(n, device=DEVICE), weight.clone()]
                  for _ in range(2)]
        hyper = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)
        for step in (1, 2, 3):
            for fused, (d, m, v, w) in zip((adamw_op.masked_adamw_triton, adamw_op.masked_adamw_torch), states):
                kwargs = {} if fused is adamw_op.masked_adamw_triton else {"positions": (rows, cols)}
                fused(w, base, d, grad, m, v, key, step=step, **hyper, **kwargs)
        (d1, m1, v1, w1), (d2, m2, v2, w2) = states
        err = ((d1 - d2).abs().max() / d2.abs().max()).item()
        check(err < 1e-6 and torch.equal(m1, m2), f"MaskedAdamW triton vs twin {dtype}: delta rel err {err:.1e}")
        check(same_weights(w1[rows, cols], (base.float() + d1).to(dtype)), f"MaskedAdamW merged weight {dtype}")
        # the one-launch step of several matrices (own shapes, a transposed weight, own step counts) equals one
        # launch per matrix, bitwise
        batch = []
        for i, ((out_features, in_features), n) in enumerate([(tuple(weight_shape), update_n), ((97, 89), 3000),
                                                              ((64, 48), 0)]):
            w = torch.randn(out_features, in_features, device=DEVICE).to(dtype)
            w = w.t().contiguous().t() if i == 1 else w  # a transposed (Conv1D-style) weight
            batch.append((w, update_op.gather_weight_triton(w, n, key + i), torch.zeros(n, device=DEVICE),
                          torch.randn(n, device=DEVICE), torch.zeros(n, device=DEVICE), torch.zeros(n, device=DEVICE),
                          key + i, 1 + i))
        per_matrix = [tuple(t.clone() if torch.is_tensor(t) else t for t in item) for item in batch]
        for *tensors, matrix_key, step in per_matrix:
            adamw_op.masked_adamw_triton(*tensors, matrix_key, step=step, **hyper)
        adamw_op.masked_adamw_multi_triton(batch, **hyper)
        same = all(torch.equal(x, y) for one, many in zip(per_matrix, batch) for x, y in zip(one[:6], many[:6]))
        check(same, f"MaskedAdamW one launch for 3 matrices vs one launch each {dtype}: bitwise")
        # the merged-weight write of the same matrices (the step hook's for torch optimizers), likewise
        for *tensors, matrix_key, _ in per_matrix:
            update_op.sparse_update_triton(tensors[0], tensors[1], tensors[2] + 1e-3, matrix_key)
        update_op.sparse_update_multi_triton([(w, base, delta + 1e-3, matrix_key)
                                              for w, base, delta, *_, matrix_key, _ in batch])
        same = all(torch.equal(one[0], many[0]) for one, many in zip(per_matrix, batch))
        check(same, f"sparse update, one launch for 3 matrices vs one launch each {dtype}: bitwise")
    print(f"{len(failures)} failed" if failures else "all Triton kernels agree with their torch twins")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
