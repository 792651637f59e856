"""The Transformers and TRL integrations on a tiny Llama sharded with FSDP2 (fully_shard per
decoder layer, then the root), and the loss on logits that tensor parallelism leaves sharded over
the vocabulary (ColwiseParallel on lm_head, a DTensor Shard(-1)), directly and through
rdrop_causal_lm_loss, on 2 gloo ranks
(tests/ranks.py), against one process: the loss and every parameter gradient, dropout on."""

import functools
import warnings

import pytest
import torch
import torch.distributed as dist

transformers = pytest.importorskip("transformers")

import fastrdrop  # noqa: E402
from fastrdrop.integrations.transformers import RDropTrainer, rdrop_causal_lm_loss  # noqa: E402

from inputs import no_checkpointing  # noqa: E402
from ranks import run_ranks  # noqa: E402

VOCAB, ROWS, T = 101, 2, 9  # rows per rank


def tiny_llama(tied=False):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        attention_dropout=0.2, tie_word_embeddings=tied)
    return transformers.LlamaForCausalLM(config).train()


def with_lora(model):
    import peft

    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                             lora_dropout=0.1)
    return peft.get_peft_model(model, config)


def batch(rank):
    gen = torch.Generator().manual_seed(3)
    input_ids = torch.randint(0, VOCAB, (2 * ROWS, T), generator=gen)
    labels = input_ids.clone()
    labels[:, :3] = -100
    rows = slice(rank * ROWS, (rank + 1) * ROWS)
    return dict(input_ids=input_ids[rows], labels=labels[rows])


def full_gradients(model):
    return {name: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
            for name, p in model.named_parameters() if p.grad is not None}


