"""fastrdrop.integrations.transformers on tiny models built from configs (nothing downloaded):
the loss and every parameter gradient against "model on [x; x] -> logits -> reference", with
and without PEFT LoRA and prompt tuning; models whose logits are not lm_head(hidden states);
a mixture of experts' router loss; RDropTrainer's gradient accumulation, label smoothing and
logs; torch.compile."""

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import fastrdrop  # noqa: E402
from fastrdrop.integrations.transformers import (  # noqa: E402
    HeadNotFusedWarning,
    NoDropoutWarning,
    RDropTrainer,
    _both_passes,
    _head_fused,
    rdrop_causal_lm_loss,
)

VOCAB = 101


def tiny_llama(tied=False, dropout=0.2):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        attention_dropout=dropout, tie_word_embeddings=tied)
    return transformers.LlamaForCausalLM(config).train()


def batch():
    input_ids = torch.randint(0, VOCAB, (3, 12))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 8:] = 0  # a padded row
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[0, :4] = -100  # a prompt that carries no loss
    return input_ids, attention_mask, labels


def gradients(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def with_lora(model, head=False, dropout=0.1):
    peft = pytest.importorskip("peft")
    modules = ["q_proj", "v_proj"] + (["lm_head"] if head else [])
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=modules, lora_dropout=dropout)
    return peft.get_peft_model(model, config)

# Tests that run without dropout on purpose (one model for both passes) silence its warning.
no_dropout_on_purpose = pytest.mark.filterwarnings("ignore::" + NoDropoutWarning.__module__
                                                   + ".NoDropoutWarning")


# lora-head: an adapter on lm_head, so the logits of both passes go to stacked_rdrop_loss
@pytest.mark.parametrize("variant", ["untied", "tied", "lora", "lora-head"])
def test_matches_logits_then_reference(variant):
    model = tiny_llama(tied=variant == "tied")
    if variant.startswith("lora"):
        model = with_lora(model, head=variant == "lora-head")
    input_ids, attention_mask, labels = batch()

    torch.manual_seed(1)  # the same dropout masks on both paths
    parts = rdrop_causal_lm_loss(model, input_ids, attention_mask, labels, alpha=0.7,
                                 chunk_size=8)
    parts.loss.backward()
    fused = gradients(model)
    model.zero_grad()

    torch.manual_seed(1)
    logits = model(input_ids=torch.cat([input_ids, input_ids]),
                   attention_mask=torch.cat([attention_mask, attention_mask])).logits
    expected = fastrdrop.reference.rdrop_loss(logits[:3, :-1], logits[3:, :-1], labels[:, 1:],
                                              alpha=0.7, return_parts=True)
    expected.loss.backward()
    reference = gradients(model)

    assert expected.kl > 0  # dropout made the passes differ
    for got, want in zip(parts, expected, strict=True):
        torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-6)
    assert fused.keys() == reference.keys() and fused
    if variant.startswith("lora"):  # the head's own weight stays frozen; its adapter learns
        heads = {name for name in fused if "lm_head" in name}
        assert all("lora" in name for name in heads) and bool(heads) == (variant == "lora-head")
    for name in fused:
        torch.testing.assert_close(fused[name], reference[name], rtol=1e-4, atol=1e-6,
                                   msg=f"gradient of {name}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("variant", ["untied", "lora-head"])
def test_labels_on_another_device(variant):
    # FSDP2 moves the model's inputs to its device, not the labels: the loss moves them, as
    # transformers' own loss does (both paths: the hidden states, and the model's own logits)
    model = tiny_llama()
    if variant == "lora-head":
        model = with_lora(model, head=True)
    model.cuda()
    input_ids, attention_mask, labels = batch()
    losses = []
    for where in ("cpu", "cuda"):
        torch.manual_seed(1)
        losses.append(rdrop_causal_lm_loss(model, input_ids.cuda(), attention_mask.cuda(),
                                           labels.to(where), alpha=0.7).loss)
    torch.testing.assert_close(*losses, rtol=0, atol=0)


@no_dropout_on_purpose
def test_final_logit_softcap_of_the_config():
    # Gemma 2 caps its logits (final_logit_softcapping): the fused path applies the same cap.
    torch.manual_seed(0)
    config = transformers.Gemma2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
        final_logit_softcapping=2.0, attention_dropout=0.0)
    model = transformers.Gemma2ForCausalLM(config).train()
    input_ids, attention_mask, labels = batch()
    parts = rdrop_causal_lm_loss(model, input_ids, attention_mask, labels)
    logits = model(input_ids=torch.cat([input_ids, input_ids]),
                   attention_mask=torch.cat([attention_mask, attention_mask])).logits
    assert logits.abs().max() <= 2.0  # the model's own logits are capped
    expected = fastrdrop.reference.rdrop_loss(logits[:3, :-1], logits[3:, :-1], labels[:, 1:])
    torch.testing.assert_close(parts.loss, expected.detach(), rtol=1e-5, atol=1e-6)


