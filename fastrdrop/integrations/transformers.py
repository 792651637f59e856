"""R-Drop for Hugging Face Transformers causal LMs (and PEFT-wrapped ones): the model runs once
on the duplicated batch [x; x]. With a plain linear output embedding the fused linear loss takes
its last hidden states, and the logits of neither pass are ever materialised whole; any other
head (an adapter on lm_head, say) gives the logits of both passes, stacked, to
stacked_rdrop_loss, which writes their gradient into one buffer. The trainers' R-Drop step is
RDropTrainerMixin, shared with fastrdrop.integrations.trl.

Importing this module needs ``transformers``; ``fastrdrop`` itself does not.
"""

import difflib
import inspect
import weakref
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import Trainer

from .._common import RDropParts, warn
from ..distributed import is_dtensor
from ..linear import linear_rdrop_loss, matmul_dtypes_meet
from ..loss import stacked_rdrop_loss

__all__ = ["HeadNotFusedWarning", "NoDropoutWarning", "RDropTrainer", "RDropTrainerMixin",
           "rdrop_causal_lm_loss"]


class NoDropoutWarning(UserWarning):
    """The two passes of R-Drop cannot differ: the model has no active dropout."""


NO_DROPOUT = (
    "R-Drop needs dropout, and this model has none active: no dropout module with p > 0 in "
    "training mode and no dropout probability > 0 in its config. Both passes give the same "
    "logits, so the KL term is 0 and each step costs two ordinary ones. Turn dropout on: set a "
    "dropout probability of the model's config when loading it (its name depends on the model: "
    "attention_dropout, hidden_dropout, resid_pdrop, ...; e.g. "
    "from_pretrained(name, attention_dropout=0.1)), or lora_dropout > 0 in the LoraConfig, and "
    "train in training mode (model.train()).")

_warned: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


class HeadNotFusedWarning(UserWarning):
    """The model's logits are not its output embedding applied to its last hidden states, so the
    loss takes its logits, which are then materialised whole."""


HEAD_NOT_FUSED = (
    "this model's logits are not its output embedding (lm_head) applied to its last hidden "
    "states, softcapped as its config says: something comes between them (a scale, as in "
    "Granite and Cohere, a transform, as in BERT-like decoders, a cut of a padded vocabulary, "
    "...). The fused linear loss cannot stand in for that, so rdrop_causal_lm_loss takes the "
    "model's own logits, [2B, T, V] at once, and gives them to stacked_rdrop_loss.")

# Per model: whether its logits are lm_head(last hidden states), which the fused linear loss
# assumes; found on its first eager call, from the logits of one position.
_head_fused: "weakref.WeakKeyDictionary[nn.Module, bool]" = weakref.WeakKeyDictionary()


