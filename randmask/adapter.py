"""Adapters: save the trained deltas to one safetensors file, load them onto a fresh base, merge, restore.

An adapter holds, per masked layer, only `delta` (n values; tensor `<layer name>.delta`) and, in the safetensors
metadata, a JSON header. No index tensor is stored: the mask is recomputed from (seed, layer name, shape, n) by the
versioned mask scheme, so the file is about 4·n bytes (2·n in bfloat16) plus the header.

Metadata (str -> str), keys:
    "format":                  "pt" (the safetensors convention)
    "randmask_adapter":        the JSON header below, as one string
    "randmask_adapter_blake2b": blake2b-128 hex of that string's UTF-8 bytes (catches a damaged header)

JSON header:
    {"format": "randmask-adapter", "format_version": 1, "mask_scheme": 1, "randmask_version": "0.1.0",
     "config": RandMaskConfig.to_dict(), "delta_dtype": "float32" | "bfloat16" | "float16",
     "base_fingerprint": blake2b-128 hex over every layer's record below, in order,
     "layers": [{"name", "key" (decimal string, 64-bit exact), "shape": [out, in], "n", "transposed",
                 "base_dtype", "quantization", "base_blake2b", "delta_blake2b"}, ...]}

A layer's base record is `name \\0 out,in,n,base_dtype \\0` followed by the bytes of the n original values W0_k (the
base model's weight at the masked positions, in its dtype; for a quantized base, the dequantized values in the dtype
it was quantized from): a wrong base model (another checkpoint, another init, another dtype, another quantization)
is detected exactly and cheaply without storing any index. "quantization" is null for a plain base, else "nf4",
"fp4" (with "-dq" when double-quantized) or "int8" (bitsandbytes), so a mismatch is named in words. The adapter is
the same whichever mode (merged or additive) trained it, and loads in either. `delta_blake2b` hashes the stored tensor's
bytes, so a changed or damaged tensor is detected. The hashes catch accidents, they are not signatures.

`load_adapter` reads and checks everything before it touches the model; any failure raises AdapterError (a
ValueError) naming the problem and leaves the model bitwise as it was.
"""
import contextlib
import dataclasses
import hashlib
import json
import os
import pathlib
import re
from typing import Any

import torch
import torch.nn as nn

from randmask import ops, quantized
from randmask.layer import MaskedLinear, dense_view, is_conv1d
from randmask.mask import MASK_SCHEME, MatrixMask, layer_key
from randmask.model import RandMaskConfig, apply_undoable, forget, masked_layers, plan

__all__ = ["AdapterError", "FORMAT", "FORMAT_VERSION", "save_adapter", "load_adapter", "read_adapter_header",
           "merge", "restore"]

FORMAT = "randmask-adapter"
FORMAT_VERSION = 1
HEADER_KEY = "randmask_adapter"
HEADER_HASH_KEY = "randmask_adapter_blake2b"

_DELTA_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16",
                torch.float64: "float64"}


class AdapterError(ValueError):
    """A randmask adapter cannot be saved or loaded; the message names the problem."""


# ---------------------------------------------------------------------------------------------------- hashing
def _hasher():
    return hashlib.blake2b(digest_size=16)


def _tensor_bytes(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes()


def _base_record(name: str, shape, n: int, base: torch.Tensor) -> bytes:
    head = f"{name}\0{shape[0]},{shape[1]},{n},{_DTYPE_NAMES.get(base.dtype, str(base.dtype))}\0".encode()
    return head + _tensor_bytes(base)


def _base_fingerprints(records) -> tuple[list[str], str]:
    """Per-layer and whole-model blake2b of the base records (name, shape, n, dtype, W0 at the mask), consumed one
    at a time from an iterable, so only one layer's record is held at once."""
    whole, per_layer = _hasher(), []
    for record in records:
        per_layer.append(_digest(record))
        whole.update(record)
    return per_layer, whole.hexdigest()


def _digest(data: bytes) -> str:
    h = _hasher()
    h.update(data)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------- save
def _delta_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, str) and dtype in _DELTA_DTYPES:
        return _DELTA_DTYPES[dtype]
    if isinstance(dtype, torch.dtype) and dtype in _DELTA_DTYPES.values():
        return dtype
    raise AdapterError(f"an adapter stores its deltas as torch.float32, torch.bfloat16 or torch.float16, "
                       f"got {dtype!r}")