def recurrent_gemma():  # caps its logits with logits_soft_cap
    torch.manual_seed(0)
    return transformers.RecurrentGemmaForCausalLM(transformers.RecurrentGemmaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, lru_width=32, attention_window_size=16,
        block_types=["recurrent", "attention"], logits_soft_cap=30.0,
        attention_dropout=0.0)).train()


def llama_with_an_unused_cap():  # a softcap in its config, which its forward does not apply
    model = tiny_llama(dropout=0.0)
    model.config.final_logit_softcapping = 30.0
    return model


@no_dropout_on_purpose
@pytest.mark.filterwarnings("ignore::fastrdrop.integrations.transformers.HeadNotFusedWarning")
@pytest.mark.parametrize(("make", "fused"), [(recurrent_gemma, True),
                                             (llama_with_an_unused_cap, False)])
def test_softcap_that_small_logits_hide(make, fused):
    # c tanh(z / c) is within 1% of z for |z| < c / 6: at the logits of a new head, the check
    # once passed a cap that was not the model's (RecurrentGemma's, named logits_soft_cap, left
    # out; a config's cap that the model does not apply, put in) and kept that verdict once the
    # logits grew: 697 for a loss of 96. Now the cap is the model's, and a position where the
    # cap would not show decides nothing.
    model = make()
    input_ids, attention_mask, labels = batch()
    for scale in (1.0, 3.0, 100.0):  # the head learns
        with torch.no_grad():
            model.lm_head.weight.mul_(scale)
        parts = rdrop_causal_lm_loss(model, input_ids, attention_mask, labels)
        expected = reference_of_logits(model, input_ids, attention_mask, labels, alpha=1.0)
        torch.testing.assert_close(parts.loss, expected.loss.detach(), rtol=1e-5, atol=1e-6)
    assert _head_fused[model] is fused


def reference_of_logits(model, input_ids, attention_mask, labels, alpha):
    logits = model(input_ids=torch.cat([input_ids, input_ids]),
                   attention_mask=torch.cat([attention_mask, attention_mask])).logits
    n = len(input_ids)
    return fastrdrop.reference.rdrop_loss(logits[:n, :-1], logits[n:, :-1], labels[:, 1:],
                                          alpha=alpha, return_parts=True)


def granite_scaled(dropout=0.2):  # its logits are lm_head(hidden) / logits_scaling
    torch.manual_seed(0)
    return transformers.GraniteForCausalLM(transformers.GraniteConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        logits_scaling=8.0, attention_dropout=dropout)).train()


def roberta_decoder():  # its lm_head follows a dense layer, an activation and a norm
    torch.manual_seed(0)
    return transformers.RobertaForCausalLM(transformers.RobertaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=64, is_decoder=True,
        hidden_dropout_prob=0.2)).train()


@pytest.mark.parametrize("make", [granite_scaled, roberta_decoder])
def test_logits_that_are_not_the_head_of_the_hidden_states(make):
    # The fused linear loss would compute lm_head(hidden) and miss the scale or the transform:
    # the first call finds out from one position's logits, warns, and takes the model's logits,
    # then and on every later call.
    model = make()
    input_ids, attention_mask, labels = batch()
    calls = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            torch.manual_seed(1)
            calls.append(rdrop_causal_lm_loss(model, input_ids, attention_mask, labels,
                                              alpha=0.7))
    ours = [w for w in caught if w.category is HeadNotFusedWarning]
    assert len(ours) == 1 and ours[0].filename == __file__  # shown at the caller's line

    torch.manual_seed(1)
    with torch.no_grad():  # the first call's forward that found it, whose dropout masks it drew
        model(input_ids=torch.cat([input_ids, input_ids]), output_hidden_states=True,
              attention_mask=torch.cat([attention_mask, attention_mask]), logits_to_keep=1)
    first = reference_of_logits(model, input_ids, attention_mask, labels, alpha=0.7)
    torch.manual_seed(1)
    later = reference_of_logits(model, input_ids, attention_mask, labels, alpha=0.7)
    assert later.kl > 0
    for got, want in ((calls[0], first), (calls[1], later)):
        for part, expected in zip(got, want, strict=True):
            torch.testing.assert_close(part, expected.detach(), rtol=1e-5, atol=1e-6)


