"""Preference losses on per-sequence log-probs of the policy and the frozen reference.

``PreferenceLoss`` is what a pairwise loss shares: a margin of the pair's log-probs, a penalty on
it, and the implicit-reward metrics. DPO and IPO live here; SimPO (simpo.py) and ORPO (orpo.py)
are reference-free ones of the same shape, KTO (kto.py) is the unpaired family's.
"""

from __future__ import annotations

from typing import Annotated, Any

import torch
import torch.nn.functional as F
from pydantic import Field

from rayalign.training.losses import Loss, shifted_token_logps

Beta = Annotated[float, Field(gt=0)]


class PreferenceLoss(Loss):
    """``penalty(margin(...))`` averaged over pairs; a subclass defines ``penalty`` (and may
    redefine ``margin``). Its ``__init__``'s typed keywords are its options, as for every loss."""

    family = "preference"

    def __init__(self, beta: Beta = 0.1, **options: Any):
        super().__init__(beta=beta, **options)
        self.beta = beta

    def margin(self, pc: torch.Tensor, pr: torch.Tensor, rc: torch.Tensor, rr: torch.Tensor) -> torch.Tensor:
        return (pc - pr) - (rc - rr)

    def penalty(self, margin: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(
        self,
        policy_chosen: torch.Tensor,
        policy_rejected: torch.Tensor,
        ref_chosen: torch.Tensor,
        ref_rejected: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss = self.penalty(self.margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected)).mean()
        chosen_reward = self.beta * (policy_chosen - ref_chosen).detach()
        rejected_reward = self.beta * (policy_rejected - ref_rejected).detach()
        # Tensors: the trainer reads a step's metrics in one transfer (training/losses.py).
        return loss, {
            "loss": loss.detach(),
            "reward_accuracy": (chosen_reward > rejected_reward).float().mean(),
            "reward_margin": (chosen_reward - rejected_reward).mean(),
            "chosen_reward": chosen_reward.mean(),
            "rejected_reward": rejected_reward.mean(),
        }


class SigmoidDPOLoss(PreferenceLoss):
    """DPO (Rafailov et al. 2023, eq. 7): ``-log sigmoid(beta * margin)`` on summed log-probs."""

    name = "sigmoid"

    def penalty(self, margin: torch.Tensor) -> torch.Tensor:
        return -F.logsigmoid(self.beta * margin)


class IPOLoss(PreferenceLoss):
    """IPO (Azar et al. 2023, eq. 17): ``(margin - 1/(2 beta))^2``.

    The paper's log-ratios are per-token averages, so the stage feeds mean, not summed, log-probs
    (``uses_mean_logps``), as TRL does.
    """

    name = "ipo"
    uses_mean_logps = True

    def penalty(self, margin: torch.Tensor) -> torch.Tensor:
        return (margin - 1 / (2 * self.beta)) ** 2


class UnlikelihoodLoss(Loss):
    """Token-level unlikelihood (Welleck et al. 2019, eq. 4): ``-log(1 - p(token))`` on marked tokens.

    ``mask`` is aligned with ``labels`` and marks the tokens to push down (the DPO stage marks the
    tokens of a looping rejected answer that repeat an earlier n-gram of it). The mean is over
    marked tokens, 0 when a micro-batch has none.
    """

    name = "unlikelihood"
    family = "token_penalty"

    def forward(self, logits: torch.Tensor, labels: torch.Tensor,
                mask: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        token_logps, valid = shifted_token_logps(logits, labels)
        marked = valid & mask[:, 1:].bool()
        # log(1 - p) computed as log1p(-p), with p kept below 1 so a certain repeat stays finite.
        penalty = -torch.log1p(-token_logps.exp().clamp(max=1 - 1e-6))
        count = marked.sum()
        loss = (penalty * marked).sum() / count.clamp(min=1)
        return loss, {"ul_loss": loss.detach(), "ul_tokens": count}
