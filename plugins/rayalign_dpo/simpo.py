"""SimPO: a reference-free preference loss on length-normalised log-probs, with a target margin."""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field

from rayalign_dpo.losses import Beta, PreferenceLoss


class SimPOLoss(PreferenceLoss):
    """SimPO (Meng et al. 2024): ``-log sigmoid(beta * (mean_c - mean_r) - gamma)``, no reference model.

    The implicit reward of an answer is ``beta`` times its mean token log-prob (``uses_mean_logps``),
    so length alone earns nothing; ``gamma`` is the target margin between the two rewards. TRL's
    ``CPOTrainer`` with ``loss_type="simpo"``, ``cpo_alpha=0`` computes the same (``simpo_gamma`` there).
    """

    name = "simpo"
    needs_reference = False
    uses_mean_logps = True

    def __init__(self, beta: Beta = 0.1, gamma: Annotated[float, Field(ge=0)] = 0.5):
        super().__init__(beta=beta, gamma=gamma)
        self.gamma = gamma

    def penalty(self, margin: torch.Tensor) -> torch.Tensor:
        return -F.logsigmoid(self.beta * margin - self.gamma)
