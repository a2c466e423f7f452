"""KTO: a loss on unpaired examples, each completion marked desirable or not."""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field

from rayalign.training.losses import Loss
from rayalign_dpo.losses import Beta

Weight = Annotated[float, Field(gt=0)]


class KTOLoss(Loss):
    """KTO (Ethayarajh et al. 2024): mean of ``w * (1 - sigmoid(beta * v))`` over unpaired examples.

    ``v = r - z0`` for a desirable completion and ``z0 - r`` for an undesirable one. ``r`` is the
    log-ratio of policy to reference on the completion (summed log-probs); ``z0``, the reference
    point, is the policy's KL from the reference, estimated on the micro-batch's mismatched
    sequences (each prompt with another example's completion), clamped at 0 and carrying no
    gradient. ``w`` is ``desirable_weight`` or ``undesirable_weight``: with unequal numbers of the
    two, the paper advises ``desirable_weight * n_desirable / (undesirable_weight * n_undesirable)``
    between 1 and 4/3. TRL's ``KTOTrainer`` (``loss_type="kto"``) computes the same on one batch.
    """

    name = "kto"
    family = "unpaired"

    def __init__(self, beta: Beta = 0.1, desirable_weight: Weight = 1.0, undesirable_weight: Weight = 1.0):
        super().__init__(beta=beta, desirable_weight=desirable_weight, undesirable_weight=undesirable_weight)
        self.beta, self.desirable_weight, self.undesirable_weight = beta, desirable_weight, undesirable_weight

    def forward(self, policy_logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor,
                policy_kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        kl = (policy_kl_logps - ref_kl_logps).mean().detach().clamp(min=0)
        ratio = policy_logps - ref_logps
        desirable = desirable.bool()
        value = torch.where(desirable, ratio - kl, kl - ratio)
        weight = torch.where(desirable, self.desirable_weight, self.undesirable_weight).to(value.dtype)
        loss = (weight * (1 - torch.sigmoid(self.beta * value))).mean()
        return loss, {
            "loss": loss.detach(),
            "kl": kl,
            # Does the implied reward sit on the label's side of the reference point? (0 before training)
            "label_accuracy": (value.detach() > 0).float().mean(),
        }
