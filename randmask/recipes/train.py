"""Training one method for `randmask finetune`: the recipe of the paper (Xu & Zhang 2024, on MeZO's setup).

    auto_lr(method, ratio)        the learning rate when --lr is auto, and its rule in words
    ThreadGovernor, start_governor  CPU threads lowered while other processes keep cores busy
    train_batches(...)            one epoch's shuffled index batches, optionally grouped by prompt length
    batch_loss, evaluate          a batch's loss and a held-out evaluation, for classification items (option
                                  cross-entropy, accuracy) and sft items (completion tokens' loss, exact match)
    apply_method(model, method)   randmask (RandMaskConfig on the targets), lora (PEFT) or full; the trainable params
    make_optimizer(method, ...)   AdamW (betas 0.9, 0.999, eps 1e-8, weight decay 0); MaskedAdamW for randmask
    snapshot / restore_snapshot   the best epoch's trainable values, kept and written back
    save_trained(model, method)   the adapter file (randmask), the PEFT adapter directory or the full model
    checkpoint_path, save_checkpoint, load_checkpoint, check_checkpoint
                                  the resumable state of one method's training (written atomically)
    train_one(method, model, ...) all of it for one method: constant LR, no warmup, gradient clipping, dev accuracy
                                  (sft: dev loss) after every epoch, the best epoch restored, the test evaluation,
                                  the saved values;
                                  a checkpoint after every epoch (and every --checkpoint-every steps), resumable

`s` everywhere is a randmask.recipes.finetune.Settings.
"""
import collections
import dataclasses
import math
import os
import random
import shutil
import tempfile
import time

import torch

import randmask
from randmask.recipes import FinetuneError, models, report
from randmask.recipes import data as D
from randmask.recipes import sft as S

__all__ = ["METHODS", "DEFAULT_RATIO", "auto_lr", "ThreadGovernor", "start_governor", "train_batches", "is_sft",
           "batch_loss", "loss_weight", "evaluate", "describe", "better", "majority_baseline", "most_frequent_answer",
           "apply_method", "make_optimizer", "snapshot", "restore_snapshot", "save_trained", "checkpoint_path",
           "plain_value", "checkpoint_settings", "save_checkpoint", "load_checkpoint", "check_checkpoint", "train_one"]

PEFT_PIP = "pip install peft"
METHODS = ("randmask", "lora", "full")
DEFAULT_RATIO = 1e-4  # the paper's headline setting: 0.01% of the model


# ---------------------------------------------------------------------------------------------------- LR rule
# Fitted to the best dev learning rates of the reproduction study (studies/study_finetune.py; its numbers are in
# docs/reproduction.md and studies/results/study_finetune.md): for randmask on q,v the best LR grew like
# ratio ** -0.75 (the paper: ~ratio ** -1). LoRA r=8 and full fine-tuning take their best dev LRs in that study.
LR_ANCHOR_RATIO = 1e-4
LR_ANCHOR = 0.15
LR_EXPONENT = 0.75
LR_MAX = 1.0  # the study's sparsest setting wanted this; larger steps diverged there
LR_LORA = 3e-3
LR_FULL = 1e-4


def auto_lr(method: str, trainable_ratio: float | None = None) -> tuple[float, str]:
    """(learning rate, the rule in words) for a method; randmask needs its trainable ratio (a share of the whole
    model): lr = 0.15 * (1e-4 / ratio) ** 0.75, capped at 1."""
    if method == "lora":
        return LR_LORA, f"lora: {LR_LORA:g} (best on dev in studies/study_finetune.py)"
    if method == "full":
        return LR_FULL, f"full: {LR_FULL:g} (best on dev in studies/study_finetune.py)"
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
    return lr, rule + (" (best LR ~ 1/ratio**0.75, fitted to the best dev LRs in studies/study_finetune.py; "
                       "the paper: ~1/ratio)")


# ---------------------------------------------------------------------------------------------------- threads
class ThreadGovernor:
    """Default CPU threading (no --threads): torch's thread count, lowered while other processes keep cores busy.

    With every core running one of torch's OpenMP threads, a process that takes one core away stalls each parallel
    op until the descheduled thread runs again, so a step can take many times longer, while fewer threads than free
    cores keep their pace. So every `interval` seconds (checked between steps and evaluation batches) the governor
    reads /proc/stat and this process's CPU time, estimates how many cores OTHER processes used since the last
    check, and sets torch's threads to round(cores - others), between 1 and the starting count. Linux only;
    elsewhere (or with --threads) it does nothing."""

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


