"""ORPO: the chosen answer's NLL plus an odds-ratio preference term, without a reference model."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from rayalign_dpo.losses import Beta, PreferenceLoss


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, accurate at both ends: ``log(-expm1(x))`` above ``-log 2``,
    ``log1p(-exp(x))`` below (Maechler 2012, "Accurately computing log(1 - exp(-|a|))")."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


class ORPOLoss(PreferenceLoss):
    """ORPO (Hong et al. 2024): ``NLL(chosen) - beta * log sigmoid(log odds_c - log odds_r)``, no reference.

    ``odds(y) = p / (1 - p)`` with ``p`` the answer's mean token probability (``uses_mean_logps``);
    ``beta`` is the paper's lambda. The NLL is one token-level mean over the micro-batch's chosen
    sequences (``chosen_nll``): prompt and answer with ``prompt_nll`` (the default, as TRL's
    ``ORPOTrainer`` and the authors' code compute it), the answers' tokens alone without.
    """

    name = "orpo"
    needs_reference = False
    uses_mean_logps = True

    def __init__(self, beta: Beta = 0.1, prompt_nll: bool = True):
        super().__init__(beta=beta, prompt_nll=prompt_nll)
        self.chosen_nll_tokens = "sequence" if prompt_nll else "answer"

    def margin(self, pc: torch.Tensor, pr: torch.Tensor, rc: torch.Tensor, rr: torch.Tensor) -> torch.Tensor:
        """The log odds ratio of chosen over rejected (the reference's log-probs are not used)."""
        return (pc - pr) - (log1mexp(pc) - log1mexp(pr))

    def penalty(self, log_odds: torch.Tensor) -> torch.Tensor:
        return -self.beta * F.logsigmoid(log_odds)

    def forward(self, policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                ref_rejected: torch.Tensor, *, chosen_nll: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        odds_ratio, metrics = super().forward(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
        loss = chosen_nll + odds_ratio
        metrics.update(loss=loss.detach(), orpo_nll=chosen_nll.detach(), odds_ratio_loss=odds_ratio.detach())
        return loss, metrics