def rdrop_causal_lm_loss(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Optional[Tensor] = None,
    labels: Optional[Tensor] = None,
    *,
    alpha: float = 1.0,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    num_items_in_batch: Optional[Tensor | int] = None,
    chunk_size: Optional[int] = None,
    shift_labels: Optional[Tensor] = None,
    **model_kwargs,
) -> RDropParts:
    """R-Drop loss of a causal LM on a batch, its two passes in one forward of the model on the
    batch twice, ``[x; x]``.

    Call it with the model in training mode: dropout makes the two passes differ. The loss is
    computed from what the model's own forward returns (the model runs as a whole, so that
    wrappers such as FSDP see their forward): with a plain linear output embedding, its last
    hidden states, which go to :func:`fastrdrop.linear_rdrop_loss` with the head's weight (the
    logits are never materialised whole); with any other head (LoRA on ``lm_head``, FSDP2's
    ``lm_head`` in a group of its own, a tensor-parallel ``lm_head`` whose weight is a DTensor,
    a head that ``device_map`` offloaded), its logits, which go to
    :func:`fastrdrop.stacked_rdrop_loss` (DTensor logits sharded on the vocabulary included). A
    tensor-parallel head that returns its rank's slice of the logits as a plain tensor raises
    ``ValueError``.

    The first eager call on a model checks that its logits are the head applied to its last
    hidden states, softcapped as its config says (at the last position; three numbers read
    back to the host). Where they are not (Granite's and Cohere's scales, the transform of
    BERT-like decoders, a softcap that the model does not apply), it warns once
    (:class:`HeadNotFusedWarning`), runs the model again, and that model's loss takes its
    logits from then on. Where that position cannot tell (logits all 0, from a head initialised
    to 0; or where the softcap does not show beyond their rounding), that call takes the
    model's logits and the next one checks again. A mixture of experts' router loss
    (``aux_loss``) is added times the model's ``router_aux_loss_coef``, as the model adds it to
    its own loss.

    Args:
        model: a ``*ForCausalLM`` model, or a PEFT model wrapping one (prompt tuning's virtual
            tokens are left out of the loss). Its output embedding may be tied to the input
            one; the config's ``final_logit_softcapping`` (Gemma 2; a multimodal model's text
            config's) or ``logits_soft_cap`` (RecurrentGemma) is applied when set.
        input_ids: [B, T] token ids.
        attention_mask: [B, T] or None (padding-free batches carry ``position_ids`` instead),
            or a model's own [B, 1, T, T] mask (then with ``labels``).
        labels: [B, T] with ``ignore_index`` where no loss is wanted; None uses ``input_ids``
            (padding, where ``attention_mask`` is 0, ignored). Shifted inside, as for causal LM:
            position t predicts label t + 1. In a packed batch the first label of each sequence
            must be ``ignore_index`` (TRL's collators do this), so that no position predicts
            across a boundary.
        shift_labels: [B, T] labels already shifted, position t's own (``labels[:, t + 1]``);
            they take the place of ``labels``, as in transformers' losses. Context and sequence
            parallelism pass them: each rank holds shards of the sequence, whose boundaries a
            shift inside the shard would misalign.
        num_items_in_batch: the number of label tokens over all gradient-accumulation
            micro-batches (what ``transformers.Trainer`` passes): the sum is divided by it, so
            that 4 micro-batches of 1 give the update of 1 batch of 4. None: mean over this
            batch's label tokens.
        alpha, ignore_index, label_smoothing, chunk_size: as in
            :func:`fastrdrop.linear_rdrop_loss`.
        model_kwargs: passed on to the model, each [B, ...] tensor twice along dim 0 (along
            dim 1 for a padding-free batch of one row under flash attention, see the README):
            ``position_ids`` of padding-free batches, and ``cu_seq_lens_q``/``cu_seq_lens_k``
            (flash attention's cumulative sequence lengths), which then cover both copies.
            A keyword of fastrdrop's losses that this function does not take (``reduction``,
            ``softcap``, ...), or a near miss of one of its own that the model's forward does
            not name (``label_smothing``), raises ``TypeError``: the model would take it
            without a word.

    Warns (:class:`NoDropoutWarning`, once per model) when no dropout is active, as then both
    passes are the same and R-Drop only doubles the cost.

    Returns:
        ``RDropParts(loss, ce1, ce2, kl)``; ``loss`` carries the gradient, and holds the router
        loss where there is one.
    """
    parts, router_loss = _parts_and_router_loss(
        model, input_ids, attention_mask, labels, alpha=alpha, ignore_index=ignore_index,
        label_smoothing=label_smoothing, num_items_in_batch=num_items_in_batch,
        chunk_size=chunk_size, shift_labels=shift_labels, **model_kwargs)
    if router_loss is None:
        return parts
    return parts._replace(loss=parts.loss + _router_aux_loss_coef(model) * router_loss)