def _masked_or_refuse(model: nn.Module, what: str) -> list[tuple[str, MaskedLinear]]:
    layers = list(masked_layers(model))
    if not layers:
        raise AdapterError(f"{what}: the model has no masked layers (apply randmask with randmask.apply first)")
    return layers


def header_of(config: dict, layers, dtype: torch.dtype) -> dict:
    """The JSON header (this module's docstring) for `layers`: (name, layer) pairs of MaskedLinear layers, or of
    anything with their delta, base, mask, key, n, transposed and quantization (a PEFT adapter's slots)."""
    from randmask import __version__

    entries = []
    for name, layer in layers:
        delta = layer.delta.detach().to(device="cpu", dtype=dtype).contiguous()
        entries.append({"name": name, "key": str(layer.key), "shape": list(layer.mask.shape), "n": layer.n,
                        "transposed": bool(layer.transposed), "base_dtype": _DTYPE_NAMES[layer.base.dtype],
                        "quantization": layer.quantization, "delta_blake2b": _digest(_tensor_bytes(delta))})
    per_layer, whole = _base_fingerprints(_base_record(name, layer.mask.shape, layer.n, layer.base)
                                          for name, layer in layers)
    for entry, fingerprint in zip(entries, per_layer):
        entry["base_blake2b"] = fingerprint
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "mask_scheme": MASK_SCHEME,
            "randmask_version": __version__, "config": config, "delta_dtype": _DTYPE_NAMES[dtype],
            "base_fingerprint": whole, "layers": entries}


def save_adapter(model: nn.Module, path, dtype=torch.float32) -> dict:
    """Write every masked layer's delta (cast to `dtype`: float32, bfloat16 or float16) to one safetensors file at
    `path`, with the JSON header described in this module's docstring. Syncs each layer first. Returns the header.
    In a process group (DDP, FSDP through randmask.distributed), only rank 0 writes."""
    dtype = _delta_dtype(dtype)
    layers = _masked_or_refuse(model, "save_adapter")
    config = getattr(model, "randmask_config", None)
    if not isinstance(config, RandMaskConfig):
        raise AdapterError("save_adapter: the model has MaskedLinear layers but no randmask_config; "
                           "build it with randmask.apply so the adapter can be loaded again")
    tensors = {}
    for name, layer in layers:  # every delta is checked before any layer syncs its weight
        delta = layer.delta.detach().to(device="cpu", dtype=dtype).contiguous()
        if layer.n and not bool(torch.isfinite(delta).all()):
            problem = "non-finite values" if not bool(torch.isfinite(layer.delta).all()) else \
                f"values too large for {_DTYPE_NAMES[dtype]}"
            raise AdapterError(f"save_adapter: layer {name!r} has {problem} in its delta")
        tensors[name + ".delta"] = delta
    for _, layer in layers:
        layer.sync()
    header = header_of(RandMaskConfig.to_dict(config), layers, dtype)
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank():
        return header  # every rank holds the same deltas (DDP, randmask.distributed): rank 0 writes the file
    text = json.dumps(header, separators=(",", ":"))
    blob = safetensors_bytes(tensors, {"format": "pt", HEADER_KEY: text, HEADER_HASH_KEY: _digest(text.encode())})
    write_atomically(path, lambda tmp: pathlib.Path(tmp).write_bytes(blob))
    return header


