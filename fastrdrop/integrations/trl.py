"""R-Drop for TRL's supervised fine-tuning: :class:`RDropSFTTrainer` is ``trl.SFTTrainer`` with
the R-Drop step of :class:`fastrdrop.integrations.transformers.RDropTrainerMixin`. TRL prepares
the data as it always does: packing, padding-free batches (``position_ids``, no attention mask)
and completion-only or assistant-only labels keep working, since the loss reads the labels and
passes every other entry of the batch to the model.

Importing this module needs ``trl`` (``pip install fastrdrop[trl]``).
"""

from trl import SFTTrainer

from .transformers import RDropTrainerMixin

__all__ = ["RDropSFTTrainer"]


class RDropSFTTrainer(RDropTrainerMixin, SFTTrainer):
    """``trl.SFTTrainer`` whose training loss is R-Drop: the batch runs twice through the model in
    one forward, ``[x; x]``, and the fused linear loss adds the symmetric KL of the two passes
    to their cross entropies.

    Args:
        rdrop_alpha: the weight of the symmetric KL term.
        rdrop_kwargs: ``ignore_index`` (-100 only), ``label_smoothing`` or ``chunk_size`` for
            :func:`fastrdrop.integrations.transformers.rdrop_causal_lm_loss` (any other name or
            value raises when the trainer is built).
        All other arguments are ``SFTTrainer``'s.

    It normalises by the label tokens of all gradient-accumulation micro-batches, logs ``ce``
    and ``kl`` next to the loss, and evaluates with ``SFTTrainer``'s own loss (dropout off). In
    training it computes neither TRL's ``entropy`` nor its ``mean_token_accuracy``, which need
    the logits that the fused loss never materialises, nor counts its ``num_tokens``. Its
    training loss is cross entropy plus
    KL: a ``loss_type`` other than ``"nll"`` (``"dft"``) raises a ``ValueError``.
    """

    def __init__(self, *args, **kwargs):
        # before SFTTrainer is built, which wraps the model in PEFT adapters: a refused trainer
        # leaves it as it was (without args SFTTrainer's default config trains with "nll")
        config = kwargs.get("args", args[1] if len(args) > 1 else None)
        loss_type = getattr(config, "loss_type", "nll")
        if loss_type != "nll":
            raise ValueError(
                f"RDropSFTTrainer trains with cross entropy plus the symmetric KL, so "
                f"SFTConfig's loss_type must be 'nll', got {loss_type!r}")
        super().__init__(*args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training and self.aux_loss_enabled:
            # as SFTTrainer asks: multimodal wrappers read it from the call, not the config
            inputs = {**inputs, "output_router_logits": True}
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def _weighted_router_loss(self, model, router_loss, num_items_in_batch, accumulation):
        """A mixture of experts' router loss as SFTTrainer weights it: times its
        router_aux_loss_coef (SFTConfig's, else the model config's; 0 turns it off), a mean over
        the accumulated micro-batches where the loss is normalised by num_items_in_batch, and
        not multiplied by the processes."""
        if not self.aux_loss_enabled:
            return 0.0
        steps = accumulation if num_items_in_batch is not None else 1
        return self.router_aux_loss_coef * router_loss / steps
