"""randmask.kernels: the kernel sources (installed under the randmask namespace, never as a top-level `kernels`).

One file per op, each holding its Triton kernels, their launcher and the torch twin that is the CPU path and the
test oracle: mask_addressing (the bijection), positions, masked_grad, sparse_update. csrc/ holds the C/C++/CUDA side.
"""