def start_governor(s, log):
    """The governor run() uses: a started ThreadGovernor on the CPU without --threads, else one that does nothing;
    logs the thread count it starts with (and the count it was lowered from, if it was); its later changes are
    logged only with --verbose (metrics.json counts them either way)."""
    governor = _NoGovernor()
    if not s.threads and s.device == "cpu":
        quiet = report.bar_safe(log) if s.progress else log
        governor = ThreadGovernor(quiet if s.verbose else (lambda *args: None))  # its changes: --verbose only
        governor.start()
    lowered = isinstance(governor, ThreadGovernor) and torch.get_num_threads() < governor.max
    log(f"threads: {torch.get_num_threads()}" + (f" (of {governor.max}: other processes keep cores busy)"
                                                 if lowered else ""))
    return governor


# ---------------------------------------------------------------------------------------------------- batches
def train_batches(items, batch_size, rng, group_by_length):
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


def _batches(items, size):
    for i in range(0, len(items), size):
        yield items[i:i + size]


def is_sft(items) -> bool:
    """Encoded prompt -> completion items (--task sft), not classification items."""
    return bool(items) and "completion" in items[0]


def batch_loss(model, items, pad_id) -> torch.Tensor:
    """A batch's mean loss: the option cross-entropy over its items, or (sft) the negative log-likelihood over its
    completion tokens."""
    if is_sft(items):
        return S.completion_loss(model, S.collate_pairs(items, pad_id))
    batch = D.collate(items, pad_id)
    return D.option_loss(D.option_scores(model, batch), batch["labels"])


def loss_weight(items) -> int:
    """What batch_loss averages over: the items, or (sft) their completion tokens."""
    return sum(len(it["completion"]) for it in items) if is_sft(items) else len(items)


@torch.no_grad()
def evaluate(model, items, batch_size, pad_id, progress=False, desc="eval", governor=None) -> dict:
    """Classification: accuracy, mean option loss and accuracy per class. sft: the mean loss over all completion
    tokens, its perplexity and the exact-match share (None unless every completion is a short answer, at most
    sft.SHORT_ANSWER tokens). Items are batched by length (fewer pad tokens); the result does not depend on the
    order."""
    was_training = model.training
    model.eval()
    sft = is_sft(items)
    order = sorted(range(len(items)), key=lambda i: len(items[i]["prompt"]) + len(items[i].get("completion", ())))
    correct, loss_sum, tokens, per_class = 0, 0.0, 0, {}
    batches = list(_batches([items[i] for i in order], batch_size))
    for chunk in report.progress(batches, progress, desc=desc, unit="batch", leave=False):
        if governor is not None:
            governor.tick()
        if sft:
            batch = S.collate_pairs(chunk, pad_id)
            logp, hit = S.completion_logprobs(model, batch)
            loss_sum -= float(logp.sum())
            tokens += logp.numel()
            misses = torch.zeros(len(chunk), device=hit.device).index_add(0, batch["score_item"].to(hit.device),
                                                                          (~hit).float())
            correct += int((misses == 0).sum())
            continue
        batch = D.collate(chunk, pad_id)
        scores = D.option_scores(model, batch)
        labels = batch["labels"].to(scores.device)
        hits = scores.argmax(1) == labels
        correct += int(hits.sum())
        loss_sum += float(D.option_loss(scores, labels)) * len(chunk)
        for label, hit in zip(labels.tolist(), hits.tolist()):
            counts = per_class.setdefault(label, [0, 0])
            counts[0] += hit
            counts[1] += 1
    model.train(was_training)
    n = max(len(items), 1)
    if sft:
        loss = loss_sum / max(tokens, 1)
        short = all(len(it["completion"]) <= S.SHORT_ANSWER for it in items)
        return {"loss": loss, "perplexity": S.perplexity(loss), "exact_match": correct / n if short else None,
                "n": len(items), "tokens": tokens}
    return {"accuracy": correct / n, "loss": loss_sum / n, "n": len(items),
            "per_class": {label: c / k for label, (c, k) in sorted(per_class.items())}}


