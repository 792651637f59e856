"""Supervised fine-tuning with TRL's SFTTrainer and R-Drop: fastrdrop's RDropSFTTrainer on a
tiny Llama (built from a config, nothing downloaded), with packed prompt/completion data, so that
only the completions carry a loss.

    python examples/sft_rdrop_trl.py [--steps 30] [--output-dir /tmp/sft_rdrop_trl]

Needs ``pip install fastrdrop[trl]``. The recipe for a real model is the same, with the model and
tokenizer from ``from_pretrained`` and dropout turned on (R-Drop needs it: ``attention_dropout``
in the config, or ``lora_dropout`` in a LoraConfig).
"""

import argparse
import dataclasses
import os

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, TrainingArguments

try:
    from datasets import Dataset
    from trl import SFTConfig

    from fastrdrop.integrations.trl import RDropSFTTrainer
except ImportError as error:
    raise SystemExit(f"{error}: this example needs TRL, pip install 'fastrdrop[trl]'") from error


def word_tokenizer(words):
    """A word-level tokenizer over ``words`` with pad, end-of-sequence and unknown tokens."""
    vocab = {token: i for i, token in enumerate(["<pad>", "<eos>", "<unk>", *words])}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>",
                                   eos_token="<eos>", unk_token="<unk>")


def arithmetic_data(n=512, seed=0):
    """Prompts "a plus b" and completions "c": sums of numbers below 20, written as words."""
    generator = torch.Generator().manual_seed(seed)
    a, b = torch.randint(0, 20, (2, n), generator=generator)
    return Dataset.from_dict({"prompt": [f"n{x} plus n{y} is" for x, y in zip(a, b, strict=True)],
                              "completion": [f" n{x + y}" for x, y in zip(a, b, strict=True)]})


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--output-dir", default="/tmp/sft_rdrop_trl")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    tokenizer = word_tokenizer([f"n{i}" for i in range(40)] + ["plus", "is"])
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        attention_dropout=0.1,  # R-Drop needs dropout: stock configs have 0.0
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None))
    # TRL turns activation checkpointing on by default; transformers renamed its switch
    names = {field.name for field in dataclasses.fields(TrainingArguments)}
    no_checkpointing = {"activation_checkpointing" if "activation_checkpointing" in names
                        else "gradient_checkpointing": False}
    config = SFTConfig(
        output_dir=args.output_dir, max_steps=args.steps, per_device_train_batch_size=8,
        learning_rate=3e-3, logging_steps=10, report_to=[], save_strategy="no",
        packing=True, max_length=64,  # packed, padding-free rows; completion-only labels
        use_cpu=not torch.cuda.is_available(), bf16=False, disable_tqdm=True, **no_checkpointing)
    trainer = RDropSFTTrainer(model=model, args=config, train_dataset=arithmetic_data(),
                              processing_class=tokenizer, rdrop_alpha=1.0)
    trainer.train()
    for entry in trainer.state.log_history:
        if "loss" in entry:
            print(f"step {entry['step']:3d}  loss {entry['loss']:.3f}  "
                  f"ce {entry['ce']:.3f}  kl {entry['kl']:.4f}")


if __name__ == "__main__":
    main()
