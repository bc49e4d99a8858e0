"""randmask/recipes/data.py: the seeded split, labels and deduplication, the template and truncation, and the
option-likelihood loss against a hand computation."""
import json
import math
import types

import pytest
import torch
from tiny_task import tiny_model, tiny_tokenizer, write_csv

from randmask.recipes import data as D


def test_split_is_deterministic_and_seeded(csv_file):
    data = D.load_file(csv_file, "text", "label")
    a = D.split(data, 0, (60, 20, 40))
    b = D.split(data, 0, (60, 20, 40))
    c = D.split(data, 1, (60, 20, 40))
    assert a == b and a != c
    assert [len(part) for part in a] == [60, 20, 40]
    texts = [e.text for part in a for e in part]
    assert len(set(texts)) == len(texts)  # disjoint
    # Fixed by Python's random.Random, not torch: the same on every machine (pinned here).
    assert a[0][0] == D.split(data, 0, (1, 1, 1))[0][0] == D.Example("today it drive great 57", 1)
    # Too small for the sizes: split in proportion.
    small = D.split(data, 0, (1000, 500, 1000))
    assert [len(p) for p in small] == [48, 24, 48]


def test_labels_order_and_dedup(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [{"sentence": "a good ride", "y": 1}, {"sentence": "a bad ride", "y": 0},
            {"sentence": "a good ride", "y": 1}, {"sentence": "meh", "y": 2}, {"sentence": "", "y": 1}]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    data = D.load_file(path, "sentence", "y", labels=("0", "1"))
    assert data.classes == ("0", "1") and [e.label for e in data.examples] == [1, 0] and data.dropped == 3


def test_template_and_truncation_keep_the_options():
    tok = tiny_tokenizer()
    t = D.Template("{text} It was {option}", ("terrible", "great"))
    assert t.parts("nice car") == ("nice car It was", [" terrible", " great"])
    long_text = " ".join(["car"] * 100)
    (item,) = D.encode(tok, t, [D.Example(long_text, 1)], max_length=10)
    assert len(item["prompt"]) == 9 and tok.decode(item["prompt"][-2:]) == "It was"
    assert item["options"] == [[tok.convert_tokens_to_ids("terrible")], [tok.convert_tokens_to_ids("great")]]
    with pytest.raises(D.DataError, match="end the template"):
        D.Template("{option} {text}")


class Bigram(torch.nn.Module):
    """A toy LM whose next-token logits depend only on the current token: logits = table[token]."""

    def __init__(self, table):
        super().__init__()
        self.table = torch.nn.Parameter(table)

    def forward(self, input_ids):
        return types.SimpleNamespace(logits=self.table[input_ids])


def test_option_loss_equals_a_hand_computation():
    table = torch.tensor([[0.0, 1.0, 2.0, 0.5],
                          [1.0, 0.0, -1.0, 2.0],
                          [0.3, 0.2, 0.1, 0.0],
                          [2.0, -2.0, 0.0, 1.0]])
    model = Bigram(table)

    def logp(prev, nxt):  # log softmax of row prev at nxt, by hand
        row = table[prev].tolist()
        return row[nxt] - math.log(sum(math.exp(v) for v in row))

    # Two examples; options are one token ([2] vs [3]) for the first, and 1 vs 2 tokens for the second.
    items = [{"prompt": [0, 1], "options": [[2], [3]], "label": 1},
             {"prompt": [3], "options": [[1, 2], [0]], "label": 0}]
    scores = D.option_scores(model, D.collate(items, pad_id=0))
    s0 = [logp(1, 2), logp(1, 3)]
    s1 = [(logp(3, 1) + logp(1, 2)) / 2, logp(3, 0)]  # the MEAN over an option's tokens
    assert scores.flatten().tolist() == pytest.approx(s0 + s1, abs=1e-6)

    def ce(s, y):
        return -(s[y] - math.log(sum(math.exp(v) for v in s)))

    loss = D.option_loss(scores, torch.tensor([1, 0]))
    assert float(loss) == pytest.approx((ce(s0, 1) + ce(s1, 0)) / 2, abs=1e-6)
    loss.backward()  # differentiable
    assert model.table.grad is not None and model.table.grad.abs().sum() > 0


def test_shared_prompt_pass_equals_one_row_per_option():
    """One-token options share the prompt's forward pass; the scores equal scoring each option in its own row, and
    right padding changes nothing."""
    tok = tiny_tokenizer()
    model = tiny_model(len(tok)).eval()
    examples = [D.Example("the car was good", 1), D.Example("bad road today and my ride was so very sad", 0)]
    items = D.encode(tok, D.Template(), examples, 64)
    with torch.no_grad():
        shared = D.option_scores(model, D.collate(items, 0))
        rows = D.option_scores(model, D.collate(items, 0, share_prompt=False))
        alone = torch.cat([D.option_scores(model, D.collate([it], 0)) for it in items])
        full = model(torch.tensor([items[0]["prompt"]])).logits[0, -1].log_softmax(-1)
    assert torch.allclose(shared, rows, atol=1e-5) and torch.allclose(shared, alone, atol=1e-5)
    assert torch.allclose(shared[0], full[[o[0] for o in items[0]["options"]]], atol=1e-5)


# ---------------------------------------------------------------------------------------------------- labels
def test_labels_other_than_the_demos_need_verbalizers(tmp_path):
    spam = write_csv(tmp_path / "spam.csv", labels=("ham", "spam"))
    data = D.load_file(spam, "text", "label")
    with pytest.raises(D.DataError) as err:
        D.verbalizers_for(data)  # never a guessed pairing
    message = str(err.value)
    assert "'ham' (60)" in message and "'spam' (60)" in message and "--verbalizers ham=WORD,spam=WORD" in message
    assert "\n" not in message
    # the mapping's order is the class order; other labels are dropped
    kept = D.load_file(spam, "text", "label", labels=("spam", "ham"))
    assert kept.classes == ("spam", "ham") and D.verbalizers_for(kept, (("spam", "yes"), ("ham", "no"))) == (
        "yes", "no")
    assert [e.label for e in kept.examples[:2]] == [1, 0]  # row 0 is ham (class 1 now), row 1 spam
    with pytest.raises(D.DataError, match="never holds"):
        D.load_file(spam, "text", "label", labels=("spam", "eggs"))
    # the demo's labels have their words, in the file's class order
    demo = D.load_file(write_csv(tmp_path / "demo.csv"), "text", "label")
    assert D.verbalizers_for(demo) == ("terrible", "great")


def test_three_classes_and_the_label_table(tmp_path):
    tok = tiny_tokenizer()
    path = write_csv(tmp_path / "three.csv", n=30, labels=("negative", "neutral", "positive"))
    data = D.load_file(path, "text", "label", labels=("negative", "neutral", "positive"))
    template = D.Template(verbalizers=D.verbalizers_for(data, (("negative", "terrible"), ("neutral", "no"),
                                                               ("positive", "great yes"))))
    assert template.parts("car") == ("car It was", [" terrible", " no", " great yes"])
    table = D.label_table(data, template, tok)
    assert table[0].split() == ["label", "examples", "verbalizer", "tokens"]
    assert [line.split() for line in table[1:]] == [["negative", "10", "'", "terrible'", "1"],
                                                    ["neutral", "10", "'", "no'", "1"],
                                                    ["positive", "10", "'", "great", "yes'", "2"]]
    (item,) = D.encode(tok, template, data.examples[:1], 64)
    assert [len(o) for o in item["options"]] == [1, 1, 2]
    # words the tokenizer maps to the same tokens cannot be told apart
    with pytest.raises(D.DataError, match="tokenize to the same tokens"):
        D.encode(tok, D.Template(verbalizers=("zebra", "yak")), data.examples[:1], 64)


def test_data_files_as_people_have_them(tmp_path):
    """A TSV without header, JSONL with number labels and compressed CSVs give the same dataset as the plain CSV;
    a header that is really data is named in the error."""
    import bz2
    import gzip

    plain = write_csv(tmp_path / "plain.csv", n=20, labels=("ham", "spam"))
    want = D.load_file(plain, "text", "label")
    rows = [line.split(",") for line in plain.read_text().splitlines()[1:]]
    tsv = tmp_path / "SMSSpamCollection"
    tsv.write_text("".join(f"{label}\t{text}\n" for text, label in rows))
    got = D.load_file(tsv, "2", "1", header=False)
    assert (got.classes, got.examples) == (want.classes, want.examples)
    with pytest.raises(D.DataError, match="no text column 'text'.*--no-header"):
        D.load_file(tsv, "text", "label")
    with pytest.raises(D.DataError, match="with --no-header the columns are named by position: 1 to 2"):
        D.load_file(tsv, "text", "label", header=False)
    with pytest.raises(D.DataError, match="the rows hold one field: give the file's --delimiter"):
        D.load_file(plain, "text", "label", delimiter=";")
    (tmp_path / "d.csv.gz").write_bytes(gzip.compress(plain.read_bytes()))
    (tmp_path / "d.csv.bz2").write_bytes(bz2.compress(plain.read_bytes()))
    for name in ("d.csv.gz", "d.csv.bz2"):
        got = D.load_file(tmp_path / name, "text", "label")
        assert (got.classes, got.examples) == (want.classes, want.examples)
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": text, "label": int(label == "spam"), "flag": label == "spam"})
                               for text, label in rows))
    numbers = D.load_file(jsonl, "text", "label")
    assert numbers.classes == ("0", "1") and [e.label for e in numbers.examples] == [e.label for e in want.examples]
    assert D.load_file(jsonl, "text", "flag").classes == ("false", "true")  # as the user types them