def describe(ev, part="dev") -> str:
    """An evaluate() result in words: 'dev accuracy 0.850 (loss 0.4123)' or, for sft, 'dev loss 2.3100
    (perplexity 10.07, exact match 0.450)'."""
    if "accuracy" in ev:
        return f"{part} accuracy {ev['accuracy']:.3f} (loss {ev['loss']:.4f})"
    exact = f", exact match {ev['exact_match']:.3f}" if ev["exact_match"] is not None else ""
    return f"{part} loss {ev['loss']:.4f} (perplexity {ev['perplexity']:.2f}{exact})"


def better(ev, best) -> bool:
    """Whether a dev result beats the best so far, (epoch, accuracy, loss): higher accuracy, then lower loss; sft
    (no accuracy): lower loss."""
    if ev is None or best is None:
        return True
    if ev.get("accuracy") is None:
        return ev["loss"] < best[2]
    return ev["accuracy"] > best[1] or (ev["accuracy"] == best[1] and ev["loss"] < best[2])


def majority_baseline(train, test) -> dict:
    """Always answering the class most frequent in `train` (ties: the first class): its accuracy on `test`, the
    bar a fine-tuned (or zero-shot) model must clear on an unbalanced set."""
    counts = collections.Counter(e.label for e in train)
    label = max(sorted(counts), key=lambda c: counts[c]) if counts else 0
    return {"label": label, "test_accuracy": sum(e.label == label for e in test) / max(len(test), 1)}


def most_frequent_answer(train, test) -> dict | None:
    """sft: always answering the completion most frequent in `train` (encoded items, compared as tokens; ties: the
    first seen): its exact match on `test`, the bar for short answers drawn from a few labels. None when no
    completion occurs twice in `train` (free-form answers have no such bar)."""
    answer, count = (collections.Counter(tuple(item["completion"]) for item in train).most_common(1) or [((), 0)])[0]
    if count < 2:
        return None
    return {"answer": list(answer),
            "test_exact_match": sum(tuple(item["completion"]) == answer for item in test) / max(len(test), 1)}


# ---------------------------------------------------------------------------------------------------- methods
DISTRIBUTED = ("none", "ddp", "fsdp")


@dataclasses.dataclass
class World:
    """The processes of a --distributed run (torchrun or accelerate launch set RANK and WORLD_SIZE), or one."""
    mode: str = "none"
    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def start_world(s) -> World:
    """Join the launcher's process group for --distributed ddp / fsdp (gloo on the CPU, nccl on GPUs)."""
    if s.distributed not in DISTRIBUTED:
        raise FinetuneError(f"--distributed must be one of {', '.join(DISTRIBUTED)}, got {s.distributed!r}")
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if s.distributed == "none":
        if launched > 1:
            raise FinetuneError(f"this process is one of {launched} started by a launcher (torchrun, accelerate "
                                "launch): add --distributed ddp or --distributed fsdp")
        return World()
    if "RANK" not in os.environ:
        raise FinetuneError(f"--distributed {s.distributed} runs one process per device under a launcher: "
                            "torchrun --nproc_per_node N -m randmask finetune ... (or accelerate launch -m ...)")
    import torch.distributed as dist

    if s.device.startswith("cuda") or (s.device == "auto" and torch.cuda.is_available()):
        s.device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(s.device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if s.device.startswith("cuda") else "gloo")
    return World(s.distributed, dist.get_rank(), dist.get_world_size())


def stop_world() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        import randmask.distributed

        randmask.distributed.stop()


def distribute(model, method: str, params, world: World) -> None:
    """Make the ranks train as one: fsdp shards the frozen base of a randmask model (the deltas replicated); ddp
    keeps every rank's copy and averages the trainable values' gradients after each backward."""
    if world.size == 1:
        return
    import randmask.distributed

    if world.mode == "fsdp":
        blocks = set(getattr(model, "_no_split_modules", None) or ())  # transformers' decoder-layer classes
        randmask.distributed.fully_shard(model, [m for m in model.modules() if type(m).__name__ in blocks])
    else:
        randmask.distributed.average_gradients(params)


