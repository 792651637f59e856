"""The implementations being compared, each a function -> loss with the semantics of
fastrdrop.rdrop_loss at alpha=ALPHA, mean over tokens. What they take (Provider.inputs):

- "stacked", the case users run: (logits [2N, V], target [N]), both passes of one forward on
  [x; x]; the gradient is that of the one logits tensor;
- "pair", the kernel alone: (logits1, logits2, target), two separate tensors;
- "linear": (hidden1, hidden2, weight, target), the output embedding's matmul included."""

import functools
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

import fastrdrop
from fastrdrop import reference

ALPHA = 1.0


@dataclass(frozen=True)
class Provider:
    name: str
    make: Callable[[], Callable]  # builds the loss function (compiles, imports) once
    inputs: str = "stacked"  # "stacked" | "pair" | "linear", see above
    inplace: bool = False  # overwrites the logits: the timer hands it fresh copies
    grad_only: bool = False  # without grad it is another provider's call: fwd is not timed
    full_gradient: bool = True  # False: known to drop part of the gradient (said in the README)
    unavailable: Callable[[torch.device], Optional[str]] = lambda device: None


def _on_halves(loss):
    """loss(logits1, logits2, target) on the halves of stacked logits, as users split them."""
    def fn(logits, target):
        return loss(*logits.chunk(2), target)

    return fn


def _eager():
    return functools.partial(reference.rdrop_loss, alpha=ALPHA)


def _textbook():
    """R-Drop as its code is usually written: each pass's log-softmax in fp32, two cross
    entropies and the two KL directions with F.kl_div, means over the tokens. The reference's
    loss for finite logits with no token ignored (the benchmark's inputs), without its handling
    of masked entries, NaN and ignored tokens, so with fewer passes over the logits."""
    def loss(logits1, logits2, target):
        logp1 = F.log_softmax(logits1.float(), dim=-1)
        logp2 = F.log_softmax(logits2.float(), dim=-1)
        ce = F.nll_loss(logp1, target) + F.nll_loss(logp2, target)
        sym_kl = 0.5 * (F.kl_div(logp2, logp1, reduction="batchmean", log_target=True)
                        + F.kl_div(logp1, logp2, reduction="batchmean", log_target=True))
        return ce + ALPHA * sym_kl

    return _on_halves(loss)


def _compiled():
    # Every case compiles anew: its shapes would otherwise add graphs to the earlier cases' until
    # Dynamo's recompile limit, past which it runs the function eagerly with a warning (the GPU
    # runner measures every case in one process; the runner makes reaching it an error)
    torch._dynamo.reset()
    return torch.compile(_on_halves(_eager()), dynamic=False)


def _fastrdrop():
    return functools.partial(fastrdrop.rdrop_loss, alpha=ALPHA)


def _stacked(inplace):
    return functools.partial(fastrdrop.stacked_rdrop_loss, alpha=ALPHA, inplace_backward=inplace)


def _matmul_then(loss):
    def fn(hidden1, hidden2, weight, target):
        return loss(hidden1 @ weight.t(), hidden2 @ weight.t(), target)

    return fn


def _linear():
    return functools.partial(fastrdrop.linear_rdrop_loss, alpha=ALPHA)


def _liger():
    """Best Liger-Kernel composition: two fused cross entropies and two KL divergences on
    log-softmax inputs. The loss is R-Drop's, but Liger's KL sends no gradient to its target,
    so each direction misses the gradient of one side: half the KL gradient is absent. Liger's
    cross entropy returns its reduced loss in the logits' dtype (a bf16 loss between 16 and 32 is
    a multiple of 1/8), so it returns the tokens' losses and they are averaged in fp32; and it
    writes its gradient into the logits (an in-place provider)."""
    from liger_kernel.transformers import LigerCrossEntropyLoss, LigerKLDIVLoss

    cross_entropy = LigerCrossEntropyLoss(reduction="none")
    kl_div = LigerKLDIVLoss(reduction="sum", log_target=True)

    def loss(logits1, logits2, target):
        logp1 = F.log_softmax(logits1.float(), dim=-1)
        logp2 = F.log_softmax(logits2.float(), dim=-1)
        n_tokens = logits1.shape[0]  # the benchmark ignores no token
        sym_kl = 0.5 * (kl_div(logp2, logp1) + kl_div(logp1, logp2)) / n_tokens
        ce = (cross_entropy(logits1, target).float().mean()
              + cross_entropy(logits2, target).float().mean())
        return ce + ALPHA * sym_kl

    return _on_halves(loss)


def _liger_unavailable(device):
    if device.type != "cuda":
        return "Liger-Kernel runs on GPU only"
    try:
        import liger_kernel  # noqa: F401
    except ImportError:
        return "liger-kernel is not installed"
    return None


def _fastrdrop_unavailable(device):
    if device.type == "cpu" and fastrdrop.loss.default_backend(device) == "torch":
        return "no fused CPU backend here (fastrdrop would run the reference)"
    return None


PROVIDERS = {
    p.name: p
    for p in [
        Provider("eager", lambda: _on_halves(_eager())),
        Provider("textbook", _textbook),
        Provider("compile", _compiled),
        Provider("liger", _liger, inplace=True, unavailable=_liger_unavailable,
                 full_gradient=False),
        Provider("fastrdrop", lambda: _on_halves(_fastrdrop()),
                 unavailable=_fastrdrop_unavailable),
        Provider("fastrdrop-stacked", functools.partial(_stacked, False),
                 unavailable=_fastrdrop_unavailable),
        Provider("fastrdrop-stacked-inplace", functools.partial(_stacked, True), inplace=True,
                 grad_only=True, unavailable=_fastrdrop_unavailable),
        Provider("fastrdrop-pair", _fastrdrop, inputs="pair",
                 unavailable=_fastrdrop_unavailable),
        Provider("matmul+eager", lambda: _matmul_then(_eager()), inputs="linear"),
        Provider("matmul+fastrdrop", lambda: _matmul_then(_fastrdrop()), inputs="linear",
                 unavailable=_fastrdrop_unavailable),
        Provider("fastrdrop-linear", _linear, inputs="linear",
                 unavailable=_fastrdrop_unavailable),
    ]
}