def compare_with_one_process(rank, world, make_model, loss_of, own_head=False):
    """FSDP2 over the ranks' rows against the one-process model on each rank's rows, the same
    dropout masks (seeded), gradients averaged over the ranks as FSDP does. own_head: lm_head in
    an FSDP group of its own."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    # on the CPU, on a machine with a GPU too (FSDP2's default mesh would take the GPU)
    shard = functools.partial(fully_shard, mesh=init_device_mesh("cpu", (world,)))
    sharded = make_model()
    base = sharded.get_base_model() if hasattr(sharded, "get_base_model") else sharded
    for layer in base.model.layers:
        shard(layer)
    if own_head:
        shard(base.lm_head)
    shard(sharded)
    torch.manual_seed(10 + rank)
    loss = loss_of(sharded, batch(rank))
    loss.backward()

    one = make_model()
    torch.manual_seed(10 + rank)
    expected = loss_of(one, batch(rank))
    expected.backward()
    torch.testing.assert_close(loss.detach(), expected.detach(), rtol=1e-5, atol=1e-6)
    got = full_gradients(sharded)
    assert got and got.keys() == {n for n, p in one.named_parameters() if p.grad is not None}
    for name, p in one.named_parameters():
        if p.grad is None:
            continue
        mean = p.grad.clone()
        dist.all_reduce(mean)
        torch.testing.assert_close(got[name], mean / world, rtol=1e-4, atol=1e-6, msg=name)


def _causal_lm_body(rank, world):
    warnings.simplefilter("ignore")

    def loss_of(model, inputs):
        return rdrop_causal_lm_loss(model, **inputs, chunk_size=5).loss

    compare_with_one_process(rank, world, tiny_llama, loss_of)
    compare_with_one_process(rank, world, lambda: tiny_llama(tied=True), loss_of)
    compare_with_one_process(rank, world, lambda: with_lora(tiny_llama()), loss_of)
    # a head in its own group is resharded after its forward: the model's logits are used
    compare_with_one_process(rank, world, tiny_llama, loss_of, own_head=True)


def test_fsdp2_rdrop_causal_lm_loss():
    # untied, tied, LoRA and lm_head in its own group: the loss runs inside the root module's
    # forward, where FSDP2 has unsharded the embedding and lm_head
    run_ranks(_causal_lm_body, 2)


def tokenizer():
    import tokenizers

    words = {f"w{i}": i for i in range(VOCAB)}
    model = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab=words, unk_token="w2"))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=model, pad_token="w0",
                                                eos_token="w1", unk_token="w2")


def _trainers_body(rank, world, folder):
    warnings.simplefilter("ignore")

    def rdrop_trainer(model):
        args = transformers.TrainingArguments(output_dir=f"{folder}/{rank}", report_to=[],
                                              use_cpu=True)
        return RDropTrainer(model=model, args=args, rdrop_alpha=0.5)

    def sft_trainer(model):
        import datasets
        import trl

        from fastrdrop.integrations.trl import RDropSFTTrainer

        args = trl.SFTConfig(output_dir=f"{folder}/{rank}", report_to=[], use_cpu=True,
                             bf16=False, **no_checkpointing())
        data = datasets.Dataset.from_dict({"text": ["w5 w6 w7"]})
        return RDropSFTTrainer(model=model, args=args, train_dataset=data,
                               processing_class=tokenizer(), rdrop_alpha=0.5)

    makers = [rdrop_trainer]
    try:
        import trl  # noqa: F401

        makers.append(sft_trainer)
    except ImportError:  # trl not installed: RDropTrainer alone
        pass
    for make_trainer in makers:
        def loss_of(model, inputs, make_trainer=make_trainer):
            return make_trainer(model).compute_loss(model, inputs)

        compare_with_one_process(rank, world, tiny_llama, loss_of)


def test_fsdp2_trainers(tmp_path):
    run_ranks(_trainers_body, 2, str(tmp_path))


def _tensor_parallel_body(rank, world, stacked):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    mesh = init_device_mesh("cpu", (world,))
    inputs = batch(0)
    twice = torch.cat([inputs["input_ids"], inputs["input_ids"]])
    labels = inputs["labels"][:, 1:]

    def loss_of(model):
        torch.manual_seed(5)
        logits = model(input_ids=twice, use_cache=False).logits[:, :-1]
        if stacked:
            return fastrdrop.stacked_rdrop_loss(logits, labels, alpha=0.7, label_smoothing=0.1)
        first, second = logits.chunk(2)
        return fastrdrop.rdrop_loss(first, second, labels, alpha=0.7, label_smoothing=0.1)

    model = tiny_llama()
    parallelize_module(model, mesh, {"lm_head": ColwiseParallel(output_layouts=Shard(-1),
                                                                use_local_output=False)})
    loss = loss_of(model)
    loss.backward()
    one = tiny_llama()
    expected = loss_of(one)
    expected.backward()
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-5, atol=1e-6)
    got = full_gradients(model)
    for name, p in one.named_parameters():
        torch.testing.assert_close(got[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("stacked", [False, True], ids=["rdrop_loss", "stacked_rdrop_loss"])
def test_dtensor_logits_of_colwise_parallel(stacked):
    run_ranks(_tensor_parallel_body, 2, stacked)


def _tensor_parallel_causal_lm_body(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    mesh = init_device_mesh("cpu", (world,))
    inputs = batch(0)  # the same rows on every rank
    model = tiny_llama()
    parallelize_module(model, mesh, {"lm_head": ColwiseParallel(output_layouts=Shard(-1),
                                                                use_local_output=False)})
    torch.manual_seed(5)
    loss = rdrop_causal_lm_loss(model, **inputs, alpha=0.7).loss
    loss.backward()
    one = tiny_llama()
    torch.manual_seed(5)
    expected = rdrop_causal_lm_loss(one, **inputs, alpha=0.7).loss
    expected.backward()
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-5, atol=1e-6)
    got = full_gradients(model)
    for name, p in one.named_parameters():
        torch.testing.assert_close(got[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)
    # the local output, a plain tensor of this rank's vocabulary slice: refused, naming the fix
    local = tiny_llama()
    parallelize_module(local, mesh, {"lm_head": ColwiseParallel()})
    with pytest.raises(ValueError, match="use_local_output=False"):
        rdrop_causal_lm_loss(local, **inputs)


def test_rdrop_causal_lm_loss_of_colwise_parallel_head():
    # a tensor-parallel lm_head: its DTensor logits go to the vocabulary-parallel loss
    warnings.simplefilter("ignore")
    run_ranks(_tensor_parallel_causal_lm_body, 2)
