"""Train a tiny Llama (built from a config, nothing downloaded) on the small corpus shipped in
examples/data, once with the plain cross entropy and once with R-Drop through
fastrdrop.integrations.transformers, and plot the training and validation losses.

    python examples/finetune_tiny_llama.py [--steps 300] [--out finetune_tiny_llama.png]

Byte-level tokens (V=256); the validation loss is the ordinary cross entropy with dropout off.
The plot needs matplotlib (``pip install matplotlib``); the README's figure is this run's, with
``--out examples/finetune_tiny_llama.png``.
"""

import argparse
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fastrdrop.integrations.transformers import rdrop_causal_lm_loss

CORPUS = Path(__file__).parent / "data" / "tiny_corpus.txt"
SEQ_LEN, BATCH = 64, 16


def batches(data, generator):
    """Random windows of SEQ_LEN bytes: input_ids [BATCH, SEQ_LEN]."""
    starts = torch.randint(0, len(data) - SEQ_LEN, (BATCH,), generator=generator)
    return torch.stack([data[s: s + SEQ_LEN] for s in starts.tolist()])


def make_model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=96, intermediate_size=256,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=SEQ_LEN, attention_dropout=0.3)
    return LlamaForCausalLM(config)


@torch.no_grad()
def validation_loss(model, data):
    model.eval()
    windows = data[: len(data) // SEQ_LEN * SEQ_LEN].view(-1, SEQ_LEN)
    loss = model(input_ids=windows, labels=windows).loss.item()
    model.train()
    return loss


def train(data, valid, steps, rdrop_alpha):
    """(steps, training CE, validation CE) for plain cross entropy (alpha None) or R-Drop."""
    model = make_model().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    generator = torch.Generator().manual_seed(1)
    history = []
    for step in range(1, steps + 1):
        input_ids = batches(data, generator)
        if rdrop_alpha is None:
            loss = model(input_ids=input_ids, labels=input_ids).loss
            train_ce = loss.item()
        else:
            parts = rdrop_causal_lm_loss(model, input_ids, alpha=rdrop_alpha)
            loss = parts.loss
            train_ce = (parts.ce1 + parts.ce2).item() / 2
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 25 == 0 or step in (1, steps):
            history.append((step, train_ce, validation_loss(model, valid)))
    return history


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--alpha", type=float, default=1.0, help="R-Drop's KL weight")
    parser.add_argument("--out", type=Path, default=Path("finetune_tiny_llama.png"))
    args = parser.parse_args()
    if args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    if not args.alpha >= 0:
        parser.error(f"--alpha must be >= 0, got {args.alpha}")
    if args.out.is_dir() or args.out.suffix.lower() not in (".png", ".pdf", ".svg", ".jpg",
                                                            ".jpeg"):
        parser.error(f"--out must name a .png, .pdf, .svg or .jpg file, got {args.out}")
    if not args.out.parent.is_dir():
        parser.error(f"--out: no folder {args.out.parent}")
    try:
        import matplotlib  # noqa: F401  (before the training runs, not after)
    except ImportError:
        parser.error("the plot needs matplotlib: pip install matplotlib")

    data = torch.tensor(list(CORPUS.read_bytes()), dtype=torch.long)
    split = int(0.9 * len(data))
    train_data, valid_data = data[:split], data[split:]
    runs = {}
    for name, alpha in (("cross entropy", None), (f"R-Drop (alpha={args.alpha:g})", args.alpha)):
        start = time.perf_counter()
        runs[name] = train(train_data, valid_data, args.steps, alpha)
        final = runs[name][-1]
        print(f"{name}: {time.perf_counter() - start:.0f} s, final training CE {final[1]:.3f}, "
              f"validation CE {final[2]:.3f}")
    plot(runs, args.out)
    print(f"plot written to {args.out}")


def plot(runs, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (name, history), color in zip(runs.items(), ("#1f77b4", "#d62728"), strict=True):
        steps, train_ce, valid_ce = zip(*history, strict=True)
        ax.plot(steps, train_ce, color=color, linestyle="--", label=f"{name}, training")
        ax.plot(steps, valid_ce, color=color, marker="o", markersize=4,
                label=f"{name}, validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross entropy (nats per byte)")
    ax.set_title("tiny Llama on examples/data/tiny_corpus.txt, CPU")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)


if __name__ == "__main__":
    main()
