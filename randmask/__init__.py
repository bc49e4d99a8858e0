"""randmask: fine-tune a fixed, uniformly random subset of a pretrained model's weights (Xu & Zhang, ICML 2024).

The data path, one file a step: seed -> layer_key -> MatrixMask -> positions (mask.py) -> the kernel each op runs
(ops.py, over randmask.kernels; constants in tuning.py) -> MaskedLinearFunction and MaskedLinear (layer.py) -> the
model API (model.py), MaskedAdamW (optim.py) and adapters (adapter.py). randmask.peft makes randmask a PEFT method
(importing it imports PEFT and registers there); the fine-tuning application sits beside the library in
randmask.recipes. Importing randmask loads neither.
"""
from randmask.adapter import AdapterError, load_adapter, merge, read_adapter_header, restore, save_adapter
from randmask.layer import MaskedLinear
from randmask.mask import MASK_SCHEME, MatrixMask, count_for_density, layer_key, mask_positions, mask_slots
from randmask.model import (
                            RandMaskConfig,
                            apply,
                            count_parameters,
                            count_trainable_parameters,
                            masked_layers,
                            plan,
                            print_trainable_parameters,
)
from randmask.ops import use_backend
from randmask.optim import MaskedAdamW

__version__ = "0.1.0"
__all__ = ["MASK_SCHEME", "AdapterError", "MaskedAdamW", "MaskedLinear", "MatrixMask", "RandMaskConfig", "apply",
           "count_for_density", "count_parameters", "count_trainable_parameters", "layer_key", "load_adapter",
           "mask_positions", "mask_slots", "masked_layers", "merge", "plan", "print_trainable_parameters",
           "read_adapter_header", "restore", "save_adapter", "use_backend"]
