"""Instruction tuning for `randmask finetune --task sft`: prompt -> completion pairs, the loss on the completion only.

    records    a data file (randmask.recipes.files) with a `prompt` and a `completion` column (plain text), or chat
               `messages` ([{"role", "content"}, ...], the last one the assistant's answer; also TRL's
               conversational prompt / completion, two lists of messages), rendered by the model's chat template
    tokens     plain:  prompt = tokenizer(prompt) (its special tokens included), completion = tokenizer(completion,
                       no special tokens) + [eos] (the model learns to stop)
               chat:   prompt = template(messages[:-1], add_generation_prompt), completion = the rest of
                       template(messages) (the answer and its end-of-turn marker)
    loss       the mean over every completion token of the batch of -log p(token | all tokens before it); prompt
               tokens are context, never targets
    metrics    held-out loss (the same mean over all completion tokens), perplexity exp(loss) and, when every
               completion is a short answer (at most SHORT_ANSWER tokens), exact match: the share of items whose
               every completion token is the model's argmax given the tokens before it; teacher-forced, that is
               exactly "greedy decoding writes the completion", in one forward pass
"""
import dataclasses
import json
import math
import os

import torch
import torch.nn.functional as F

from randmask.recipes import DataError
from randmask.recipes.data import position_logits, right_padded
from randmask.recipes.files import read_table

__all__ = ["Pair", "Pairs", "SHORT_ANSWER", "load_pairs", "encode_pairs", "collate_pairs", "completion_logprobs",
           "completion_loss", "perplexity", "tokens_of"]

SHORT_ANSWER = 16  # completion tokens (end marker included) up to which exact match is reported


@dataclasses.dataclass(frozen=True)
class Pair:
    prompt: str = ""  # plain text, or (with messages) unused
    completion: str = ""
    messages: tuple = ()  # ((role, content), ...) for chat data, the last one the answer

    def key(self) -> str:
        return json.dumps(self.messages[:-1]) if self.messages else self.prompt


@dataclasses.dataclass
class Pairs:
    name: str
    examples: list[Pair]
    dropped: int = 0  # records skipped: an empty completion, a repeated prompt
    chat: bool = False


def _messages(value, path, number) -> tuple:
    if not isinstance(value, list) or not all(isinstance(m, dict) and "role" in m and "content" in m
                                              for m in value):
        raise DataError(f"{path!r} record {number}: messages must be a list of {{\"role\", \"content\"}} objects")
    return tuple((str(m["role"]), str(m["content"])) for m in value)


def load_pairs(path, prompt_column: str = "prompt", completion_column: str = "completion", encoding=None,
               delimiter=None, header: bool = True, name=None) -> Pairs:
    """Prompt -> completion records from a data file: plain text in `prompt_column` / `completion_column`, or chat
    in a `messages` column (or lists of messages in both columns, TRL's conversational prompt-completion). Records
    with an empty completion are dropped, and so are repeated prompts (all but the first: no prompt is in two
    splits)."""
    path = os.fspath(path)
    rows, columns = read_table(path, delimiter=delimiter, header=header, encoding=encoding)
    chat = "messages" in columns and prompt_column not in columns
    if not chat:
        for role, column in (("prompt", prompt_column), ("completion", completion_column)):
            if column not in columns:
                raise DataError(f"data file {path!r} has no {role} column {column!r}; its columns are {columns} "
                                f"(choose with --{role}-column, or give chat records in a 'messages' column)")
    pairs, seen, dropped = [], set(), 0
    for number, r in enumerate(rows, 1):
        if chat or isinstance(r.get(prompt_column), list):
            chat = True
            messages = (_messages(r.get("messages"), path, number) if "messages" in r else
                        _messages(r.get(prompt_column), path, number) + _messages(r.get(completion_column), path,
                                                                                  number))
            pair = Pair(messages=messages)
            empty = len(messages) < 2 or messages[-1][0] != "assistant" or not messages[-1][1].strip()
        else:
            prompt, completion = r.get(prompt_column), r.get(completion_column)
            pair = Pair(prompt="" if prompt is None else str(prompt),
                        completion="" if completion is None else str(completion))
            empty = not pair.completion.strip()
        if empty or pair.key() in seen:
            dropped += 1
            continue
        seen.add(pair.key())
        pairs.append(pair)
    if not pairs:
        raise DataError(f"data file {path!r} holds no usable prompt -> completion record (an empty completion, or "
                        "a chat whose last message is not the assistant's, is skipped)")
    return Pairs(name or os.path.basename(path), pairs, dropped, chat)