@no_dropout_on_purpose
def test_head_check_waits_for_logits_that_tell():
    # A head initialised to 0 gives logits of 0 whatever comes after it: the check cannot tell,
    # so that call takes the model's logits and the next one checks again (a tolerance of 1e-2
    # absolute once took it for lm_head(hidden) for good: a wrong loss once the head learnt)
    model = granite_scaled(dropout=0.0)
    with torch.no_grad():
        model.lm_head.weight.zero_()
    input_ids, attention_mask, labels = batch()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(2):
            parts = rdrop_causal_lm_loss(model, input_ids, attention_mask, labels)
            expected = reference_of_logits(model, input_ids, attention_mask, labels, alpha=1.0)
            torch.testing.assert_close(parts.loss, expected.loss.detach(), rtol=1e-5, atol=1e-6)
            warned = sum(w.category is HeadNotFusedWarning for w in caught)
            assert warned == step  # none while undecided, then once
            with torch.no_grad():
                model.lm_head.weight.normal_()  # the head learns


def test_prompt_tuning_inside_a_data_parallel_wrapper():
    # DDP (and DataParallel) do not pass PEFT's attributes on: its config is read inside them
    peft = pytest.importorskip("peft")
    config = peft.PromptTuningConfig(task_type=peft.TaskType.CAUSAL_LM, num_virtual_tokens=4)
    model = peft.get_peft_model(tiny_llama(), config)
    input_ids, attention_mask, labels = batch()
    losses = []
    for wrapped in (model, torch.nn.DataParallel(model)):  # no GPU: it calls the model itself
        torch.manual_seed(1)
        losses.append(rdrop_causal_lm_loss(wrapped, input_ids, attention_mask, labels).loss)
    torch.testing.assert_close(losses[1], losses[0], rtol=0, atol=0)


@no_dropout_on_purpose
def test_head_offloaded_by_accelerate():
    # device_map's offloading leaves lm_head's weight on the meta device outside its own forward:
    # the loss takes the model's logits (it raised a TypeError naming the weight's device)
    accelerate = pytest.importorskip("accelerate")
    model = tiny_llama(dropout=0.0)
    input_ids, attention_mask, labels = batch()
    expected = rdrop_causal_lm_loss(model, input_ids, attention_mask, labels).loss
    accelerate.cpu_offload(model.lm_head, execution_device="cpu")
    assert model.lm_head.weight.device.type == "meta"
    parts = rdrop_causal_lm_loss(model, input_ids, attention_mask, labels)
    torch.testing.assert_close(parts.loss, expected, rtol=1e-5, atol=1e-6)


@no_dropout_on_purpose
@pytest.mark.filterwarnings("ignore::fastrdrop.integrations.transformers.HeadNotFusedWarning")
@pytest.mark.parametrize("make", [tiny_llama, granite_scaled])  # the fused path, the logits'
def test_shift_labels_of_sequence_shards(make):
    # Context parallelism shards the sequence after shifting the labels (shift_labels): a
    # shard's last position predicts the first token of another shard, which no shift inside
    # the shard can tell. The loss takes them as the model's own loss does (it shifted labels)
    model = make(dropout=0.0)
    input_ids, _, labels = batch()
    shift_labels = torch.randint(0, VOCAB, labels.shape)
    shift_labels[0, :3] = -100
    parts = rdrop_causal_lm_loss(model, input_ids, None, labels, shift_labels=shift_labels)
    expected = model(input_ids=input_ids, labels=labels, shift_labels=shift_labels).loss
    for ce in (parts.ce1, parts.ce2):
        torch.testing.assert_close(ce, expected.detach(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="shift_labels must have input_ids' shape"):
        rdrop_causal_lm_loss(model, input_ids, shift_labels=shift_labels[:, 1:])


def test_router_loss_of_a_mixture_of_experts():
    # Mixtral adds router_aux_loss_coef * aux_loss to its loss when it is given the labels; R-Drop
    # adds it to ce1 + ce2 + alpha kl (the router loss of the batch's two passes).
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(transformers.MixtralConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        num_local_experts=4, num_experts_per_tok=2, output_router_logits=True,
        router_aux_loss_coef=0.5, attention_dropout=0.2)).train()
    input_ids, attention_mask, labels = batch()
    torch.manual_seed(1)
    parts = rdrop_causal_lm_loss(model, input_ids, attention_mask, labels, alpha=0.7)
    torch.manual_seed(1)
    aux_loss = model(input_ids=torch.cat([input_ids, input_ids]),
                     attention_mask=torch.cat([attention_mask, attention_mask])).aux_loss
    assert aux_loss > 0
    expected = parts.ce1 + parts.ce2 + 0.7 * parts.kl + 0.5 * aux_loss
    torch.testing.assert_close(parts.loss, expected.detach(), rtol=1e-5, atol=1e-6)


