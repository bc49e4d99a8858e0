"""randmask.kernels: the kernel sources (installed under the randmask namespace, never as a top-level `kernels`).

One file per op, each holding its torch twin (the CPU fallback and the test oracle) beside its Triton kernels and
their launchers: mask_addressing (the bijection, the spec of the mask), positions, masked_grad, sparse_update (gather
and merged write), masked_adamw (the fused optimizer step); matrix_table (one launch over many matrices). native.py
loads the C++ CPU library built from csrc/. Which implementation runs is chosen in one place, randmask/ops.py.
"""