def _parts_and_router_loss(model, input_ids, attention_mask=None, labels=None, *, alpha=1.0,
                           ignore_index=-100, label_smoothing=0.0, num_items_in_batch=None,
                           chunk_size=None, shift_labels=None,
                           **model_kwargs) -> tuple[RDropParts, Optional[Tensor]]:
    """rdrop_causal_lm_loss without the router loss of a mixture of experts, and that loss
    apart (on the loss's device; None where the model returns none), for the trainers, which
    weight it as their base classes do."""
    _check_batch(input_ids, attention_mask, labels, shift_labels, num_items_in_batch)
    base = _unwrap(model)
    if not torch.compiler.is_compiling():  # a graph traced after an eager call
        _check_model_kwargs(base, model_kwargs)
    head = base.get_output_embeddings()
    softcap = _final_softcap(_text_config(base))
    if not torch.compiler.is_compiling():
        if model not in _warned and not _dropout_active(model):
            _warned.add(model)  # once per model
            warn(NO_DROPOUT, NoDropoutWarning)
        _install_output_capture(base)
    if shift_labels is None:
        if labels is None:
            labels = input_ids if attention_mask is None else input_ids.masked_fill(
                attention_mask == 0, ignore_index)
        # position t predicts token t + 1; the last position predicts nothing
        shift_labels = F.pad(labels[:, 1:], (0, 1), value=ignore_index)
    batch = dict(input_ids=input_ids, attention_mask=attention_mask, **model_kwargs)
    one_row = _in_one_row(model, base, batch)
    batch = _both_passes(batch, dim=1 if one_row else 0)
    # no cache: it is of no use in training, and where one is made (use_cache in the config, in
    # evaluation mode) transformers skips the masks that keep packed sequences apart
    batch["use_cache"] = False
    keywords = dict(alpha=alpha, ignore_index=ignore_index, label_smoothing=label_smoothing,
                    reduction="mean" if num_items_in_batch is None else "sum",
                    return_parts=True)
    n, seq_len = input_ids.shape
    # a head of its own weight: not a DTensor, nor offloaded (device_map's meta weight, which
    # only its own forward loads)
    fused = (type(head) is nn.Linear and not is_dtensor(head.weight)
             and head.weight.device.type != "meta" and _head_fused.get(base, True))
    if fused:
        check = base not in _head_fused and not torch.compiler.is_compiling()
        # the last hidden states, and the logits of no position at all (of the last, to check)
        keep = 1 if check else torch.empty(0, dtype=torch.long, device=input_ids.device)
        out = model(**batch, output_hidden_states=True, logits_to_keep=keep)
        hidden = _passes(out.hidden_states[-1], seq_len, model, one_row)
        if check:
            verdict = _logits_of_head(out.logits[:, -1], out.hidden_states[-1][:, -1], head,
                                      softcap)
            if verdict is not None:  # else the model's logits, and the check again next call
                _head_fused[base] = verdict
            if verdict is False:
                warn(HEAD_NOT_FUSED, HeadNotFusedWarning)
            fused = bool(verdict)
            if not fused:
                del out, hidden  # this forward's graph: the logits' forward follows
    if fused:
        # the hidden states where the head is (a model spread over devices by device_map), and
        # the labels with them, as transformers' own loss moves them (FSDP2 moves the model's
        # inputs to its device, not the labels)
        hidden = hidden.to(head.weight.device)
        parts = linear_rdrop_loss(hidden[:n], hidden[n:], head.weight,
                                  shift_labels.to(hidden.device), head.bias, softcap=softcap,
                                  chunk_size=chunk_size, **keywords)
    else:
        # the model's own head (with its softcap): [2B, T, V], both passes stacked. So for a head
        # that is not a plain nn.Linear (LoRA, FSDP2's own group), one whose logits are not
        # lm_head(hidden states), and a tensor-parallel one, whose DTensor logits the loss takes
        # as they are
        out = model(**batch)
        logits = _passes(out.logits, seq_len, model, one_row)
        _check_whole_vocabulary(logits, head.weight)
        parts = stacked_rdrop_loss(logits, shift_labels.to(logits.device), **keywords)
    if num_items_in_batch is not None:  # 0: no label anywhere, and every sum 0, as is the mean
        count = num_items_in_batch.clamp(min=1) if torch.is_tensor(num_items_in_batch) else \
            max(num_items_in_batch, 1)
        parts = RDropParts(*(part / count for part in parts))
    # a mixture of experts' router load-balancing loss, which the model adds to its own loss
    # only when it is given the labels
    aux_loss = getattr(out, "aux_loss", None)
    return parts, None if aux_loss is None else aux_loss.to(parts.loss.device)