def test_prompt_tuning_virtual_tokens():
    # PEFT's prompt tuning puts its virtual tokens before the batch's: the loss is over the
    # batch's positions
    peft = pytest.importorskip("peft")
    config = peft.PromptTuningConfig(task_type=peft.TaskType.CAUSAL_LM, num_virtual_tokens=4)
    model = peft.get_peft_model(tiny_llama(), config)
    input_ids, attention_mask, labels = batch()
    torch.manual_seed(1)
    parts = rdrop_causal_lm_loss(model, input_ids, attention_mask, labels, alpha=0.7)
    torch.manual_seed(1)
    logits = model(input_ids=torch.cat([input_ids, input_ids]),
                   attention_mask=torch.cat([attention_mask, attention_mask])).logits[:, 4:]
    expected = fastrdrop.reference.rdrop_loss(logits[:3, :-1], logits[3:, :-1], labels[:, 1:],
                                              alpha=0.7, return_parts=True)
    assert expected.kl > 0
    for got, want in zip(parts, expected, strict=True):
        torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("attention_dropout", "lora_dropout", "training", "warns"), [
    (0.0, None, True, True),    # a stock Llama config: no dropout anywhere
    (0.1, None, True, False),   # the config's attention dropout (applied with no module)
    (0.1, None, False, True),   # evaluation mode: no dropout runs
    (0.0, 0.0, True, True),     # LoRA without lora_dropout
    (0.0, 0.1, True, False),    # LoRA with it
])
def test_warns_once_when_no_dropout_is_active(attention_dropout, lora_dropout, training, warns):
    model = tiny_llama(dropout=attention_dropout)
    if lora_dropout is not None:
        model = with_lora(model, dropout=lora_dropout)
    model.train(training)
    input_ids, attention_mask, labels = batch()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            rdrop_causal_lm_loss(model, input_ids, attention_mask, labels)
    ours = [w for w in caught if w.category is NoDropoutWarning]
    assert len(ours) == int(warns)
    if warns:
        message = str(ours[0].message)
        assert "attention_dropout" in message and "lora_dropout" in message
        assert ours[0].filename == __file__  # shown at the caller's line


@pytest.mark.parametrize("keywords, error", [
    (dict(label_smothing=0.1), "label_smothing=, .*did you mean label_smoothing="),
    (dict(alpah=2.0), "did you mean alpha="),
    (dict(reduction="sum"), "takes no reduction .*num_items_in_batch"),
    (dict(softcap=30.0), "takes no softcap .*final_logit_softcapping"),
    (dict(backend="torch"), "takes no backend"),
])
def test_a_loss_keyword_that_would_go_to_the_model_is_refused(keywords, error):
    # every keyword that is not the loss's goes to the model's forward, which takes what it does
    # not know without a word: a misspelt label_smoothing trained without smoothing
    model = tiny_llama(dropout=0.1).train()
    input_ids, attention_mask, labels = batch()
    with pytest.raises(TypeError, match=error):
        rdrop_causal_lm_loss(model, input_ids, attention_mask, labels, **keywords)


