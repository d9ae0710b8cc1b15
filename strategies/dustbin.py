"""`dustbin`: subset classes plus one "other" output, trained at a fixed mix (Hinton et al.'s specialists).

The expert has C + 1 outputs; every out-of-subset sample is labelled "other" (index C). When it answers
"other" at inference, the system falls back to the generalist's answer. `other_share` of each batch comes
from outside the subset for the whole run (the distillation paper's specialists used half).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from askexpert.errors import UserError
from strategies.base import SpecializationStrategy


class DustbinSpecialization(SpecializationStrategy):
    """Args:
    other_share: share of each batch drawn from outside the subset, all labelled "other".
    """

    name = "dustbin"
    other_output = True

    def __init__(self, other_share: float = 0.5) -> None:
        super().__init__()
        if not 0.0 <= other_share < 1.0:
            raise UserError(f"dustbin other_share must be in [0, 1), got {other_share}")
        self.other_share = other_share

    def out_share(self, progress: float, natural: float) -> float:
        return self.other_share

    @staticmethod
    def dustbin_targets(labels: torch.Tensor, in_subset: torch.Tensor, num_classes: int) -> torch.Tensor:
        """True labels inside the subset, `num_classes` ("other") outside it."""
        return torch.where(in_subset, labels, torch.full_like(labels, num_classes))

    def loss(self, module, inputs, logits, labels, in_subset):
        targets = self.dustbin_targets(labels, in_subset, module.hparams.num_classes)
        return F.cross_entropy(logits, targets, label_smoothing=module.hparams.label_smoothing)
