"""Writes the committed test vectors of mask scheme 1 (run once when the scheme is created; never to fix a test).

mask_scheme1.txt: `out in key slot row col` per line: sigma(slot) = (row, col) for that shape and key. The torch
twin, the Triton device functions and kernels/csrc/randmask_mask.h must all reproduce every line.
layer_keys.txt: `seed name key` per line for randmask.layer_key.
"""
import pathlib

import torch

from randmask import layer_key
from randmask.kernels.mask_addressing import slot_to_flat_torch

HERE = pathlib.Path(__file__).parent
SHAPES = [(1, 1), (1, 7), (7, 1), (2, 3), (7, 5), (16, 16), (1, 65537), (65537, 1), (97, 89), (768, 768),
          (576, 1536), (1536, 576), (4096, 14336), (46341, 46340)]
KEYS = [0, 1, 2**64 - 1, 0x0123456789ABCDEF, layer_key(0, "model.layers.0.self_attn.q_proj")]


def main():
    gen = torch.Generator().manual_seed(1234)
    lines = ["# out in key slot row col  (mask scheme 1)"]
    for out_features, in_features in SHAPES:
        numel = out_features * in_features
        for key in KEYS:
            slots = torch.cat([torch.arange(min(numel, 12)), torch.randint(0, numel, (12,), generator=gen),
                               torch.tensor([numel - 1])]).unique()
            flat = slot_to_flat_torch(slots, numel, key)
            for s, p in zip(slots.tolist(), flat.tolist()):
                lines.append(f"{out_features} {in_features} {key} {s} {p // in_features} {p % in_features}")
    (HERE / "mask_scheme1.txt").write_text("\n".join(lines) + "\n")
    names = ["", "q_proj", "model.layers.0.self_attn.q_proj", "layers.31.mlp.down_proj", "ünïcode"]
    key_lines = ["# seed name key  (name is written as its repr)"]
    for seed in (0, 1, 42, -7, 2**40):
        for name in names:
            key_lines.append(f"{seed}\t{name!r}\t{layer_key(seed, name)}")
    (HERE / "layer_keys.txt").write_text("\n".join(key_lines) + "\n")


if __name__ == "__main__":
    main()