@pytest.mark.parametrize("rdrop_kwargs, error", [
    (dict(label_smothing=0.3), TypeError),
    (dict(reduction="sum"), TypeError),
    (dict(alpha=2.0), ValueError),
    # the Trainer's num_items_in_batch counts the labels that are not -100
    (dict(ignore_index=-1), ValueError),
])
def test_trainer_refuses_rdrop_kwargs_it_would_not_use(tmp_path, rdrop_kwargs, error):
    with pytest.raises(error, match="rdrop_kwargs"):
        RDropTrainer(model=tiny_llama(dropout=0.1), args=trainer_args(tmp_path),
                     rdrop_kwargs=rdrop_kwargs)


def test_trainer_gradient_accumulation(tmp_path):
    # 4 micro-batches of 1 and 1 batch of 4 give the same update (rows hold different numbers
    # of label tokens, so a mean of means would differ). Dropout off: both runs see one model.
    input_ids = torch.randint(0, VOCAB, (4, 10))
    attention_mask = torch.ones_like(input_ids)
    for row, length in enumerate([10, 7, 4, 9]):
        attention_mask[row, length:] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    data = [dict(input_ids=i, attention_mask=m, labels=y)
            for i, m, y in zip(input_ids, attention_mask, labels, strict=True)]

    def one_step(batch_size, accumulation):
        model = tiny_llama(dropout=0.0)
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / f"run{batch_size}"), per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation, max_steps=1, learning_rate=0.5,
            optim="sgd", lr_scheduler_type="constant", logging_steps=1, report_to=[],
            save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0)
        trainer = RDropTrainer(model=model, args=args, train_dataset=data, rdrop_alpha=1.0)
        with pytest.warns(NoDropoutWarning) as warned:  # once per model, not per micro-batch
            trainer.train()
        assert sum(w.category is NoDropoutWarning for w in warned) == 1
        logs = [entry for entry in trainer.state.log_history if "loss" in entry]
        return dict(model.named_parameters()), logs[0]

    params_4x1, log_4x1 = one_step(1, 4)
    params_1x4, log_1x4 = one_step(4, 1)
    for name, value in params_1x4.items():
        torch.testing.assert_close(params_4x1[name], value, rtol=1e-5, atol=1e-6,
                                   msg=f"parameter {name}")
    assert {"ce", "kl"} <= log_4x1.keys()
    assert log_4x1["ce"] == pytest.approx(log_1x4["ce"], rel=1e-4)


def trainer_args(tmp_path, **kwargs):
    return transformers.TrainingArguments(
        output_dir=str(tmp_path), learning_rate=1e-3, lr_scheduler_type="constant", report_to=[],
        use_cpu=True, disable_tqdm=True, seed=0, **kwargs)


@no_dropout_on_purpose
def test_trainer_label_smoothing_factor(tmp_path):
    # TrainingArguments' label smoothing, which the base class's evaluation loss applies, is the
    # training loss's too; rdrop_kwargs' own wins
    model = tiny_llama(dropout=0.0)
    input_ids, attention_mask, labels = batch()
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    args = trainer_args(tmp_path, label_smoothing_factor=0.3)
    for rdrop_kwargs, smoothing in (({}, 0.3), ({"label_smoothing": 0.1}, 0.1)):
        trainer = RDropTrainer(model=model, args=args, rdrop_alpha=0.7, rdrop_kwargs=rdrop_kwargs)
        expected = rdrop_causal_lm_loss(model, input_ids, attention_mask, labels, alpha=0.7,
                                        label_smoothing=smoothing)
        torch.testing.assert_close(trainer.compute_loss(model, inputs), expected.loss,
                                   rtol=1e-6, atol=1e-6)


@no_dropout_on_purpose
def test_a_model_s_own_four_dimensional_mask():
    # transformers takes a [B, 1, T, T] mask of the model's own (packed sequences): the loss
    # passes it on, twice along dim 0
    model = tiny_llama(dropout=0.0)
    input_ids, _, labels = batch()
    mask = torch.tril(torch.ones(12, 12, dtype=torch.bool)).expand(3, 1, 12, 12).clone()
    mask[1, :, :, 8:] = False  # the padded row's last positions, seen by none
    parts = rdrop_causal_lm_loss(model, input_ids, mask, labels)
    own = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(parts.ce1, own.detach(), rtol=1e-5, atol=1e-6)


