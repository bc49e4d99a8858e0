"""randmask: fine-tune a fixed, uniformly random subset of a pretrained model's weights (Xu & Zhang, ICML 2024)."""
from randmask.addressing import MASK_SCHEME, count_for_density, layer_key, mask_positions, mask_slots

__version__ = "0.1.0"
__all__ = ["MASK_SCHEME", "count_for_density", "layer_key", "mask_positions", "mask_slots"]
