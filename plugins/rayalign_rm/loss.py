"""Bradley-Terry pairwise loss on reward-model scores (Ouyang et al. 2022, eq. 1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rayalign.training.losses import Loss


class BradleyTerryLoss(Loss):
    """``-log sigmoid(r_chosen - r_rejected - margin)``, mean over pairs, as TRL's RewardTrainer.

    ``center_rewards`` adds ``c * mean((r_chosen + r_rejected)^2)`` (Eisenstein et al. 2023), which
    keeps scores near zero so several reward models can be combined with fixed weights.
    """

    name = "bradley_terry"
    family = "reward"

    def __init__(self, center_rewards: float = 0.0):
        super().__init__(center_rewards=center_rewards)
        self.center_rewards = center_rewards

    def forward(self, chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | float = 0.0):
        loss = -F.logsigmoid(chosen - rejected - margin).mean()
        if self.center_rewards:
            loss = loss + self.center_rewards * ((chosen + rejected) ** 2).mean()
        diff = (chosen - rejected).detach()
        # 0-d tensors, left on the device: the trainer reads a whole step's metrics in one transfer.
        return loss, {
            "loss": loss.detach(),
            "accuracy": (diff > 0).float().mean(),
            "margin": diff.mean(),
            "chosen_score": chosen.detach().mean(),
            "rejected_score": rejected.detach().mean(),
        }