def _check_batch(input_ids, attention_mask, labels, shift_labels, num_items_in_batch) -> None:
    """ValueError or TypeError, naming the argument, for a batch that is not [B, T] tensors (an
    attention mask may also be a model's own [B, 1, T, T])."""
    if not torch.is_tensor(input_ids) or input_ids.dim() != 2 or input_ids.is_floating_point():
        raise ValueError("input_ids must be a [B, T] tensor of token ids, got "
                         f"{_described(input_ids)}")
    for name, value in (("labels", labels), ("shift_labels", shift_labels)):
        if value is not None and (not torch.is_tensor(value) or value.shape != input_ids.shape):
            raise ValueError(f"{name} must have input_ids' shape {list(input_ids.shape)}, got "
                             f"{_described(value)}")
    batch, seq_len = input_ids.shape
    if attention_mask is not None and (
            not torch.is_tensor(attention_mask) or attention_mask.dim() not in (2, 4)
            or attention_mask.shape[0] != batch or attention_mask.shape[-1] != seq_len):
        raise ValueError(f"attention_mask must be [B, T] = {[batch, seq_len]}, or [B, 1, T, T], "
                         f"got {_described(attention_mask)}")
    if (attention_mask is not None and attention_mask.dim() == 4
            and labels is None and shift_labels is None):
        raise ValueError("labels must be given with a [B, 1, T, T] attention_mask: without them "
                         "the labels are input_ids where a [B, T] mask is 1")
    if num_items_in_batch is not None:
        # a tensor: one count, or under DataParallel the Trainer's [n_gpu, 1] copies of it
        if not (torch.is_tensor(num_items_in_batch) or isinstance(num_items_in_batch, int)
                and not isinstance(num_items_in_batch, bool)):
            raise TypeError("num_items_in_batch must be an int or a tensor, got "
                            f"{num_items_in_batch!r}")
        if isinstance(num_items_in_batch, int) and num_items_in_batch < 0:
            raise ValueError(f"num_items_in_batch must be >= 0, got {num_items_in_batch}")


# rdrop_causal_lm_loss's own keywords, and those of fastrdrop's losses that it does not take
# (with what stands for each): any other keyword goes to the model's forward, which takes
# what it does not know without a word
LOSS_KEYWORDS = ("alpha", "ignore_index", "label_smoothing", "num_items_in_batch", "chunk_size",
                 "shift_labels")
NOT_TAKEN = {
    "reduction": "the loss is the mean over label tokens, or with num_items_in_batch their sum "
                 "divided by it",
    "softcap": "the softcap is the model config's final_logit_softcapping or logits_soft_cap",
    "backend": "the backend is the default one for the model's device",
    "inplace_backward": "the fused linear loss makes no logits, and the model's own are kept",
    "return_parts": "the parts are always returned",
    "vocab_parallel_group": "a vocabulary-parallel head's logits are DTensors, found as such",
}


def _check_model_kwargs(model: nn.Module, model_kwargs: dict) -> None:
    """TypeError for a keyword meant for the loss that would go to the model: one of
    fastrdrop's losses' that this function does not take, or a near miss of one of its own
    that the model's forward does not name."""
    for name in model_kwargs:
        if name in NOT_TAKEN:
            raise TypeError(f"rdrop_causal_lm_loss takes no {name} (it would go to the model's "
                            f"forward): {NOT_TAKEN[name]}")
        meant = difflib.get_close_matches(name, LOSS_KEYWORDS, n=1, cutoff=0.8)
        if meant and name not in inspect.signature(model.forward).parameters:
            raise TypeError(f"rdrop_causal_lm_loss got {name}=, which is none of its keywords "
                            f"and would go to the model's forward: did you mean {meant[0]}=?")


