"""`randmask finetune --task sft` (randmask/recipes/sft.py and its use in train.py / finetune.py): records, tokens and
truncation, the loss on the completion tokens only against a hand computation, exact match, and a tiny model trained
end to end on a generated JSONL (plain and chat) whose held-out loss goes down."""
import collections
import json
import math
import os

import pytest
import torch
from test_data import Bigram
from test_finetune import current_umask, strings
from tiny_task import CHAT_TEMPLATE, run_cli, save_tiny_model_dir, tiny_tokenizer, write_sft_jsonl

from randmask.recipes import DataError
from randmask.recipes import sft as S
from randmask.recipes import train as T

TABLE = torch.tensor([[0.0, 1.0, 2.0, 0.5],
                      [0.0, 0.0, 3.0, 1.0],     # after 1 the argmax is 2
                      [0.0, 0.0, 0.0, 2.0],     # after 2: 3
                      [2.0, -2.0, 0.0, 1.0]])   # after 3: 0


def logp(prev, nxt):  # log softmax of row prev at nxt, by hand
    row = TABLE[prev].tolist()
    return row[nxt] - math.log(sum(math.exp(v) for v in row))


# The first completion (2, 3) is what greedy decoding writes after (0, 1); the second (1 after 3) is not.
ITEMS = [{"prompt": [0, 1], "completion": [2, 3]}, {"prompt": [3], "completion": [1]}]


def test_loss_is_on_the_completion_tokens_only():
    model = Bigram(TABLE.clone())
    expected = -(logp(1, 2) + logp(2, 3) + logp(3, 1)) / 3  # prompt tokens (0 -> 1) are never targets
    loss = T.batch_loss(model, ITEMS, pad_id=0)
    assert float(loss) == pytest.approx(expected, abs=1e-6)
    loss.backward()
    # token 0 only precedes a prompt token: its row of the table gets no gradient
    assert model.table.grad[0].abs().sum() == 0 and model.table.grad[1:].abs().sum() > 0
    assert T.loss_weight(ITEMS) == 3


def test_evaluate_gives_loss_perplexity_and_exact_match():
    ev = T.evaluate(Bigram(TABLE.clone()), ITEMS, batch_size=1, pad_id=0)
    expected = -(logp(1, 2) + logp(2, 3) + logp(3, 1)) / 3  # over tokens, not items, whatever the batching
    assert ev["loss"] == pytest.approx(expected, abs=1e-6) and ev["tokens"] == 3 and ev["n"] == 2
    assert ev["perplexity"] == pytest.approx(math.exp(expected), rel=1e-6)
    assert ev["exact_match"] == 0.5
    long = [{"prompt": [0], "completion": [1] * (S.SHORT_ANSWER + 1)}]
    assert T.evaluate(Bigram(TABLE.clone()), long, 4, 0)["exact_match"] is None  # not a short answer


def test_most_frequent_answer_is_the_bar_for_repeated_short_answers():
    def items(*completions):
        return [{"prompt": [0], "completion": list(c)} for c in completions]

    train = items((1, 2), (3,), (1, 2), (3,), (1, 2))
    assert T.most_frequent_answer(train, items((1, 2), (3,), (1, 2, 0))) == {"answer": [1, 2],
                                                                            "test_exact_match": 1 / 3}
    assert T.most_frequent_answer(items((3,), (1,), (1,), (3,)), items((3,), (3,)))["answer"] == [3]  # tie: first
    assert T.most_frequent_answer(items((1,), (2,), (3,)), items((1,))) is None  # free-form: no answer repeats


def test_tokens_plain_chat_and_truncation():
    tok = tiny_tokenizer()
    ids = tok.convert_tokens_to_ids
    plain = S.Pair(prompt="the car was good It was", completion="yes great")
    assert S.tokens_of(tok, plain) == (ids(["the", "car", "was", "good", "It", "was"]), ids(["yes", "great"]))
    tok.eos_token = "no"  # an EOS ends every plain completion: the model learns to stop
    assert S.tokens_of(tok, plain)[1] == ids(["yes", "great", "no"])
    tok.eos_token = None
    (item,), cut = S.encode_pairs(tok, [S.Pair(prompt=" ".join(["car"] * 30) + " It was", completion="yes great")],
                                  max_length=8)
    assert cut == 1 and item["completion"] == ids(["yes", "great"])  # the completion's start is kept
    assert item["prompt"] == ids(["car"] * 4 + ["It", "was"])  # and the end of the prompt
    with pytest.raises(DataError, match="empty prompt"):
        S.encode_pairs(tok, [S.Pair(prompt="", completion="yes")], 8)

    chat = S.Pair(messages=(("user", "the car was good"), ("assistant", "yes great")))
    with pytest.raises(DataError, match="no chat template"):
        S.tokens_of(tok, chat)
    tok.chat_template = CHAT_TEMPLATE
    prompt, completion = S.tokens_of(tok, chat)
    # "user the car was good . assistant " | "yes great . " (the template's end marker is part of the answer)
    assert tok.decode(prompt) == "[UNK] the car was good [UNK] [UNK]"
    assert completion == ids(["yes", "great", "[UNK]"])