@no_dropout_on_purpose
def test_head_check_of_a_model_trained_in_bf16_by_accelerate():
    # accelerate (what Trainer(bf16=True) uses) runs the forward under autocast and casts its
    # outputs to fp32: fp32 logits that carry bf16's rounding (2.5e-3 of the largest). A
    # tolerance of 1e-3 for fp32 logits took them for a head that is not lm_head(hidden)
    accelerate = pytest.importorskip("accelerate")
    state = accelerate.state.AcceleratorState  # one per process: the Trainers' tests make theirs
    state._reset_state(reset_partial_state=True)
    try:
        model = accelerate.Accelerator(mixed_precision="bf16", cpu=True).prepare(tiny_llama())
        input_ids, attention_mask, labels = batch()
        with warnings.catch_warnings():
            warnings.simplefilter("error", HeadNotFusedWarning)
            rdrop_causal_lm_loss(model, input_ids, attention_mask, labels)
    finally:
        state._reset_state(reset_partial_state=True)
    assert _head_fused[model] is True


def test_an_fp32_head_of_a_bf16_model_under_autocast_is_fused():
    # mixed precision may keep the head in fp32 beside a bf16 model; under autocast the fused
    # path takes it (it fell back to the model's logits, with a warning, for the dtypes alone)
    model = tiny_llama().to(torch.bfloat16)
    model.lm_head.float()
    input_ids, attention_mask, labels = batch()
    results = []
    for fused in (True, False):
        _head_fused[model] = fused
        torch.manual_seed(1)  # the same dropout masks on both paths
        with torch.autocast("cpu", dtype=torch.bfloat16), warnings.catch_warnings():
            warnings.simplefilter("error", HeadNotFusedWarning)
            parts = rdrop_causal_lm_loss(model, input_ids, attention_mask, labels, alpha=0.7)
        parts.loss.backward()
        results.append((parts.loss.detach(), model.lm_head.weight.grad.clone()))
        model.zero_grad()
    del _head_fused[model]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rdrop_causal_lm_loss(model, input_ids, attention_mask, labels)
    assert _head_fused[model] is True
    (loss, grad), (want_loss, want_grad) = results
    assert grad.dtype == torch.float32
    torch.testing.assert_close(loss, want_loss, rtol=2e-2, atol=0)
    torch.testing.assert_close(grad, want_grad, rtol=5e-2, atol=5e-3)


@no_dropout_on_purpose
def test_trainer_under_data_parallel_without_averaged_tokens(tmp_path, monkeypatch):
    # One process on n_gpu GPUs (DataParallel) without average_tokens_across_devices: the Trainer
    # divides the token count by n_gpu, for each replica's share of the batch. The R-Drop loss
    # is the whole batch's, and was n_gpu times too large. (DataParallel itself leaves a CPU
    # model as it is.)
    model = tiny_llama(dropout=0.0)
    input_ids, attention_mask, labels = batch()
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    count = int((labels[:, 1:] != -100).sum())
    assert count % 2 == 0  # so that the Trainer's count // n_gpu is exact
    single = RDropTrainer(model=model, args=trainer_args(tmp_path))
    expected = single.compute_loss(model, inputs, num_items_in_batch=torch.tensor(count))
    monkeypatch.setattr(transformers.TrainingArguments, "n_gpu", property(lambda self: 2))
    args = trainer_args(tmp_path, average_tokens_across_devices=False)
    two = RDropTrainer(model=model, args=args)
    shares = torch.tensor(count // 2).unsqueeze(0).expand(2, -1)  # what the Trainer passes
    loss = two.compute_loss(model, inputs, num_items_in_batch=shares)
    torch.testing.assert_close(loss.mean(), expected, rtol=1e-6, atol=1e-6)


def test_trainer_refuses_a_loss_function_of_its_own(tmp_path):
    with pytest.raises(ValueError, match="compute_loss_func must be None"):
        RDropTrainer(model=tiny_llama(), args=trainer_args(tmp_path),
                     compute_loss_func=lambda outputs, labels, num_items_in_batch: 0.0)


@pytest.mark.parametrize(("change", "error", "message"), [
    (dict(input_ids=torch.zeros(12, dtype=torch.long)), ValueError,
     r"input_ids must be a \[B, T\] tensor of token ids, got shape \[12\]"),
    (dict(input_ids=torch.zeros(3, 12)), ValueError, "input_ids must be a .B, T. tensor"),
    (dict(labels=torch.zeros(3, 11, dtype=torch.long)), ValueError,
     r"labels must have input_ids' shape \[3, 12\], got shape \[3, 11\]"),
    (dict(attention_mask=torch.ones(3, 11)), ValueError,
     r"attention_mask must be \[B, T\] = \[3, 12\], or \[B, 1, T, T\], got shape \[3, 11\]"),
    (dict(attention_mask=torch.ones(3, 1, 12, 12), labels=None), ValueError,
     "labels must be given with a .B, 1, T, T. attention_mask"),
    (dict(shift_labels=torch.zeros(12, dtype=torch.long)), ValueError,
     "shift_labels must have input_ids'"),
    (dict(num_items_in_batch=-1), ValueError, "num_items_in_batch must be >= 0, got -1"),
    (dict(num_items_in_batch=2.5), TypeError, "num_items_in_batch must be an int or a tensor"),
])
def test_bad_batches_name_the_argument(change, error, message):
    # they failed inside the model or the loss, under other names (IndexError, "target")
    input_ids, attention_mask, labels = batch()
    arguments = dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels) | change
    with pytest.raises(error, match=message):
        rdrop_causal_lm_loss(tiny_llama(), **arguments)