def _described(value) -> str:
    return f"shape {list(value.shape)}" if torch.is_tensor(value) else repr(value)


def _text_config(model: nn.Module):
    """The config of the model's language model: a multimodal model's text part."""
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _final_softcap(config) -> Optional[float]:
    """The cap c of the model's logits, c * tanh(z / c), where its config names one: Gemma 2's
    final_logit_softcapping (and its descendants'), RecurrentGemma's logits_soft_cap."""
    for name in ("final_logit_softcapping", "logits_soft_cap"):
        value = getattr(config, name, None)
        if value is not None:
            return value
    return None


def _logits_of_head(logits: Tensor, hidden: Tensor, head: nn.Linear,
                    softcap: Optional[float]) -> Optional[bool]:
    """Whether the model's logits [2B, V] at a position are head(hidden [2B, H]) there,
    softcapped: up to rounding (1e-2 of the largest, which a scale or a transform exceeds by
    far; 16-bit matmuls round to about 2e-3, and their logits may come out as fp32). With a cap,
    the capped head must also be clearly closer to them than the uncapped one (at small logits
    c tanh(z / c) is within 1% of z); where neither is, this position cannot tell: None, as
    where both are all 0 (a head initialised to 0). Reads three numbers back to the host (on a
    model's first calls)."""
    # an fp32 head beside 16-bit hidden states under autocast: linear_rdrop_loss takes it too
    if logits.shape[-1] != head.out_features or not matmul_dtypes_meet(head.weight, hidden):
        return False
    with torch.no_grad():
        plain = F.linear(hidden.to(head.weight.device), head.weight, head.bias).float()
        mine = plain if softcap is None else softcap * torch.tanh(plain / softcap)
        theirs = logits.float()
        largest = torch.maximum(mine.abs().max(), theirs.abs().max())
        largest, apart, uncapped_apart = torch.stack(
            [largest, (mine - theirs).abs().max(), (plain - theirs).abs().max()]).tolist()
    close = apart <= 1e-2 * largest
    if largest == 0:
        return None
    if softcap is None or not close:
        return close
    if 2 * apart < uncapped_apart:
        return True
    # the logits lack the cap (2 * uncapped_apart < apart), or it does not show yet
    return False if 2 * uncapped_apart < apart else None


def _passes(t: Tensor, seq_len: int, model: nn.Module, one_row: bool) -> Tensor:
    """The model's hidden states or logits as [2B, T, ...]: from [1, 2T, ...] where both passes
    went in one row, and at the batch's own positions."""
    if one_row:  # the first pass, then the second
        t = t.reshape(2, seq_len, *t.shape[2:])
    return _own_positions(t, seq_len, model)


def _own_positions(t: Tensor, seq_len: int, model: nn.Module) -> Tensor:
    """t [2B, T', ...] (hidden states or logits) at the batch's T positions: PEFT's prompt
    tuning puts its virtual tokens before them."""
    extra = t.shape[1] - seq_len
    if extra == 0:
        return t
    peft_config = _peft_config(model)
    if (extra > 0 and getattr(peft_config, "is_prompt_learning", False)
            and extra == getattr(peft_config, "num_virtual_tokens", None)):
        return t[:, extra:]
    raise ValueError(f"the model returns {t.shape[1]} positions for a batch of {seq_len} "
                     "tokens: the loss cannot tell which of them are the batch's")


def _router_aux_loss_coef(model: nn.Module) -> float:
    """The weight of a mixture of experts' router loss, where transformers' models keep it: the
    weight that the model's own forward gives it."""
    model = _unwrap(model)
    for owner, name in ((model, "router_aux_loss_coef"), (model, "aux_loss_coef"),
                        (_text_config(model), "router_aux_loss_coef")):
        value = getattr(owner, name, None)
        if value is not None:
            return value
    raise ValueError(f"{type(model).__name__} returns a router aux_loss but no weight for it "
                     "(router_aux_loss_coef) was found")


