"""randmask: fine-tune a fixed, uniformly random subset of a pretrained model's weights (Xu & Zhang, ICML 2024).

The data path: seed -> layer_key -> mask_positions (addressing) -> kernels (randmask.kernels) ->
MaskedLinearFunction (functional) -> MaskedLinear (layer).
"""
from randmask.adapter import AdapterError, load_adapter, merge, read_adapter_header, restore, save_adapter
from randmask.addressing import MASK_SCHEME, MatrixMask, count_for_density, layer_key, mask_positions, mask_slots
from randmask.layer import MaskedLinear
from randmask.model import (RandMaskConfig, apply, count_trainable_parameters, masked_layers, plan,
                            print_trainable_parameters)
from randmask.optim import MaskedAdamW

__version__ = "0.1.0"
__all__ = ["MASK_SCHEME", "AdapterError", "MaskedAdamW", "MaskedLinear", "MatrixMask", "RandMaskConfig", "apply",
           "count_for_density", "count_trainable_parameters", "layer_key", "load_adapter", "mask_positions",
           "mask_slots", "masked_layers", "merge", "plan", "print_trainable_parameters", "read_adapter_header",
           "restore", "save_adapter"]
