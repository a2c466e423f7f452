"""Policy and value losses of PPO-style RL, on per-token tensors of packed rows.

All tensors are aligned with the shifted labels of a packed row (shape [1, T-1]); ``mask`` marks
the completion tokens, the only ones that count.
"""

from __future__ import annotations

from typing import Literal

import torch

from rayalign.training.losses import Loss, build_loss


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1)


def kl_k3(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token KL(policy || reference) estimate, ``exp(r) - r - 1`` with ``r = ref - policy``
    (Schulman's "k3": unbiased, always >= 0), as GRPO adds it to the loss."""
    r = ref_logps - logps
    return torch.exp(r) - r - 1


class ClippedPolicyLoss(Loss):
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7), GRPO's when advantages are per
    sequence (Shao et al. 2024), with an optional k3 KL-to-reference term of weight ``kl_coef``.

    ``aggregation``: ``token_mean`` averages over every completion token of the micro-batch (TRL's
    ``dapo``/``bnpo``; the step-level mean is over all tokens of the step, see the stage's
    ``weight``); ``sequence_mean`` averages each sequence's tokens first, then sequences (TRL's
    ``grpo``). Asymmetric clipping (DAPO's "clip-higher") via ``clip_low``/``clip_high``.
    ``kl_ratio_correction`` multiplies the KL term by the importance ratio, which makes its
    gradient the unbiased reverse-KL gradient off-policy (DeepSeek-V3.2; TRL's default
    ``use_bias_correction_kl``).
    """

    name = "clipped_policy"
    family = "policy"

    def __init__(self, clip_low: float = 0.2, clip_high: float = 0.2, kl_coef: float = 0.0,
                 aggregation: Literal["token_mean", "sequence_mean"] = "token_mean", kl_ratio_correction: bool = True):
        super().__init__(clip_low=clip_low, clip_high=clip_high, kl_coef=kl_coef)
        self.clip_low, self.clip_high, self.kl_coef, self.aggregation = clip_low, clip_high, kl_coef, aggregation
        self.kl_ratio_correction = kl_ratio_correction

    def forward(self, logps, old_logps, advantages, mask, ref_logps=None, sequence_ids=None):
        mask = mask.to(logps.dtype)
        ratio = torch.exp(logps - old_logps)
        clipped = torch.clamp(ratio, 1 - self.clip_low, 1 + self.clip_high)
        per_token = -torch.min(ratio * advantages, clipped * advantages)
        kl = None
        if ref_logps is not None:
            kl = kl_k3(logps, ref_logps)
            if self.kl_coef:
                per_token = per_token + self.kl_coef * (kl * ratio if self.kl_ratio_correction else kl)
        if self.aggregation == "sequence_mean":
            # One slot per position bounds the sequence ids, so neither the number of sequences nor
            # which of them have answer tokens is read back to the host.
            owner = sequence_ids.reshape(-1)
            slots = torch.zeros(owner.numel(), dtype=per_token.dtype, device=per_token.device)
            sums = slots.index_add(0, owner, (per_token * mask).reshape(-1))
            counts = slots.index_add(0, owner, mask.reshape(-1))
            present = (counts > 0).to(per_token.dtype)
            loss = (sums / counts.clamp(min=1)).sum() / present.sum().clamp(min=1)
        else:
            loss = masked_mean(per_token, mask)
        with torch.no_grad():
            is_clipped = ((ratio < 1 - self.clip_low) & (advantages < 0)) | ((ratio > 1 + self.clip_high) & (advantages > 0))
            # 0-d tensors, left on the device: the trainer reads a whole step's metrics in one transfer.
            metrics = {
                "policy_loss": loss.detach(),
                "clip_fraction": masked_mean(is_clipped.to(mask.dtype), mask),
                "approx_kl_old": masked_mean(0.5 * (logps - old_logps) ** 2, mask),
                "ratio_max": (ratio * mask).max(),
            }
            if kl is not None:
                metrics["kl_ref"] = masked_mean(kl, mask)
        return loss, metrics


class ClippedValueLoss(Loss):
    """PPO's value loss with the new value kept within ``clip`` of the old one (as in OpenAI's
    baselines and TRL's former PPOTrainer): ``0.5 * max((v - R)^2, (v_clipped - R)^2)``."""

    name = "clipped_value"
    family = "value"

    def __init__(self, clip: float = 0.2):
        super().__init__(clip=clip)
        self.clip = clip

    def forward(self, values, old_values, returns, mask):
        mask = mask.to(values.dtype)
        clipped = old_values + torch.clamp(values - old_values, -self.clip, self.clip)
        loss = 0.5 * masked_mean(torch.max((values - returns) ** 2, (clipped - returns) ** 2), mask)
        with torch.no_grad():
            frac = masked_mean(((values - returns) ** 2 < (clipped - returns) ** 2).to(mask.dtype), mask)
        return loss, {"value_loss": loss.detach(), "value_clip_fraction": frac,
                      "value_mean": masked_mean(values.detach(), mask)}


def rl_losses(registry, cfg, where: str) -> tuple[Loss, Loss | None]:
    """The stage's policy loss and, with a critic (an estimator that ``needs_critic``: gae), its
    value loss, resolved by name (``policy_loss``, ``value_loss``) so a plugin's loss can replace
    either. The stage's clip and KL settings go to a loss that declares them; ``loss_options`` and
    ``value_loss_options`` carry a loss's own."""
    policy = build_loss(registry, cfg.policy_loss, "policy", cfg.loss_options, f"{where}.policy_loss",
                        f"{where}.loss_options", stage_options={
                            "clip_low": cfg.clip_low, "clip_high": cfg.clip_high,
                            "kl_coef": cfg.kl_coef if cfg.kl_in == "loss" else 0.0,
                            "aggregation": cfg.loss_aggregation, "kl_ratio_correction": cfg.kl_ratio_correction})
    if not cfg.needs_critic:
        return policy, None
    value = build_loss(registry, cfg.value_loss, "value", cfg.value_loss_options, f"{where}.value_loss",
                       f"{where}.value_loss_options", stage_options={"clip": cfg.value_clip})
    return policy, value
