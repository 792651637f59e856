"""fastrdrop: the R-Drop loss (cross entropy of two dropout passes + their symmetric KL), fused."""

from . import buffers, reference
from ._common import RDropParts, set_label_check
from .linear import LinearRDropLoss, linear_rdrop_loss
from .loss import RDropLoss, StackedRDropLoss, rdrop_loss, stacked_rdrop_loss

__all__ = ["LinearRDropLoss", "RDropLoss", "RDropParts", "StackedRDropLoss", "buffers",
           "linear_rdrop_loss", "rdrop_loss", "reference", "set_label_check", "stacked_rdrop_loss"]
__version__ = "0.1.0"