def test_load_pairs_reads_plain_chat_and_trl_records(tmp_path):
    rows = [{"prompt": "a", "completion": "yes"}, {"prompt": "b", "completion": " "},  # empty: dropped
            {"prompt": "a", "completion": "no"}, {"prompt": "c", "completion": "no"}]  # repeated prompt: dropped
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    pairs = S.load_pairs(path)
    assert [(p.prompt, p.completion) for p in pairs.examples] == [("a", "yes"), ("c", "no")]
    assert pairs.dropped == 2 and not pairs.chat

    chat = write_sft_jsonl(tmp_path / "chat.jsonl", n=4, chat=True)
    pairs = S.load_pairs(chat)
    assert pairs.chat and len(pairs.examples) == 4 and pairs.examples[1].messages[-1] == ("assistant", "yes great")
    trl = tmp_path / "trl.jsonl"  # TRL's conversational prompt-completion: two lists of messages
    trl.write_text(json.dumps({"prompt": [{"role": "user", "content": "hi"}],
                               "completion": [{"role": "assistant", "content": "yes"}]}))
    assert S.load_pairs(trl).examples[0].messages == (("user", "hi"), ("assistant", "yes"))

    wrong = tmp_path / "w.jsonl"
    wrong.write_text(json.dumps({"question": "a", "answer": "b"}))
    with pytest.raises(DataError, match="no prompt column 'prompt'.*--prompt-column"):
        S.load_pairs(wrong)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": "hello"}))
    with pytest.raises(DataError, match="record 1: messages must be a list"):
        S.load_pairs(bad)


@pytest.mark.parametrize("chat", [False, True])
def test_sft_end_to_end_lowers_the_held_out_loss(tmp_path, capsys, chat):
    model_dir = save_tiny_model_dir(tmp_path / "model")
    if chat:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_dir)
        tok.chat_template = CHAT_TEMPLATE
        tok.save_pretrained(model_dir)
    data = write_sft_jsonl(tmp_path / "qa.jsonl", chat=chat)
    out_dir = tmp_path / "run"
    code, out, err = run_cli(capsys, "finetune", "--task", "sft", "--model", str(model_dir), "--data", str(data),
                             "--split", "60,20,40", "--epochs", "3", "--density", "0.25", "--lr", "0.05",
                             "--dtype", "float32", "--threads", "1", "--output-dir", str(out_dir), "--no-progress")
    assert code == 0, err
    metrics = json.loads((out_dir / "metrics.json").read_text())
    zero, tuned = metrics["zero_shot"], metrics["methods"]["randmask"]
    assert metrics["task"] == "sft" and metrics["chat"] == chat and metrics["records"] == 120
    # it learnt the answers: a random tiny model's logits stay flat (its loss moves little), but its greedy answers
    # go from none right to many (plain: two tokens; chat adds the template's end marker, which 24 steps do not get)
    assert tuned["test_loss"] < zero["test_loss"] - 0.1
    assert tuned["test_perplexity"] == pytest.approx(math.exp(tuned["test_loss"]))
    assert zero["test_exact_match"] == 0 and (chat or tuned["test_exact_match"] >= 0.25)
    assert "perplexity" in out and "exact match" in out and "zero-shot test loss" in out

    # the adapter reproduces the reported held-out loss on a fresh base
    import randmask
    from randmask.recipes import finetune as F
    from randmask.recipes.models import load_model

    model, tok = load_model(str(model_dir), "float32", "cpu")
    randmask.load_adapter(model, out_dir / "randmask_adapter.safetensors")
    task = F.prepare_task(F.Settings(task="sft", model=str(model_dir), data=str(data), split=(60, 20, 40),
                                     threads=1, progress=False), log=lambda *a: None)
    ev = T.evaluate(model, task.enc["test"], 32, task.pad)
    assert ev["loss"] == pytest.approx(tuned["test_loss"], rel=1e-5)
    # the most frequent answer's bar, counted here on the answers' text
    answers = {part: [p.messages[-1][1] if chat else p.completion for p in getattr(task, part)]
               for part in ("train", "test")}
    top = collections.Counter(answers["train"]).most_common(1)[0][0]
    assert metrics["majority"]["text"].endswith(top)
    assert metrics["majority"]["test_exact_match"] == answers["test"].count(top) / len(answers["test"])
    assert f"always answering {metrics['majority']['text']!r}" in out
    # shareable outputs: group-readable files, no absolute local paths
    assert [text for text in strings(metrics) if os.path.isabs(text)] == []
    for name in ("metrics.json", "randmask_adapter.safetensors", "loss_curve.png", "checkpoint-randmask.pt"):
        assert (out_dir / name).stat().st_mode & 0o777 == 0o666 & ~current_umask()


def test_sft_full_fine_tuning_through_the_same_flags(tmp_path, model_dir, capsys):
    data = write_sft_jsonl(tmp_path / "qa.jsonl")
    code, _, err = run_cli(capsys, "finetune", "--task", "sft", "--method", "full", "--model", str(model_dir),
                           "--data", str(data), "--split", "60,20,40", "--epochs", "1", "--lr", "3e-3", "--dtype",
                           "float32", "--threads", "1", "--output-dir", str(tmp_path / "full"), "--no-progress")
    assert code == 0, err
    metrics = json.loads((tmp_path / "full" / "metrics.json").read_text())
    full = metrics["methods"]["full"]
    assert full["trainable"] == full["total_params"] and full["test_loss"] < metrics["zero_shot"]["test_loss"]
    assert (tmp_path / "full" / "full_model" / "config.json").exists()
