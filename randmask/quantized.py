"""Quantized bases: bitsandbytes' Linear4bit (nf4 / fp4, with or without double quantization) and Linear8bitLt.

Their weights cannot hold W0 + delta, so a masked layer on one runs in additive mode (y = base(x) + S(delta) x) and
never writes them. This module recognises them (by their weight's type, without importing bitsandbytes), names
their quantization for adapter headers, and dequantizes a weight transiently (the base values at the mask, a merge).
"""
import torch
import torch.nn as nn

INSTALL_HINT = "pip install randmask[quant]"


def quantization_of(module: nn.Module) -> str | None:
    """"nf4" / "fp4" (with "-dq" when the block scales are quantized too) for a bitsandbytes 4-bit layer, "int8" for
    an 8-bit one, None for a plain floating-point weight."""
    weight = getattr(module, "weight", None)
    kind = type(weight).__name__
    if kind == "Params4bit":
        return weight.quant_type + ("-dq" if weight.compress_statistics else "")
    if kind == "Int8Params":
        return "int8"
    return None


def values_in(param: torch.Tensor) -> int:
    """How many weight values a parameter holds: numel, or for a bitsandbytes 4-bit weight the values packed into
    its bytes (two per byte)."""
    if type(param).__name__ == "Params4bit":
        return param.numel() * param.element_size() * 2
    return param.numel()


def describe(quantization: str | None, dtype=None) -> str:
    """A base's kind in words, for error messages."""
    if quantization is None:
        return f"plain {str(dtype).removeprefix('torch.')} base" if dtype is not None else "plain (unquantized) base"
    if quantization == "int8":
        return "bitsandbytes 8-bit (int8) base"
    kind, _, dq = quantization.partition("-")
    return f"bitsandbytes 4-bit {kind}{' double-quantized' if dq else ''} base"


def _bnb():
    try:
        import bitsandbytes
    except ImportError:
        raise ImportError(f"this layer is quantized by bitsandbytes, which is not installed ({INSTALL_HINT})") from None
    return bitsandbytes


def check_quantized(module: nn.Module, name: str = "") -> None:
    """Raise if a quantized layer cannot be read yet (a 4-bit weight is quantized only when first moved to a device:
    masking it before would record values that the move then changes)."""
    weight = module.weight
    if type(weight).__name__ == "Params4bit" and (not weight.bnb_quantized or weight.quant_state is None):
        raise ValueError(f"layer {name!r} is a bitsandbytes Linear4bit whose weight is not quantized yet; move it to "
                         "its device first (bitsandbytes quantizes on that move), then apply randmask")
    if type(weight).__name__ == "Int8Params" and _int8_scales(module) is None:
        raise ValueError(f"layer {name!r} is a bitsandbytes Linear8bitLt whose weight is not quantized yet (no "
                         "row scales); move it to its device first, then apply randmask")


def _int8_scales(module: nn.Module):
    scales = getattr(module.weight, "SCB", None)
    if scales is None:  # after its first forward, bitsandbytes keeps them in the layer's state
        scales = getattr(getattr(module, "state", None), "SCB", None)
    return scales


def dense_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of the (dequantized) weight values: the weight's own, or the dtype a quantized weight came from."""
    quantization = quantization_of(module)
    if quantization is None:
        return module.weight.dtype
    if quantization == "int8":
        return torch.float32  # bitsandbytes dequantizes int8 rows to fp32
    return module.weight.quant_state.dtype


@torch.no_grad()
def dequantize(module: nn.Module) -> torch.Tensor:
    """The (out, in) weight of a quantized layer as a new dense tensor in dense_dtype(module)."""
    quantization = quantization_of(module)
    if quantization is None:
        raise TypeError(f"{type(module).__name__} is not a bitsandbytes quantized layer")
    bnb = _bnb()
    weight = module.weight
    if quantization == "int8":
        return bnb.functional.int8_vectorwise_dequant(weight.data, _int8_scales(module))
    return bnb.functional.dequantize_4bit(weight.data, weight.quant_state)


def storage_of(module: nn.Module) -> list[torch.Tensor]:
    """Every tensor that holds a quantized layer's weight: the packed values and the quantization state (block
    scales, nested scales, codebooks), the things training must leave bitwise unchanged."""
    weight = module.weight
    found = [weight.data]
    if quantization_of(module) == "int8":
        found.append(_int8_scales(module))
        return found
    state = weight.quant_state
    found += [state.absmax, state.code]
    if state.nested:
        found += [state.state2.absmax, state.state2.code, state.offset]
    return found