@no_dropout_on_purpose
def test_trainer_logs_of_a_resumed_run(tmp_path):
    # ce and kl are logged as means over the steps since the last log: a run resumed from a
    # checkpoint logs what the uninterrupted run logs
    torch.manual_seed(0)
    data = [dict(input_ids=ids, labels=ids) for ids in torch.randint(0, VOCAB, (32, 10))]

    def logged(resume_from=None):
        args = trainer_args(tmp_path, per_device_train_batch_size=4, max_steps=6,
                            logging_steps=2, save_steps=4)
        trainer = RDropTrainer(model=tiny_llama(dropout=0.0), args=args, train_dataset=data)
        trainer.train(resume_from_checkpoint=resume_from)
        return {e["step"]: (e["ce"], e["kl"]) for e in trainer.state.log_history if "ce" in e}

    whole = logged()
    resumed = logged(resume_from=str(tmp_path / "checkpoint-4"))
    assert whole.keys() == resumed.keys() == {2, 4, 6}  # the checkpoint holds the logs up to 4
    assert resumed[6] == pytest.approx(whole[6], rel=1e-4)


def _logged_parts_body(rank, world, folder):
    # the ranks' process group is up; the Trainer's accelerator joins it from these variables
    import os

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT="1")  # unused: the group is up
    warnings.simplefilter("ignore")
    logs = _logged_parts(folder, per_device=4 // world)
    expected = torch.load(os.path.join(folder, "one.pt"))
    assert logs == pytest.approx(expected, rel=1e-4), (logs, expected)
    torch.distributed.barrier()


def _logged_parts(folder, per_device):
    torch.manual_seed(0)
    data = [dict(input_ids=ids, labels=ids) for ids in torch.randint(0, VOCAB, (8, 10))]
    args = trainer_args(folder, per_device_train_batch_size=per_device, max_steps=2,
                        logging_steps=1, save_strategy="no")
    trainer = RDropTrainer(model=tiny_llama(dropout=0.0), args=args, train_dataset=data)
    trainer.train()
    return [e[key] for e in trainer.state.log_history if "ce" in e for key in ("loss", "ce", "kl")]


@no_dropout_on_purpose
def test_trainer_logs_over_data_parallel_processes(tmp_path):
    # ce and kl are means over all processes, as the loss is: with the token count global over
    # the processes (average_tokens_across_devices), each one's share once gave half of them
    from ranks import run_ranks

    torch.save(_logged_parts(tmp_path, per_device=4), tmp_path / "one.pt")
    run_ranks(_logged_parts_body, 2, str(tmp_path), timeout=120)


@no_dropout_on_purpose
def test_compile_has_no_graph_break_inside_fastrdrop():
    model = tiny_llama(dropout=0.0)
    input_ids, attention_mask, labels = batch()

    def step(input_ids):
        parts = rdrop_causal_lm_loss(model, input_ids, attention_mask, labels, chunk_size=8)
        parts.loss.backward()
        return parts.loss.detach()

    # one eager call first: it installs transformers' hooks that collect the hidden states,
    # which a compiled call cannot do (they are installed under a lock)
    step(input_ids)
    model.zero_grad()
    explanation = torch._dynamo.explain(step)(input_ids)
    inside = [reason.reason for reason in explanation.break_reasons
              if any("fastrdrop" in frame.filename for frame in reason.user_stack)]
    assert not inside, inside
    model.zero_grad()

    position_ids = torch.arange(input_ids.shape[1]).expand_as(input_ids)

    def loss(input_ids):  # the whole forward, loss included, as one graph; a model keyword too
        return rdrop_causal_lm_loss(model, input_ids, attention_mask, labels, chunk_size=8,
                                    position_ids=position_ids).loss

    results = []
    for fn in (loss, torch.compile(loss, fullgraph=True)):
        value = fn(input_ids)
        value.backward()
        results.append((value.detach(), gradients(model)))
        model.zero_grad()
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-6)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, rtol=1e-4, atol=1e-6)


