"""fastrdrop.integrations.trl.RDropSFTTrainer on a tiny Llama and a word-level tokenizer built in
the process (nothing downloaded): the loss and the gradients of a real collated batch against
"model on [x; x] -> logits -> reference R-Drop on the shifted labels", with TRL's default
padding, padding-free batches, packing and completion-only labels; a few training steps; the
dropout warning; gradient accumulation."""

import os
import runpy
import sys

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
tokenizers = pytest.importorskip("tokenizers")

import transformers  # noqa: E402

import fastrdrop  # noqa: E402
from fastrdrop.integrations.transformers import NoDropoutWarning  # noqa: E402
from fastrdrop.integrations.trl import RDropSFTTrainer  # noqa: E402

from inputs import no_checkpointing  # noqa: E402

WORDS = [f"w{i}" for i in range(90)]


def tokenizer():
    vocab = {token: i for i, token in enumerate(["<pad>", "<eos>", "<unk>", *WORDS])}
    model = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab=vocab, unk_token="<unk>"))
    model.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=model, pad_token="<pad>",
                                                eos_token="<eos>", unk_token="<unk>")


def tiny_llama(tok, dropout=0.2):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        attention_dropout=dropout, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        bos_token_id=None)
    return transformers.LlamaForCausalLM(config)


def text_data(n=8):
    generator = torch.Generator().manual_seed(0)
    return datasets.Dataset.from_dict({"text": [
        " ".join(WORDS[j] for j in torch.randint(0, 90, (3 + i % 5,), generator=generator))
        for i in range(n)]})


def prompt_completion_data(n=8):
    return datasets.Dataset.from_dict({
        "prompt": [" ".join(WORDS[i:i + 2 + i % 3]) for i in range(n)],
        "completion": [" " + " ".join(WORDS[50 + i:51 + i + i % 2]) for i in range(n)]})


# What TRL does with each: default right padding with an attention mask; padding-free rows
# concatenated into one with position_ids (and the first label of each sequence ignored);
# packing (best-fit, padding-free as well); completion-only labels, alone and packed.
LAYOUTS = {
    "padding": (text_data, dict(max_length=32)),
    "padding-free": (text_data, dict(padding_free=True, max_length=None)),
    "packing": (text_data, dict(packing=True, max_length=16)),
    "completion-only": (prompt_completion_data, dict(max_length=32)),
    "completion-only-packed": (prompt_completion_data, dict(packing=True, max_length=16)),
}


def trainer(tmp_path, layout, *, dropout=0.2, steps=2, batch_size=2, accumulation=1,
            options=None, **kwargs):
    data, config = LAYOUTS[layout]
    tok = tokenizer()
    args = trl.SFTConfig(
        output_dir=str(tmp_path / layout), max_steps=steps, per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation, logging_steps=1, report_to=[], use_cpu=True,
        bf16=False, fp16=False, save_strategy="no", disable_tqdm=True, seed=0,
        **no_checkpointing(), **config, **(options or {}))
    return RDropSFTTrainer(model=tiny_llama(tok, dropout), args=args, train_dataset=data(),
                           processing_class=tok, **kwargs)


def gradients(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_compute_loss_matches_logits_then_reference(tmp_path, layout):
    rdrop = trainer(tmp_path, layout, rdrop_alpha=0.7)
    model = rdrop.model.train()
    batch = next(iter(rdrop.get_train_dataloader()))
    labels = batch["labels"]
    assert (labels == -100).any() and (labels != -100).any()
    if layout in ("padding-free", "packing", "completion-only-packed"):
        assert "position_ids" in batch and "attention_mask" not in batch

    torch.manual_seed(1)  # the same dropout masks on both paths
    loss = rdrop.compute_loss(model, batch)
    loss.backward()
    fused = gradients(model)
    model.zero_grad()

    torch.manual_seed(1)
    twice = {key: torch.cat([batch[key], batch[key]])
             for key in ("input_ids", "attention_mask", "position_ids") if key in batch}
    logits = model(**twice, use_cache=False).logits
    n = len(labels)
    expected = fastrdrop.reference.rdrop_loss(logits[:n, :-1], logits[n:, :-1], labels[:, 1:],
                                              alpha=0.7, return_parts=True)
    expected.loss.backward()
    reference = gradients(model)

    assert expected.kl > 0  # dropout made the passes differ
    torch.testing.assert_close(loss, expected.loss.detach(), rtol=1e-5, atol=1e-6)
    for name, grad in reference.items():
        torch.testing.assert_close(fused[name], grad, rtol=1e-4, atol=1e-6,
                                   msg=f"gradient of {name}")


def test_packed_sequences_do_not_attend_to_each_other(tmp_path):
    # In a padding-free batch only position_ids separate the sequences: the loss of the packed
    # row equals the loss of its sequences run one by one (dropout off, alpha 0: the CE alone).
    rdrop = trainer(tmp_path, "packing", dropout=0.0, rdrop_alpha=0.0)
    model = rdrop.model.train()
    batch = next(iter(rdrop.get_train_dataloader()))
    with pytest.warns(NoDropoutWarning):
        packed = rdrop.compute_loss(model, batch)
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist()
    ends = [*starts[1:], batch["input_ids"].shape[1]]
    total, count = 0.0, 0
    for start, end in zip(starts, ends, strict=True):
        labels = batch["labels"][:, start:end]
        logits = model(input_ids=batch["input_ids"][:, start:end], use_cache=False).logits
        total += torch.nn.functional.cross_entropy(
            logits[0, :-1], labels[0, 1:], ignore_index=-100, reduction="sum")
        count += int((labels[0, 1:] != -100).sum())
    torch.testing.assert_close(packed, 2 * total / count, rtol=1e-5, atol=1e-6)


def test_training_steps_log_ce_and_kl(tmp_path):
    rdrop = trainer(tmp_path, "packing", steps=3, rdrop_alpha=1.0)
    rdrop.train()
    logs = [entry for entry in rdrop.state.log_history if "loss" in entry]
    assert len(logs) == 3
    for entry in logs:
        assert {"ce", "kl"} <= entry.keys()
        assert entry["kl"] > 0 and entry["ce"] > 0
        assert entry["loss"] == pytest.approx(2 * entry["ce"] + entry["kl"], rel=1e-3)


def test_warns_when_no_dropout_is_active(tmp_path):
    rdrop = trainer(tmp_path, "padding", dropout=0.0, steps=2)
    with pytest.warns(NoDropoutWarning, match="attention_dropout") as warned:
        rdrop.train()
    assert sum(w.category is NoDropoutWarning for w in warned) == 1  # once per model


def test_loss_types_other_than_nll_are_refused(tmp_path):
    # "dft" reweights TRL's own cross entropy: the R-Drop loss would silently ignore it
    with pytest.raises(ValueError, match="loss_type must be 'nll', got 'dft'"):
        trainer(tmp_path, "padding", options=dict(loss_type="dft"))


def test_a_refused_trainer_leaves_the_model_as_it_was(tmp_path):
    # refused before SFTTrainer is built, which would wrap the model in PEFT adapters in place
    peft = pytest.importorskip("peft")
    tok = tokenizer()
    model = tiny_llama(tok)
    args = trl.SFTConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, loss_type="dft",
                         **no_checkpointing())
    with pytest.raises(ValueError, match="loss_type must be 'nll'"):
        RDropSFTTrainer(model=model, args=args, train_dataset=text_data(), processing_class=tok,
                        peft_config=peft.LoraConfig(r=4, target_modules=["q_proj"]))
    assert not any("lora" in name for name, _ in model.named_modules())