def safetensors_bytes(tensors: dict, metadata: dict) -> bytes:
    """A safetensors file's bytes with its JSON header in one canonical form (keys sorted): safetensors itself orders
    the metadata as a per-process hash map does, so the same adapter saved by two processes would differ in bytes."""
    import struct

    from safetensors.torch import save

    blob = save(tensors, metadata=metadata)
    size = struct.unpack("<Q", blob[:8])[0]
    header = json.dumps(json.loads(blob[8:8 + size]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the format pads the header to 8 bytes with spaces
    return struct.pack("<Q", len(header)) + header + blob[8 + size:]


def write_atomically(path, write) -> None:
    """write(tmp) into a temporary file of its own beside `path`, flushed to disk, then renamed onto `path`: the file
    at `path` is always one whole save (concurrent saves included: the last rename wins), and nothing is left behind
    on a failure or an interrupt."""
    import tempfile

    path = os.fspath(path)
    if os.path.isdir(path):
        raise AdapterError(f"save_adapter: {path!r} is a directory; give the adapter file's path")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise AdapterError(f"save_adapter: the directory {directory!r} does not exist")
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        os.close(fd)
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # a file to share: the mode open() gives (mkstemp's is 0600)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


# ---------------------------------------------------------------------------------------------------- read + check
def _read_safetensors(path: str) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            return f.metadata() or {}, {name: f.get_tensor(name) for name in f.keys()}
    except Exception as exc:  # safetensors raises its own SafetensorError (not a ValueError) on damage
        raise AdapterError(f"{path!r} is not a readable safetensors file (corrupt or truncated?): {exc}") from None


PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME, PEFT_KEY_PREFIX = "adapter_config.json", "adapter_model.safetensors", \
    "base_model.model."


def _read_peft_directory(path: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(header, tensors) from a PEFT directory written by randmask.peft: adapter_config.json carries the header."""
    try:
        with open(os.path.join(path, PEFT_CONFIG_NAME)) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise AdapterError(f"{path!r} is a directory without a readable {PEFT_CONFIG_NAME}: {exc}") from None
    if not isinstance(data, dict) or data.get("peft_type") != "RANDMASK":
        method = data.get("peft_type") if isinstance(data, dict) else None
        raise AdapterError(f"{path!r} holds a PEFT adapter of another method ({method!r}), not randmask's")
    header = data.get("randmask_adapter")
    if not isinstance(header, dict):
        raise AdapterError(f"{path!r}: {PEFT_CONFIG_NAME} has no randmask_adapter header")
    fields = [field.name for field in dataclasses.fields(RandMaskConfig)]
    header = {**header, "config": {name: data[name] for name in fields if name in data}}
    _, stored = _read_safetensors(os.path.join(path, PEFT_WEIGHTS_NAME))
    tensors = {}
    for key, tensor in stored.items():
        name = key.removeprefix(PEFT_KEY_PREFIX)
        if not key.startswith(PEFT_KEY_PREFIX) or not name.endswith(".randmask_delta"):
            raise AdapterError(f"{path!r}: unexpected tensor {key!r} (a randmask PEFT adapter holds one "
                               "'base_model.model.<layer>.randmask_delta' per layer)")
        tensors[name.removesuffix(".randmask_delta") + ".delta"] = tensor
    return header, tensors


def read(path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(header, tensors) from an adapter file, or from a PEFT directory of randmask's, checking only that it is an
    intact randmask adapter of a known version."""
    path = os.fspath(path)
    if os.path.isdir(path):
        header, tensors = _read_peft_directory(path)
        check_header(header, path)
        return header, tensors
    if not os.path.isfile(path):
        raise AdapterError(f"no adapter file at {path!r}")
    metadata, tensors = _read_safetensors(path)
    if HEADER_KEY not in metadata:
        raise AdapterError(f"{path!r} is a safetensors file but not a randmask adapter (no {HEADER_KEY!r} header)")
    text = metadata[HEADER_KEY]
    if metadata.get(HEADER_HASH_KEY) != _digest(text.encode()):
        raise AdapterError(f"{path!r}: the randmask header fails its checksum (the file is damaged or was edited)")
    try:
        header = json.loads(text)
    except json.JSONDecodeError as exc:
        raise AdapterError(f"{path!r}: the randmask header is not valid JSON: {exc}") from None
    check_header(header, path)
    return header, tensors


def check_header(header, path: str) -> None:
    """The header is randmask's adapter format, in versions this randmask reads."""
    found = header.get("format") if isinstance(header, dict) else type(header).__name__
    if found != FORMAT:
        raise AdapterError(f"{path!r}: the header's format is {found!r}, expected {FORMAT!r}")
    version, scheme = header.get("format_version"), header.get("mask_scheme")
    for field, value, known in (("format_version", version, FORMAT_VERSION), ("mask_scheme", scheme, MASK_SCHEME)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise AdapterError(f"{path!r}: the header's {field} is {value!r}, not a positive integer")
        if value > known:
            raise AdapterError(f"{path!r} was written with {field} {value}, newer than this randmask knows "
                               f"({known}); upgrade randmask to load it")
        if value != known:
            raise AdapterError(f"{path!r}: {field} {value} is not supported by this randmask (it reads {known})")


def read_adapter_header(path) -> dict:
    """The JSON header of an adapter file, after the integrity and version checks."""
    return read(path)[0]


def layer_entries(header: dict, path: str) -> list[dict[str, Any]]:
    layers = header.get("layers")
    if not isinstance(layers, list) or not layers:
        raise AdapterError(f"{path!r}: the header lists no layers")
    for entry in layers:
        ok = (isinstance(entry, dict) and isinstance(entry.get("name"), str) and isinstance(entry.get("key"), str)
              and re.fullmatch(r"[0-9]{1,20}", entry["key"]) is not None
              and isinstance(entry.get("shape"), list) and len(entry["shape"]) == 2
              and all(isinstance(d, int) and d >= 0 for d in entry["shape"]) and isinstance(entry.get("n"), int)
              and isinstance(entry.get("transposed"), bool) and entry.get("base_dtype") in _DTYPE_NAMES.values()
              and isinstance(entry.get("quantization"), (str, type(None)))
              and isinstance(entry.get("base_blake2b"), str) and isinstance(entry.get("delta_blake2b"), str))
        if not ok:
            raise AdapterError(f"{path!r}: malformed layer entry in the header: {entry!r}")
    names = [e["name"] for e in layers]
    if len(set(names)) != len(names):
        raise AdapterError(f"{path!r}: the header lists a layer twice")
    return layers


def _plan_for(model: nn.Module, config: RandMaskConfig) -> list[tuple[str, tuple[int, int], int, bool]]:
    """(name, shape, n, transposed) of the layers this config masks in `model`: its masked layers if it is masked
    already (with this very config), else what randmask.apply would mask."""
    masked = list(masked_layers(model))
    if masked:
        current = getattr(model, "randmask_config", None)
        if not isinstance(current, RandMaskConfig) or not current.same_masks(config, ignore_mode=True):
            raise AdapterError(f"the model is already masked with a different config ({current!r}) than the "
                               f"adapter's ({config!r}); load the adapter into a fresh base model, or "
                               f"randmask.restore this one first")
        return [(name, layer.mask.shape, layer.n, bool(layer.transposed)) for name, layer in masked]
    try:
        planned = plan(model, config)
    except ValueError as exc:
        raise AdapterError(f"the adapter's config does not fit this model: {exc}") from None
    return [(name, shape, n, is_conv1d(model.get_submodule(name))) for name, shape, n in planned]


def compare_layers(planned, entries, config: RandMaskConfig, path: str) -> None:
    want = {name: (shape, n, transposed) for name, shape, n, transposed in planned}
    have = {e["name"]: e for e in entries}
    missing = [name for name in want if name not in have]
    extra = [name for name in have if name not in want]
    if missing or extra:
        def listed(names):
            return f"{names[:5]}{f' and {len(names) - 5} more' if len(names) > 5 else ''}"

        problems = ([f"the adapter lacks the model's layers {listed(missing)}"] if missing else []) + \
                   ([f"the model lacks the adapter's layers {listed(extra)}"] if extra else [])
        raise AdapterError(f"{path!r} does not fit this model (with the adapter's config {config!r}): "
                           + "; ".join(problems))
    if [name for name, *_ in planned] != [e["name"] for e in entries]:
        raise AdapterError(f"{path!r}: the adapter lists the model's layers in another order (damaged header?)")
    for name, (shape, n, transposed) in want.items():
        entry = have[name]
        if tuple(entry["shape"]) != tuple(shape) or entry["n"] != n:
            raise AdapterError(f"{path!r} does not fit this model: layer {name!r} is {tuple(shape)} with n={n} "
                               f"here, {tuple(entry['shape'])} with n={entry['n']} in the adapter")
        if entry["transposed"] != transposed:
            kinds = ("Conv1D", "nn.Linear")
            raise AdapterError(f"{path!r} does not fit this model: layer {name!r} is a "
                               f"{kinds[not transposed]} here, a {kinds[not entry['transposed']]} in the adapter")
        if int(entry["key"]) != layer_key(config.seed, name):
            raise AdapterError(f"{path!r}: the mask key of layer {name!r} does not follow from seed {config.seed} "
                               f"and mask scheme {MASK_SCHEME} (damaged header?)")


def check_tensors(tensors: dict, entries, delta_dtype: torch.dtype, path: str) -> None:
    expected = {e["name"] + ".delta": e for e in entries}
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise AdapterError(f"{path!r}: tensors do not match the header: missing {missing[:5]}, unexpected "
                           f"{extra[:5]} (an adapter holds exactly one '<layer>.delta' per layer)")
    for key, entry in expected.items():
        t = tensors[key]
        if t.dtype != delta_dtype or tuple(t.shape) != (entry["n"],):
            raise AdapterError(f"{path!r}: tensor {key!r} is {t.dtype} {tuple(t.shape)}, the header says "
                               f"{delta_dtype} ({entry['n']},)")
        if _digest(_tensor_bytes(t)) != entry["delta_blake2b"]:
            raise AdapterError(f"{path!r}: tensor {key!r} fails its checksum (the file is damaged or was edited)")
        if t.numel() and not bool(torch.isfinite(t).all()):
            raise AdapterError(f"{path!r}: tensor {key!r} holds non-finite values")


def _model_base(model: nn.Module, name: str, shape, n: int, key: int) -> torch.Tensor:
    """The model's original values at the layer's masked positions (W0_k), without changing the model."""
    module = model.get_submodule(name)
    if isinstance(module, MaskedLinear):
        return module.base
    mask = MatrixMask(tuple(shape), n, key)
    with torch.no_grad():
        if hasattr(module, "original_values"):  # a PEFT layer of randmask's, whose weight may hold an adapter's values
            return module.original_values(mask)
        return ops.gather_weight(dense_view(module).detach(), mask)


def _base_kind(module: nn.Module) -> tuple[str | None, str]:
    """(quantization, dtype name) of a layer's base values."""
    if isinstance(module, MaskedLinear):
        quantization, dtype = module.quantization, module.base.dtype
    else:
        module = module.get_base_layer() if hasattr(module, "get_base_layer") else module
        quantization, dtype = quantized.quantization_of(module), quantized.dense_dtype(module)
    return quantization, _DTYPE_NAMES.get(dtype, str(dtype))


def check_base(model: nn.Module, entries, header: dict, path: str) -> None:
    for e in entries:  # the quantization and dtype first: clearer messages than "another base model"
        quantization, here = _base_kind(model.get_submodule(e["name"]))
        if quantization != e.get("quantization"):
            raise AdapterError(f"{path!r} was trained on a {quantized.describe(e.get('quantization'), e['base_dtype'])}"
                               f", this model's layer {e['name']!r} has a {quantized.describe(quantization, here)}; "
                               "load it onto the base it was trained on")
        if here != e["base_dtype"]:
            raise AdapterError(f"{path!r} was trained on a {e['base_dtype']} base model, this model's weights are "
                               f"{here} (layer {e['name']!r}); cast the model to {e['base_dtype']} first")
    per_layer, whole = _base_fingerprints(
        _base_record(e["name"], e["shape"], e["n"], _model_base(model, e["name"], e["shape"], e["n"], int(e["key"])))
        for e in entries)
    wrong = [e["name"] for e, fp in zip(entries, per_layer) if fp != e["base_blake2b"]]
    if wrong:
        raise AdapterError(f"{path!r} was trained on another base model: the original weights at the masked "
                           f"positions differ in {len(wrong)} of {len(entries)} layers (first: {wrong[0]!r})")
    if whole != header.get("base_fingerprint"):
        raise AdapterError(f"{path!r}: the base-model fingerprint does not match its layers (damaged header?)")


# ---------------------------------------------------------------------------------------------------- load
def load_adapter(model: nn.Module, path, mode: str | None = None) -> nn.Module:
    """Load an adapter onto `model` and return it.

    `model` is a fresh base model (randmask.apply is then called with the adapter's config, in `mode` if given:
    "auto", "merged" or "additive"; an adapter loads in either mode, whichever trained it), or one already masked
    with the same config (its deltas are overwritten; its layers keep their mode). Everything is checked first: the
    file's integrity, the format and mask-scheme versions, that the adapter's layers are exactly the ones the config
    masks in this model (names, shapes, n, layer kinds), that this model's weights at the masked positions (and
    their quantization) are the ones the adapter was trained on, and the tensors' names, dtypes, shapes, checksums
    and finiteness. On any failure an AdapterError names the problem and the model is left bitwise unchanged."""
    path = os.fspath(path)
    header, tensors = read(path)
    try:
        config = RandMaskConfig.from_dict(header.get("config"))
    except (TypeError, ValueError) as exc:
        raise AdapterError(f"{path!r}: the header's config is not a valid RandMaskConfig: {exc}") from None
    if mode is not None:
        config = RandMaskConfig.from_dict({**RandMaskConfig.to_dict(config), "mode": mode})
    delta_dtype = _DELTA_DTYPES.get(header.get("delta_dtype"))
    if delta_dtype is None:
        raise AdapterError(f"{path!r}: unknown delta_dtype {header.get('delta_dtype')!r} in the header")
    entries = layer_entries(header, path)
    compare_layers(_plan_for(model, config), entries, config, path)
    check_tensors(tensors, entries, delta_dtype, path)
    check_base(model, entries, header, path)

    undo = apply_undoable(model, config) if next(masked_layers(model), None) is None else None
    layers = dict(masked_layers(model))
    previous = {name: layer.delta.detach().clone() for name, layer in layers.items()} if undo is None else None
    try:
        with torch.no_grad():
            for e in entries:
                layer = layers[e["name"]]
                layer.delta.copy_(tensors[e["name"] + ".delta"].to(torch.float32))
                layer.sync()
    except BaseException:  # give the model back as it came
        with torch.no_grad():
            if undo is not None:
                undo()
            else:
                for name, delta in previous.items():
                    layers[name].delta.copy_(delta)
                    layers[name].sync()
        raise
    return model


# ---------------------------------------------------------------------------------------------------- merge/restore
def _plain_module(layer: MaskedLinear) -> nn.Module:
    """An nn.Linear (or transformers Conv1D when the layer wraps one) on the layer's own weight and bias storage."""
    if layer.transposed:
        from transformers.pytorch_utils import Conv1D

        module = Conv1D.__new__(Conv1D)
        nn.Module.__init__(module)
        module.nf, module.nx = layer.out_features, layer.in_features
        # layer.weight is a transposed view of the Conv1D's (in, out) storage; .t() gives that layout back.
        module.weight = nn.Parameter(layer.weight.detach().t(), requires_grad=layer.weight.requires_grad)
    else:
        module = nn.Linear.__new__(nn.Linear)
        nn.Module.__init__(module)
        module.in_features, module.out_features = layer.in_features, layer.out_features
        module.weight = layer.weight  # the original nn.Linear's Parameter, reused by MaskedLinear.from_linear
    if layer.bias is not None:
        module.bias = layer.bias
    else:
        module.register_parameter("bias", None)
    module.train(layer.training)
    return module


def _unmask(model: nn.Module, replacement) -> nn.Module:
    """Put `replacement(layer)` in place of every MaskedLinear."""
    layers = _masked_or_refuse(model, "merge/restore")
    for name, layer in layers:
        with torch.no_grad():
            plain = replacement(layer)
        if not name:
            model = plain  # the model itself was a MaskedLinear
        else:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, plain)
    forget(model)
    return model


def dense_of_quantized(base_layer: nn.Module, base: torch.Tensor, delta: torch.Tensor, mask: MatrixMask,
                       dtype: torch.dtype) -> nn.Linear:
    """A new nn.Linear holding dequant(W0) + delta in `dtype` (W0 + delta rounded once, from the dequantized base)."""
    weight = quantized.dequantize(base_layer).to(dtype)
    if mask.n:
        ops.sparse_update(weight, base, delta, mask)
    module = nn.Linear(base_layer.in_features, base_layer.out_features, bias=base_layer.bias is not None,
                       device="meta")
    module.weight = nn.Parameter(weight, requires_grad=False)
    if base_layer.bias is not None:
        module.bias = nn.Parameter(base_layer.bias.detach().to(dtype), requires_grad=False)
    module.train(base_layer.training)
    return module


def merge(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every MaskedLinear by a plain module holding the merged weights W0 + delta, remove
    `model.randmask_config`, and return the model.

    Plain bases are merged on their own storage (no copy): an nn.Linear (transformers Conv1D for GPT-2-style layers).
    A quantized base (bitsandbytes 4-bit or 8-bit) cannot hold W0 + delta and randmask never requantizes: its layers
    become new dense nn.Linear layers in `dtype` (required when the model has any; plain layers keep their dtype).
    Parameters keep the requires_grad they have (as PEFT's merge_and_unload does): randmask.apply froze the whole
    model, so the merged model comes back frozen; call `model.requires_grad_(True)` to train it densely."""
    layers = _masked_or_refuse(model, "merge")
    quantized_layers = [name for name, layer in layers if layer.quantization is not None]
    if quantized_layers and dtype is None:
        raise ValueError(f"merge: {len(quantized_layers)} layers (first: {quantized_layers[0]!r}) have quantized "
                         "bases, which cannot hold W0 + delta; pass the dense dtype to merge them into, e.g. "
                         "randmask.merge(model, dtype=torch.bfloat16) (randmask never requantizes), or keep the model "
                         "as it is (additive mode) or save the adapter")
    if dtype is not None and dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        raise ValueError(f"merge: dtype must be a floating-point torch dtype, got {dtype!r}")

    def merged(layer: MaskedLinear) -> nn.Module:
        if layer.quantization is not None:
            return dense_of_quantized(layer.base_layer, layer.base, layer.delta, layer.mask, dtype)
        if layer.mode == "additive":  # the base layer's weight takes the merged values
            weight = layer.base_layer.weight
            if layer.n:
                ops.sparse_update(weight.detach().t() if layer.transposed else weight, layer.base, layer.delta,
                                  layer.mask)
            return layer.base_layer
        layer.sync()
        return _plain_module(layer)

    return _unmask(model, merged)


def restore(model: nn.Module) -> nn.Module:
    """Give back the base model (PEFT's `unload`): replace every MaskedLinear by its base module, with the original
    values W0 written back at every masked position, bit-exactly (merged mode; additive mode never wrote them),
    remove `model.randmask_config`, and return the model. The trained deltas are dropped (save them first).
    Parameters keep their requires_grad, as in `merge`."""
    def restored(layer: MaskedLinear) -> nn.Module:
        layer.restore_base()
        return layer.base_layer if layer.mode == "additive" else _plain_module(layer)

    return _unmask(model, restored)