def apply_method(model, method: str, s, log):
    """Apply the method; returns (model, trainable params, info dict). On a quantized base randmask runs additive
    (RandMaskConfig's mode "auto") and lora is QLoRA: PEFT picks its bitsandbytes LoRA layers."""
    total = randmask.count_parameters(model)
    targets = "all-linear" if tuple(s.targets) == ("all-linear",) else tuple(s.targets)
    if method == "randmask":
        ratio = None if s.density is not None else (s.trainable_ratio or DEFAULT_RATIO)
        cfg = randmask.RandMaskConfig(density=s.density, trainable_ratio=ratio, target_modules=targets,
                                      seed=s.seed)
        try:
            randmask.apply(model, cfg)
        except ValueError as exc:
            raise FinetuneError(f"randmask: {exc}") from None
        info = {"config": cfg.to_dict()}
    elif method == "lora":
        models.quiet_bitsandbytes()
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


def step_loss(model, items, pad, world: World):
    """(the batch's mean loss, what to backpropagate). Several ranks: this rank's share of the items, its loss
    weighted by its share of what the mean runs over (items, or sft completion tokens) so that the averaged
    gradients are the whole batch's; the mean loss all-reduced for the log. A rank without an item of a small last
    batch still runs one (weighted 0): FSDP's collectives need every rank."""
    if world.size == 1:
        loss = batch_loss(model, items, pad)
        return loss, loss
    import torch.distributed as dist

    mine = items[world.rank::world.size]
    share = loss_weight(mine) / loss_weight(items)
    local = batch_loss(model, mine or items[:1], pad)
    mean = local.detach() * share
    dist.all_reduce(mean)
    return mean, local * (share * world.size)


def make_optimizer(method, params, lr):
    if method == "randmask":  # AdamW with the merged-weight write fused in
        return randmask.MaskedAdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def restore_snapshot(model, snap) -> None:
    for n, p in model.named_parameters():
        if n in snap:
            p.copy_(snap[n])
    for _, layer in randmask.masked_layers(model):
        layer.sync()  # write W0 + delta for the restored deltas now


def save_trained(model, method, out_dir) -> tuple[str, int]:
    """Write the trained values; returns (path, bytes on disk)."""
    if method == "randmask":
        path = os.path.join(out_dir, "randmask_adapter.safetensors")
        randmask.save_adapter(model, path)
        return path, os.path.getsize(path)
    path = os.path.join(out_dir, "lora_adapter" if method == "lora" else "full_model")
    if os.path.isdir(path):
        shutil.rmtree(path)
    # no embedding layer is trained or resized here: PEFT's "auto" would look the base's config up on the hub
    model.save_pretrained(path, **({"save_embedding_layers": False} if method == "lora" else {}))
    size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)
    return path, size


# ---------------------------------------------------------------------------------------------------- checkpoints
CHECKPOINT_FORMAT = "randmask-finetune-checkpoint"
CHECKPOINT_VERSION = 1
# Settings that do not change what is trained: a run may be resumed with other values of these.
CHECKPOINT_FREE = ("output_dir", "progress", "threads", "resume", "checkpoint_every", "methods", "verbose")


def checkpoint_path(out_dir, method) -> str:
    return os.path.join(out_dir, f"checkpoint-{method}.pt")


def plain_value(value):
    """Tuples as lists, all the way down: a setting as JSON and a checkpoint hold it."""
    if isinstance(value, (tuple, list)):
        return [plain_value(v) for v in value]
    return value


def checkpoint_settings(s, method) -> dict:
    """The settings a checkpoint must agree with to be resumed (the resolved ones: dtype, device and lr)."""
    import dataclasses

    values = {k: plain_value(v) for k, v in dataclasses.asdict(s).items() if k not in CHECKPOINT_FREE}
    return {"method": method, **values}


def save_checkpoint(path, state) -> None:
    """torch.save `state` to `path` atomically: a unique temporary file in the same directory, flushed and fsynced,
    then renamed over `path`; the temporary is removed on any failure, so `path` is always a whole checkpoint."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0o022)  # reading the umask means setting it: put it straight back
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # the mode open() gives, as other tools' checkpoints (mkstemp's is 0600)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:  # make the rename itself durable
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def load_checkpoint(path) -> dict:
    """A checkpoint written by save_checkpoint; FinetuneError if it is not one."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise FinetuneError(f"--resume: {path} is not a readable checkpoint ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else ''}); run without --resume to start "
                            "over") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise FinetuneError(f"--resume: {path} is not a randmask finetune checkpoint")
    if state.get("version") != CHECKPOINT_VERSION:
        raise FinetuneError(f"--resume: {path} has checkpoint version {state.get('version')!r}, this randmask "
                            f"reads version {CHECKPOINT_VERSION}; run without --resume to start over")
    return state


