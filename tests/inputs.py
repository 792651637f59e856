"""Random test inputs that look like two dropout passes: z2 = z1 + noise, never zeros."""

import dataclasses

import torch

from conftest import DEVICE


def logits_pair(shape, dtype, *, spread=3.0, noise=0.5, masked=0.0):
    """Two logits tensors of ``shape`` [..., V]; ``masked`` is the fraction of positions set to
    -inf in both (masked vocabulary), never a whole row."""
    z1 = spread * torch.randn(shape, dtype=torch.float64)
    z2 = z1 + noise * torch.randn(shape, dtype=torch.float64)
    if masked > 0 and shape[-1] > 1:
        absent = torch.rand(shape) < masked
        absent[..., 0] = False
        z1[absent] = float("-inf")
        z2[absent] = float("-inf")
    return z1.to(DEVICE, dtype), z2.to(DEVICE, dtype)


def labels(batch_shape, vocab_size, *, ignored=0.2, ignore_index=-100, logits=None):
    """Labels in [0, V) with a fraction ``ignored`` set to ignore_index. With ``logits``, labels
    avoid masked positions (their cross entropy would be infinite)."""
    y = torch.randint(0, vocab_size, batch_shape)
    if logits is not None:
        present = ~torch.isneginf(logits.detach().cpu().float())
        y = torch.multinomial(present.reshape(-1, vocab_size).float(), 1).reshape(batch_shape)
    y[torch.rand(batch_shape) < ignored] = ignore_index
    return y.to(DEVICE)


def grad_output_like(loss):
    """An upstream gradient that is not 1: a random scalar, or a random vector for 'none'."""
    if loss.dim() == 0:
        return torch.empty((), device=loss.device).uniform_(0.5, 2.0)
    return torch.randn(loss.shape, device=loss.device)


def no_checkpointing():
    """The TrainingArguments keyword that turns activation checkpointing off (TRL turns it on by
    default): transformers renamed gradient_checkpointing to activation_checkpointing."""
    import transformers

    names = {field.name for field in dataclasses.fields(transformers.TrainingArguments)}
    new = "activation_checkpointing" in names
    return {"activation_checkpointing" if new else "gradient_checkpointing": False}
