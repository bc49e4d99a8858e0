"""Sparse weight access at the masked positions: read the base values, write the merged values.

    gather:  base[k] = weight[r_k, c_k]                                   (once, when a layer is masked)
    update:  weight[r_k, c_k] = round_to_weight_dtype(float32(base[k]) + delta[k])     k in [0, n)

Only the n masked entries are touched; every other entry of weight stays bitwise as it was.
"""
import torch


def gather_weight_torch(weight, rows, cols):
    return weight[rows, cols]


def sparse_update_torch(weight, base, delta, rows, cols):
    weight[rows, cols] = (base.float() + delta.float()).to(weight.dtype)
    return weight