def test_gradient_accumulation(tmp_path):
    # 2 micro-batches of 2 and 1 batch of 4 give the same update: the loss is normalised by the
    # label tokens of the whole step (num_items_in_batch), not per micro-batch
    params = []
    for batch_size, accumulation in ((2, 2), (4, 1)):
        rdrop = trainer(tmp_path / f"{batch_size}x{accumulation}", "padding", dropout=0.0,
                        steps=1, batch_size=batch_size, accumulation=accumulation,
                        options=dict(learning_rate=0.5, optim="sgd", lr_scheduler_type="constant"),
                        rdrop_alpha=1.0)
        with pytest.warns(NoDropoutWarning):
            rdrop.train()
        params.append(dict(rdrop.model.named_parameters()))
    for name, value in params[1].items():
        torch.testing.assert_close(params[0][name], value, rtol=1e-5, atol=1e-6,
                                   msg=f"parameter {name}")


@pytest.mark.filterwarnings("ignore::fastrdrop.integrations.transformers.NoDropoutWarning")
def test_router_loss_weighted_as_sft_trainer(tmp_path):
    # SFTTrainer weights a mixture of experts' router loss with SFTConfig's router_aux_loss_coef
    # (written into the config; the model's own attribute keeps the value it was built with), a
    # mean over the accumulated micro-batches. The R-Drop step took the model's 0.001, once per
    # micro-batch. Without dropout and with alpha 0, R-Drop is the cross entropy twice plus the
    # router term, so it is SFTTrainer's loss with the term plus its loss without (coef 0).
    tok = tokenizer()

    def make(cls, coef, **kwargs):
        torch.manual_seed(0)
        model = transformers.MixtralForCausalLM(transformers.MixtralConfig(
            vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
            num_experts_per_tok=2, max_position_embeddings=128, attention_dropout=0.0,
            router_aux_loss_coef=0.001, pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id, bos_token_id=None))
        args = trl.SFTConfig(
            output_dir=str(tmp_path), per_device_train_batch_size=2, report_to=[], use_cpu=True,
            save_strategy="no", disable_tqdm=True, max_length=32, router_aux_loss_coef=coef,
            **no_checkpointing())
        return cls(model=model.train(), args=args, train_dataset=text_data(),
                   processing_class=tok, **kwargs)

    rdrop = make(RDropSFTTrainer, 0.5, rdrop_alpha=0.0)
    with_router, without = make(trl.SFTTrainer, 0.5), make(trl.SFTTrainer, 0.0)
    batch = next(iter(rdrop.get_train_dataloader()))
    count = (batch["labels"][:, 1:] != -100).sum()
    for accumulation in (1, 2):
        losses = []
        for trainer in (rdrop, with_router, without):
            trainer.current_gradient_accumulation_steps = accumulation
            losses.append(trainer.compute_loss(trainer.model, dict(batch),
                                               num_items_in_batch=count))
        assert losses[1] > losses[2]  # a router term of weight 0.5 / accumulation
        torch.testing.assert_close(losses[0], losses[1] + losses[2], rtol=1e-5, atol=1e-6)


def test_example_runs(tmp_path, monkeypatch, capsys):
    example = os.path.join(os.path.dirname(__file__), "..", "examples", "sft_rdrop_trl.py")
    monkeypatch.setattr(sys, "argv", [example, "--steps", "10", "--output-dir", str(tmp_path)])
    runpy.run_path(example, run_name="__main__")
    assert "step  10  loss" in capsys.readouterr().out
