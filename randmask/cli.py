"""`randmask` command line (also `python -m randmask`)."""
import argparse
import time

import torch

DEMO_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def demo(args) -> None:
    """Fine-tune a small Llama-shaped model (built from a config, no download) on a toy task with its linear layers
    masked, and show what changed: the loss, and exactly n weight entries per masked layer, everything else bitwise
    the same."""
    from tqdm import tqdm
    from transformers import LlamaConfig, LlamaForCausalLM

    from randmask import MaskedLinear

    torch.manual_seed(args.seed)
    config = LlamaConfig(vocab_size=64, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(config)
    model.requires_grad_(False)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    total = sum(p.numel() for p in before.values())
    masked = {}
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in args.targets and isinstance(child, torch.nn.Linear):
                full = f"{name}.{child_name}"
                masked[full] = MaskedLinear.from_linear(child, density=args.density, seed=args.seed, name=full)
                setattr(module, child_name, masked[full])
    deltas = [layer.delta for layer in masked.values()]
    trainable = sum(d.numel() for d in deltas)
    print(f"model: {total:,} parameters; masked {len(masked)} layers ({', '.join(args.targets)}) at density {args.density}: "
          f"{trainable:,} trainable ({100 * trainable / total:.3f}% of the model)")

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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="randmask", description="Random-Masking fine-tuning: train a fixed, "
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
    args = parser.parse_args(argv)
    args.run(args)