def tokens_of(tokenizer, pair: Pair) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) of one record, as the module docstring says."""
    if pair.messages:
        if not getattr(tokenizer, "chat_template", None):
            raise DataError("the data holds chat messages but the model's tokenizer has no chat template: give "
                            "plain prompt / completion records, or a model with a chat template")
        messages = [{"role": role, "content": content} for role, content in pair.messages]
        prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
        whole = tokenizer.apply_chat_template(messages, tokenize=False)
        if not whole.startswith(prompt):
            raise DataError("the model's chat template renders a conversation that does not start with its own "
                            "generation prompt: the answer's tokens cannot be told apart")
        ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        return ids, list(tokenizer(whole[len(prompt):], add_special_tokens=False)["input_ids"])
    ids = list(tokenizer(pair.prompt, add_special_tokens=True)["input_ids"])
    completion = list(tokenizer(pair.completion, add_special_tokens=False)["input_ids"])
    eos = getattr(tokenizer, "eos_token_id", None)
    return ids, completion + ([eos] if eos is not None else [])


def encode_pairs(tokenizer, pairs, max_length: int) -> tuple[list[dict], int]:
    """({"prompt": ids, "completion": ids} per record, how many were cut to max_length). A record too long keeps
    its completion's start (up to max_length minus half the room, or less when the prompt is short) and the end of
    its prompt (a leading BOS kept)."""
    if max_length < 2:
        raise DataError(f"max length {max_length} leaves no room for a prompt and a completion")
    bos = getattr(tokenizer, "bos_token_id", None)
    out, cut = [], 0
    for pair in pairs:
        prompt, completion = tokens_of(tokenizer, pair)
        if not completion:
            raise DataError(f"the completion of {pair.key()[:60]!r} tokenizes to nothing")
        if not prompt:  # nothing before the completion's first token predicts it
            raise DataError(f"a record has an empty prompt and the tokenizer adds no BOS token: give every record "
                            f"a prompt (completion {pair.completion[:60]!r})")
        if len(prompt) + len(completion) > max_length:
            cut += 1
            completion = completion[:max_length - min(len(prompt), max_length // 2)]
            room = max_length - len(completion)
            keep_bos = bos is not None and prompt[0] == bos and room > 1
            prompt = ([prompt[0]] if keep_bos else []) + prompt[len(prompt) - room + keep_bos:]
        out.append({"prompt": prompt, "completion": completion})
    return out, cut


def collate_pairs(items: list[dict], pad_id: int = 0) -> dict:
    """One batch: rows prompt + completion, right-padded (no attention mask needed under causal attention, as
    data.collate); score_row / score_pos / score_token: each completion token, the position whose logits predict it
    (the one before); score_item: its item. Every prompt holds at least one token (encode_pairs)."""
    rows, srow, spos, stok, sitem = [], [], [], [], []
    for i, it in enumerate(items):
        ids = it["prompt"] + it["completion"]
        for t in range(len(it["prompt"]), len(ids)):
            srow.append(i)
            spos.append(t - 1)
            stok.append(ids[t])
            sitem.append(i)
        rows.append(ids)
    as_long = lambda v: torch.tensor(v, dtype=torch.long)  # noqa: E731
    return {"input_ids": right_padded(rows, pad_id), "score_row": as_long(srow), "score_pos": as_long(spos),
            "score_token": as_long(stok), "score_item": as_long(sitem), "n_items": len(items)}


def completion_logprobs(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p of every completion token, whether it is the argmax), both (scored tokens,)."""
    device = next(model.parameters()).device
    logits = position_logits(model, batch["input_ids"].to(device), batch["score_row"].to(device),
                             batch["score_pos"].to(device)).float()
    target = batch["score_token"].to(device)
    logp = F.log_softmax(logits, dim=-1).gather(1, target[:, None]).squeeze(1)
    return logp, logits.argmax(-1) == target


def completion_loss(model, batch: dict) -> torch.Tensor:
    """Mean over the batch's completion tokens of -log p(token | the tokens before it)."""
    logp, _ = completion_logprobs(model, batch)
    return -logp.mean()


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 700.0))