def _check_whole_vocabulary(logits: Tensor, weight: Tensor) -> None:
    """Logits that hold a rank's slice of the vocabulary as a plain tensor would give a loss over
    that slice alone."""
    if is_dtensor(weight) and not is_dtensor(logits) and logits.shape[-1] != weight.shape[0]:
        raise ValueError(
            f"the model returns {logits.shape[-1]} of its {weight.shape[0]} vocabulary entries "
            "as a plain tensor (a tensor-parallel lm_head that returns its local output): "
            "parallelize lm_head with ColwiseParallel(output_layouts=Shard(-1), "
            "use_local_output=False), whose DTensor logits the loss reduces across the ranks")


def _in_one_row(model: nn.Module, base: nn.Module, batch: dict) -> bool:
    """Whether both passes of a padding-free batch of one row go in one row, [1, 2T]. Flash
    attention tells the sequences packed in a row apart by their position_ids only in a batch of
    one row (transformers' _is_packed_sequence): in two rows, [2, T], each would attend across
    its sequences. In one row the second pass's positions start again at 0, a sequence of its
    own. The masks of the other attention implementations keep packed sequences apart in any
    batch (and flash attention does given cu_seq_lens_q/cu_seq_lens_k)."""
    peft_config = _peft_config(model)
    shape = batch["input_ids"].shape  # [1, T], as every tensor of the batch must be
    return (_flash_attention(base.config) and shape[0] == 1
            and batch.get("attention_mask") is None and batch.get("position_ids") is not None
            and not getattr(peft_config, "is_prompt_learning", False)
            and all(v.shape == shape for v in batch.values() if torch.is_tensor(v)))


def _peft_config(model: nn.Module):
    """The active PEFT config of a PEFT model, inside DDP too (whose wrapper does not pass the
    attribute on), or None."""
    return getattr(_inside_data_parallel(model), "active_peft_config", None)


def _flash_attention(config) -> bool:
    return "flash" in (getattr(config, "_attn_implementation", None) or "")


def _both_passes(batch: dict, dim: int = 0) -> dict:
    """The batch twice along dim 0 (the model runs both passes in one forward), or along dim 1
    for a batch of one row (see _in_one_row). Flash attention's cumulative sequence lengths index
    the flattened batch: the second copy's sequences follow the first's."""
    twice = {}
    for key, value in batch.items():
        if not torch.is_tensor(value) or value.dim() == 0:
            twice[key] = value
        elif key in ("cu_seq_lens_q", "cu_seq_lens_k"):
            twice[key] = torch.cat([value, value[1:] + value[-1]])
        elif key == "seq_idx" and dim == 1:  # the sequences of one row: the copy's come after
            twice[key] = torch.cat([value, value + value.max() + 1], dim=1)
        else:
            twice[key] = torch.cat([value, value], dim=dim)
    return twice


def _dropout_active(model: nn.Module) -> bool:
    """Whether the two passes can differ: a dropout module with p > 0 in training mode, or, in
    training mode, a dropout probability > 0 in the config (models such as Llama apply their
    attention dropout functionally, with no module). A config entry counts when its name holds
    "dropout" or "pdrop", except a classifier's."""
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.training and module.p > 0:
            return True
    config = getattr(_unwrap(model), "config", None)
    if not model.training or config is None:
        return False
    return any(isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
               for name, value in config.to_dict().items()
               if ("dropout" in name or "pdrop" in name) and "classifier" not in name)


def _unwrap(model: nn.Module) -> nn.Module:
    """The ``*ForCausalLM`` inside DDP (``.module``) and PEFT (``get_base_model()``) wrappers.
    The loss still calls the wrapped model: the wrappers' forward is where they do their work."""
    model = _inside_data_parallel(model)
    while hasattr(model, "get_base_model"):
        model = _inside_data_parallel(model.get_base_model())
    return model