@no_dropout_on_purpose
@pytest.mark.parametrize("variant", ["untied", "lora-head"])
def test_padding_free_row_under_flash_attention(monkeypatch, variant):
    # Flash attention tells the sequences packed in a row apart by their position_ids only in a
    # batch of one row: both passes go in one row, [1, 2T]. sdpa stands in for it here (its masks
    # keep packed sequences apart in any batch), so the loss and gradients must be those of two
    # rows, [2, T]; on the first call of a model, whose check reads one row's last logits, too.
    from fastrdrop.integrations import transformers as integration

    model = tiny_llama(dropout=0.0)  # both layouts draw dropout masks of different shapes
    if variant == "lora-head":
        model = with_lora(model, head=True, dropout=0.0)
    position_ids = torch.cat([torch.arange(5), torch.arange(4), torch.arange(3)])[None]
    input_ids = torch.randint(0, VOCAB, (1, 12))
    labels = input_ids.masked_fill(position_ids == 0, -100)
    runs = []
    for flash in (True, False):
        monkeypatch.setattr(integration, "_flash_attention", lambda config, flash=flash: flash)
        shapes = []
        hook = model.register_forward_pre_hook(
            lambda module, args, kwargs, shapes=shapes: shapes.append(
                tuple(kwargs["input_ids"].shape)),
            with_kwargs=True)
        parts = rdrop_causal_lm_loss(model, input_ids, None, labels, position_ids=position_ids)
        parts.loss.backward()
        hook.remove()
        runs.append((parts, gradients(model), shapes[-1]))
        model.zero_grad()
    (one_row, grads_one_row, shape_one_row), (two_rows, grads_two_rows, shape_two_rows) = runs
    assert shape_one_row == (1, 24) and shape_two_rows == (2, 12)
    for got, want in zip(one_row, two_rows, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for name, grad in grads_two_rows.items():
        torch.testing.assert_close(grads_one_row[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_both_passes_of_a_packed_batch():
    # [x; x] of a padding-free batch: position_ids twice; flash attention's cumulative lengths
    # over the flattened batch cover the second copy's sequences after the first's
    cu = torch.tensor([0, 5, 12, 16], dtype=torch.int32)
    position_ids = torch.cat([torch.arange(5), torch.arange(7), torch.arange(4)])[None]
    twice = _both_passes(dict(input_ids=torch.arange(16)[None], position_ids=position_ids,
                              cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=7,
                              attention_mask=None))
    assert twice["input_ids"].shape == twice["position_ids"].shape == (2, 16)
    assert torch.equal(twice["position_ids"][1], position_ids[0])
    for key in ("cu_seq_lens_q", "cu_seq_lens_k"):
        assert twice[key].tolist() == [0, 5, 12, 16, 21, 28, 32]
    assert twice["max_length_q"] == 7 and twice["attention_mask"] is None
    # both passes in one row (flash attention, no cu_seq_lens): the copy's sequences come after
    seq_idx = torch.tensor([[0, 0, 1, 1, 1]])
    one_row = _both_passes(dict(position_ids=torch.tensor([[0, 1, 0, 1, 2]]), seq_idx=seq_idx),
                           dim=1)
    assert one_row["position_ids"].tolist() == [[0, 1, 0, 1, 2, 0, 1, 0, 1, 2]]
    assert one_row["seq_idx"].tolist() == [[0, 0, 1, 1, 1, 2, 2, 3, 3, 3]]
