"""fastrdrop: the R-Drop loss (cross entropy of two dropout passes + their symmetric KL), fused."""

from . import reference
from ._common import RDropParts
from .loss import RDropLoss, rdrop_loss

__all__ = ["RDropLoss", "RDropParts", "rdrop_loss", "reference"]
__version__ = "0.1.0"