def _inside_data_parallel(model: nn.Module) -> nn.Module:
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def _install_output_capture(model: nn.Module) -> None:
    """transformers 5 installs the hooks that collect hidden states on the first forward that
    asks for them, under a lock that torch.compile cannot trace: install them before any
    compiled call can be the first."""
    try:
        from transformers.utils.output_capturing import maybe_install_capturing_hooks
    except ImportError:  # another transformers: it collects them its own way
        return
    maybe_install_capturing_hooks(model)


# the keywords of rdrop_causal_lm_loss that the trainers take in rdrop_kwargs (alpha is
# rdrop_alpha; the batch gives the rest)
TRAINER_LOSS_KEYWORDS = ("ignore_index", "label_smoothing", "chunk_size")


class RDropTrainerMixin:
    """The R-Drop training step of :class:`RDropTrainer` and of
    :class:`fastrdrop.integrations.trl.RDropSFTTrainer`, which differ only in their base class
    (``transformers.Trainer``, ``trl.SFTTrainer``).

    In training mode the loss is :func:`rdrop_causal_lm_loss` on the batch, normalised by the
    number of label tokens across gradient-accumulation micro-batches (``num_items_in_batch``),
    so 4 micro-batches of 1 equal 1 batch of 4; ``ce`` (the mean of the two passes' cross
    entropies) and ``kl`` are logged next to the loss. Evaluation, with dropout off, is the base
    class's.

    Args:
        rdrop_alpha: the weight of the symmetric KL term.
        rdrop_kwargs: ``ignore_index`` (-100, the label the Trainer counts tokens by),
            ``label_smoothing`` or ``chunk_size`` for :func:`rdrop_causal_lm_loss` (any other
            name or value raises when the trainer is built). ``label_smoothing`` is
            ``TrainingArguments.label_smoothing_factor`` unless given here.
        All other arguments are the base class's.
    """

    def __init__(self, *args, rdrop_alpha: float = 1.0, rdrop_kwargs: Optional[dict] = None,
                 **kwargs):
        # checked before the base class is built, which changes the model (moves it, wraps it
        # in PEFT adapters): a refused trainer leaves it as it was
        rdrop_kwargs = dict(rdrop_kwargs or {})
        if "alpha" in rdrop_kwargs:
            raise ValueError("rdrop_kwargs must not hold alpha: the KL weight is rdrop_alpha=")
        unknown = sorted(set(rdrop_kwargs) - set(TRAINER_LOSS_KEYWORDS))
        if unknown:
            raise TypeError(f"rdrop_kwargs takes {', '.join(TRAINER_LOSS_KEYWORDS)}, got "
                            f"{', '.join(unknown)}")
        if rdrop_kwargs.get("ignore_index", -100) != -100:
            raise ValueError(
                "rdrop_kwargs' ignore_index must be -100: the loss is divided by the Trainer's "
                "count of label tokens (num_items_in_batch), which counts the labels that are "
                f"not -100; got {rdrop_kwargs['ignore_index']!r}")
        if kwargs.get("compute_loss_func") is not None:
            raise ValueError("compute_loss_func must be None: the R-Drop trainers' training loss "
                             "is rdrop_causal_lm_loss, which would silently take its place")
        super().__init__(*args, **kwargs)
        self.rdrop_alpha = rdrop_alpha
        self.rdrop_kwargs = rdrop_kwargs
        self.model_accepts_loss_kwargs = True  # so that the Trainer counts num_items_in_batch
        self._rdrop_sums = {"ce": 0.0, "kl": 0.0}
        self._rdrop_logged_step = None  # the step of the last log, or where training started

    def train(self, *args, **kwargs):
        self._rdrop_sums = {"ce": 0.0, "kl": 0.0}
        self._rdrop_logged_step = None  # set by the first step, a resumed run's too
        return super().train(*args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if self._rdrop_logged_step is None:
            self._rdrop_logged_step = self.state.global_step
        # every other entry of the batch (position_ids of packed batches, ...) goes to the model
        batch = dict(inputs)
        keywords = {"label_smoothing": self.args.label_smoothing_factor, **self.rdrop_kwargs}
        parts, router_loss = _parts_and_router_loss(
            model, batch.pop("input_ids"), batch.pop("attention_mask", None),
            batch.pop("labels", None), alpha=self.rdrop_alpha,
            num_items_in_batch=num_items_in_batch, **keywords, **batch)
        # With num_items_in_batch the micro-batch losses already sum to the step's mean.
        self.loss_is_scaled_for_ga = num_items_in_batch is not None
        accumulation = getattr(self, "current_gradient_accumulation_steps",  # set by train()
                               self.args.gradient_accumulation_steps)
        factor = self._count_factor(num_items_in_batch)
        loss = parts.loss * factor
        if router_loss is not None:
            loss = loss + self._weighted_router_loss(model, router_loss, num_items_in_batch,
                                                     accumulation)
        # of the logged parts, kept on the device and read when logged: reading them every step
        # would wait for the GPU
        scale = factor if self.loss_is_scaled_for_ga else factor / accumulation
        self._rdrop_sums["ce"] += (parts.ce1 + parts.ce2).detach() / 2 * scale
        self._rdrop_sums["kl"] += parts.kl.detach() * scale
        return (loss, {"ce": parts.ce1, "kl": parts.kl}) if return_outputs else loss

    def _count_factor(self, num_items_in_batch) -> float:
        """What the base class multiplies a loss divided by num_items_in_batch by."""
        if num_items_in_batch is None:
            return 1
        if self.args.average_tokens_across_devices:
            return self._data_parallel_processes()
        # DataParallel (n_gpu > 1): the Trainer gave the count over n_gpu, which each replica's
        # share of the batch would be divided by; this loss is the whole batch's
        return 1 / max(self.args.n_gpu, 1)

    def _data_parallel_processes(self) -> int:
        """The processes that a token count averaged over them spans (each process's share of
        the loss is then multiplied by their number, as their gradients are averaged)."""
        tensor_parallel = self.get_tp_size() if hasattr(self, "get_tp_size") else 1
        return self.accelerator.num_processes // tensor_parallel

    def _weighted_router_loss(self, model, router_loss, num_items_in_batch, accumulation):
        """A mixture of experts' router loss as transformers' Trainer weights it: the model adds
        it to its own loss times its router_aux_loss_coef, and the Trainer multiplies that loss
        by the processes where it averages the token count over them."""
        averaged = num_items_in_batch is not None and self.args.average_tokens_across_devices
        processes = self._data_parallel_processes() if averaged else 1
        return _router_aux_loss_coef(model) * router_loss * processes

    def log(self, logs: dict, *args, **kwargs) -> None:
        if "loss" in logs and self.model.training:
            steps = max(self.state.global_step - (self._rdrop_logged_step or 0), 1)
            for name, total in self._rdrop_sums.items():
                # the mean over the data-parallel processes, as the logged loss is
                mean = _mean_over_processes(self, torch.as_tensor(total, device=self.args.device))
                logs[name] = round(float(mean) / steps, 4)
                self._rdrop_sums[name] = 0.0
            self._rdrop_logged_step = self.state.global_step
        super().log(logs, *args, **kwargs)


def _mean_over_processes(trainer: Trainer, value: Tensor) -> Tensor:
    """A logged number's mean over the trainer's processes (all of them call log together)."""
    try:
        from transformers.trainer_pt_utils import nested_gather
    except ImportError:  # transformers before nested_gather left the Trainer
        return trainer._nested_gather(value).mean()
    return nested_gather(value, trainer.args.parallel_mode).mean()


class RDropTrainer(RDropTrainerMixin, Trainer):
    """``transformers.Trainer`` whose training loss is R-Drop on the duplicated batch (see
    :class:`RDropTrainerMixin` for what it adds: ``rdrop_alpha``, ``rdrop_kwargs``, the ``ce``
    and ``kl`` logs)."""