def check_checkpoint(state, path, s, method) -> None:
    """FinetuneError naming the settings that differ between the checkpoint and this run."""
    want, have = checkpoint_settings(s, method), state.get("settings", {})
    diff = [k for k in sorted(set(want) | set(have)) if want.get(k) != have.get(k)]
    if diff:
        shown = "; ".join(f"{'--' + k.replace('_', '-') if k != 'method' else 'method'} {have.get(k)!r} there, "
                          f"{want.get(k)!r} here" for k in diff[:4]) + ("; ..." if len(diff) > 4 else "")
        raise FinetuneError(f"--resume: the checkpoint {path} was written with other settings ({shown}); resume "
                            "with the same options, or run without --resume to start over")


def _rng_states(device):
    states = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and str(device).startswith("cuda"):
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states):
    torch.set_rng_state(states["torch"])
    random.setstate(_tuples(states["python"]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


# ---------------------------------------------------------------------------------------------------- one method
def train_one(method, model, tokenizer_pad, train, dev, test, s, log, governor=None, checkpoint=None,
              world: World | None = None) -> dict:
    """Train `method` on the encoded `train` items, keep the best epoch on `dev`, evaluate on `test` and save the
    trained values to s.output_dir; returns the method's record (the "methods" entries of metrics.json).

    A checkpoint (checkpoint_path(s.output_dir, method): the trainable values, the optimizer state, the epoch's
    batch order and position, the data and torch RNG states, the losses, the dev history and the best epoch's
    values) is written atomically after every epoch and, with s.checkpoint_every, every that many steps.
    `checkpoint` (a load_checkpoint result, checked by check_checkpoint) continues from it: the model must be as
    the run had it before apply_method; the final values are bitwise those of an uninterrupted run.

    With `world` of several ranks, each step's batch is split across them (rank r takes every world.size-th example
    from the r-th) and the gradients are those of the whole batch's mean loss; rank 0 alone writes files."""
    governor = governor or _NoGovernor()
    world = world or World()
    start = time.perf_counter()
    report.reset_peak_rss()  # this method's peak, not an earlier one's
    model, params, info = apply_method(model, method, s, log)
    if s.lr == "auto":
        # randmask: the ratio asked for (the counts round it a little), else the share --density gives
        lr, rule = auto_lr(method, s.trainable_ratio or (info["trainable_ratio"] if s.density else DEFAULT_RATIO))
        log(f"[{method}] learning rate {lr:.3g} from the rule {rule}")
    else:
        lr, rule = float(s.lr), "given with --lr"
        log(f"[{method}] learning rate {lr:g} (given)")
    log(f"[{method}] trainable {info['trainable']:,} of {info['total_params']:,} parameters "
        f"({100 * info['trainable_ratio']:.4f}%)")
    distribute(model, method, params, world)
    opt = make_optimizer(method, params, lr)
    rng = random.Random(s.seed)
    losses, dev_hist, best, snap = [], [], None, None
    steps_per_epoch = math.ceil(len(train) / s.batch_size)
    train_time = 0.0
    epoch, pos, batches = 1, 0, None
    ck_path = checkpoint_path(s.output_dir, method) if s.output_dir else None

    if checkpoint is not None:
        trained = checkpoint["trainable"]
        names = {n for n, p in model.named_parameters() if p.requires_grad}
        if set(trained) != names:
            raise FinetuneError(f"[{method}] --resume: the checkpoint's trainable values do not match this "
                                "model's; run without --resume to start over")
        restore_snapshot(model, trained)
        opt.load_state_dict(checkpoint["optimizer"])
        rng.setstate(_tuples(checkpoint["data_rng"]))
        losses, dev_hist = list(checkpoint["losses"]), list(checkpoint["history"])
        best = tuple(checkpoint["best"]) if checkpoint["best"] is not None else None
        snap, train_time = checkpoint["best_values"], checkpoint["train_time"]
        epoch, pos, batches = checkpoint["epoch"], checkpoint["pos"], [list(b) for b in checkpoint["batches"]]
        if checkpoint["epoch_done"]:
            epoch, pos, batches = epoch + 1, 0, None
        _set_rng_states(checkpoint["rng"])
        log(f"[{method}] resumed from {ck_path} at step {len(losses)} (epoch {min(epoch, s.epochs)}"
            + (f", step {pos} of {len(batches)}" if batches else "") + ")")

    def save(epoch_done, elapsed):
        if ck_path is None or not world.main:  # every rank holds the same trainable values and optimizer state
            return
        save_checkpoint(ck_path, {
            "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "settings": checkpoint_settings(s, method),
            "trainable": {n: p.detach() for n, p in model.named_parameters() if p.requires_grad},
            "optimizer": opt.state_dict(), "data_rng": rng.getstate(), "rng": _rng_states(s.device),
            "epoch": epoch, "pos": pos, "batches": batches, "epoch_done": epoch_done, "step": len(losses),
            "losses": losses, "history": dev_hist, "best": best, "best_values": snap,
            "train_time": train_time + elapsed})

    model.train()
    while epoch <= s.epochs:
        t0 = time.perf_counter()
        if batches is None:
            batches = train_batches(train, s.batch_size, rng, s.group_by_length)
        bar = report.progress(batches[pos:], s.progress, desc=f"[{method}] epoch {epoch}/{s.epochs}", unit="step",
                              total=len(batches), initial=pos)
        for idx in bar:
            governor.tick()
            loss, objective = step_loss(model, [train[i] for i in idx], tokenizer_pad, world)
            if not torch.isfinite(loss):
                raise FinetuneError(f"[{method}] the loss became {float(loss)} at step {len(losses) + 1}: "
                                    f"lower the learning rate (now {lr:g})")
            opt.zero_grad(set_to_none=True)
            objective.backward()
            if s.clip and s.clip > 0:
                torch.nn.utils.clip_grad_norm_(params, s.clip)
            opt.step()
            losses.append(loss.item())
            pos += 1
            if s.progress:
                bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")
            if s.checkpoint_every and len(losses) % s.checkpoint_every == 0 and pos < len(batches):
                save(False, time.perf_counter() - t0)  # the epoch's end writes its own
        train_time += time.perf_counter() - t0
        ev = evaluate(model, dev, s.eval_batch_size, tokenizer_pad, s.progress, f"[{method}] dev",
                      governor) if dev else None
        mean_loss = sum(losses[-steps_per_epoch:]) / steps_per_epoch
        dev_hist.append({"epoch": epoch, "train_loss": mean_loss, "dev_accuracy": ev and ev.get("accuracy"),
                         "dev_loss": ev and ev["loss"], "step": len(losses)}
                        | ({"dev_exact_match": ev and ev["exact_match"]} if is_sft(dev) else {}))
        log(f"[{method}] epoch {epoch}: train loss {mean_loss:.4f}" + (f", {describe(ev)}" if ev else ""))
        if better(ev, best):
            best = (epoch, ev and ev.get("accuracy"), ev and ev["loss"])
            snap = snapshot(model) if epoch < s.epochs else None  # the last epoch's values are the model's
        save(True, 0.0)
        epoch, pos, batches = epoch + 1, 0, None
    if best[0] != s.epochs:
        restore_snapshot(model, snap)
        log(f"[{method}] restored the best epoch ({best[0]}: "
            + (f"dev accuracy {best[1]:.3f})" if best[1] is not None else f"dev loss {best[2]:.4f})"))
    snap = None  # free the best epoch's copy
    ev_test = evaluate(model, test, s.eval_batch_size, tokenizer_pad, s.progress, f"[{method}] test", governor)
    adapter, size = save_trained(model, method, s.output_dir) if world.main else (s.output_dir, 0)
    result = {"method": method, **info, "lr": lr, "lr_rule": rule, "epochs": s.epochs, "steps": len(losses),
              "best_epoch": best[0], "best_dev_accuracy": best[1], "best_dev_loss": best[2],
              **{f"test_{k}": v for k, v in ev_test.items() if k not in ("n", "tokens")},
              "history": dev_hist, "train_loss": losses,
              "train_seconds": train_time, "seconds": time.perf_counter() - start,
              "seconds_per_step": train_time / max(len(losses), 1), "adapter": os.path.relpath(adapter,
                                                                                               s.output_dir),
              "adapter_bytes": size, "peak_rss_mib": report.peak_rss_mib()}
    if torch.cuda.is_available() and s.device.startswith("cuda"):
        result["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return result
