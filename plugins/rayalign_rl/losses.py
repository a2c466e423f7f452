"""Policy and value losses of PPO-style RL, on per-token tensors of packed rows.

All tensors are aligned with the shifted labels of a packed row (shape [1, T-1]); ``mask`` marks
the completion tokens, the only ones that count; ``sequence_ids`` says which packed answer each
position belongs to.

The policy losses share one computation (``PolicyLoss.forward``): an importance ratio, a per-token
surrogate, an optional k3 KL term, and an aggregation over the micro-batch. Each family is the
class that changes one of those steps:

* ``clipped_policy``: PPO's clipped surrogate, GRPO's with group advantages;
* ``dapo``: the clipped surrogate with DAPO's clip-higher and a token-level mean;
* ``gspo``: one importance ratio per answer, clipped per answer;
* ``dr_grpo``: answers' token sums over a constant instead of their lengths;
* ``cispo``: REINFORCE with a clipped, stop-gradient importance weight.
"""

from __future__ import annotations

from typing import Literal

import torch

from rayalign.errors import ConfigError
from rayalign.training.losses import Loss, build_loss


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1)


def kl_k3(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token KL(policy || reference) estimate, ``exp(r) - r - 1`` with ``r = ref - policy``
    (Schulman's "k3": unbiased, always >= 0), as GRPO adds it to the loss."""
    r = ref_logps - logps
    return torch.exp(r) - r - 1


def per_sequence(values: torch.Tensor, mask: torch.Tensor,
                 sequence_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of the masked ``values`` of each packed answer, and its count of masked tokens, in one
    slot per sequence id. There is one slot per position, which bounds the ids, so neither the
    number of answers nor which of them have tokens is read back to the host."""
    owner = sequence_ids.reshape(-1)
    slots = torch.zeros(owner.numel(), dtype=values.dtype, device=values.device)
    return slots.index_add(0, owner, (values * mask).reshape(-1)), slots.index_add(0, owner, mask.reshape(-1))


def count_answers(token_counts: torch.Tensor) -> torch.Tensor:
    """How many answers have a token that counts (``token_counts``: ``per_sequence``'s), at least 1."""
    return (token_counts > 0).to(token_counts.dtype).sum().clamp(min=1)


class PolicyLoss(Loss):
    """The computation every policy loss here shares, one overridable step at a time.

    ``ratio`` (each token's importance ratio), ``surrogate`` (the per-token loss), ``clipped``
    (where the clip acts: a metric) and ``aggregate`` (over the micro-batch).

    ``kl_coef`` adds the k3 KL to the reference per token; ``kl_ratio_correction`` multiplies it by
    the importance ratio, which makes its gradient the unbiased reverse-KL gradient off-policy
    (DeepSeek-V3.2; TRL's default ``use_bias_correction_kl``).

    ``aggregation`` is also what the stage weighs micro-batches by (``PolicyObjective.count``):
    ``token_mean`` by answer tokens, any other value by answers.
    """

    family = "policy"
    aggregation: str = "token_mean"

    def __init__(self, kl_coef: float = 0.0, kl_ratio_correction: bool = True, **options):
        super().__init__(kl_coef=kl_coef, **options)
        self.kl_coef, self.kl_ratio_correction = kl_coef, kl_ratio_correction

    def ratio(self, logps, old_logps, mask, sequence_ids) -> torch.Tensor:
        return torch.exp(logps - old_logps)

    def surrogate(self, ratio, logps, advantages) -> torch.Tensor:
        raise NotImplementedError

    def clipped(self, ratio, advantages) -> torch.Tensor:
        raise NotImplementedError

    def aggregate(self, per_token, mask, sequence_ids) -> torch.Tensor:
        return masked_mean(per_token, mask)

    def forward(self, logps, old_logps, advantages, mask, ref_logps=None, sequence_ids=None):
        mask = mask.to(logps.dtype)
        ratio = self.ratio(logps, old_logps, mask, sequence_ids)
        per_token = self.surrogate(ratio, logps, advantages)
        kl = None
        if ref_logps is not None:
            kl = kl_k3(logps, ref_logps)
            if self.kl_coef:
                per_token = per_token + self.kl_coef * (kl * ratio if self.kl_ratio_correction else kl)
        loss = self.aggregate(per_token, mask, sequence_ids)
        with torch.no_grad():
            # 0-d tensors, left on the device: the trainer reads a whole step's metrics in one transfer.
            metrics = {
                "policy_loss": loss.detach(),
                "clip_fraction": masked_mean(self.clipped(ratio, advantages).to(mask.dtype), mask),
                "approx_kl_old": masked_mean(0.5 * (logps - old_logps) ** 2, mask),
                "ratio_max": (ratio * mask).max(),
            }
            if kl is not None:
                metrics["kl_ref"] = masked_mean(kl, mask)
        return loss, metrics


class ClippedPolicyLoss(PolicyLoss):
    """PPO's clipped surrogate (Schulman et al. 2017), GRPO's with group advantages (Shao et al. 2024).

    ``-min(r * A, clip(r, 1 - clip_low, 1 + clip_high) * A)`` per token (PPO's eq. 7), with an
    optional k3 KL-to-reference term of weight ``kl_coef``.

    ``aggregation``: ``token_mean`` averages over every completion token of the micro-batch (TRL's
    ``dapo``/``bnpo``; the step-level mean is over all tokens of the step, see the stage's
    ``weight``); ``sequence_mean`` averages each sequence's tokens first, then sequences (TRL's
    ``grpo``). Asymmetric clipping (DAPO's "clip-higher") via ``clip_low``/``clip_high``.
    """

    name = "clipped_policy"

    def __init__(self, clip_low: float = 0.2, clip_high: float = 0.2, kl_coef: float = 0.0,
                 aggregation: Literal["token_mean", "sequence_mean"] = "token_mean", kl_ratio_correction: bool = True):
        super().__init__(kl_coef, kl_ratio_correction, clip_low=clip_low, clip_high=clip_high)
        self.clip_low, self.clip_high, self.aggregation = clip_low, clip_high, aggregation

    def surrogate(self, ratio, logps, advantages):
        clipped = torch.clamp(ratio, 1 - self.clip_low, 1 + self.clip_high)
        return -torch.min(ratio * advantages, clipped * advantages)

    def clipped(self, ratio, advantages):
        return ((ratio < 1 - self.clip_low) & (advantages < 0)) | ((ratio > 1 + self.clip_high) & (advantages > 0))

    def aggregate(self, per_token, mask, sequence_ids):
        if self.aggregation == "sequence_mean":
            sums, counts = per_sequence(per_token, mask, sequence_ids)
            return (sums / counts.clamp(min=1)).sum() / count_answers(counts)
        return masked_mean(per_token, mask)


class DAPOLoss(ClippedPolicyLoss):
    """DAPO (Yu et al. 2025): the clipped surrogate with clip-higher and a token-level mean.

    "Clip-higher" clips at 0.2 below and 0.28 above, which leaves unlikely tokens room to grow; the
    mean is over every answer token of the step, so a long answer weighs by its tokens. TRL's
    ``loss_type="dapo"``. DAPO as published has no KL term (``kl_coef: 0``); its dynamic sampling
    and overlong filtering are stage options (``dynamic_sampling``, ``overlong_filtering``)."""

    name = "dapo"

    def __init__(self, clip_low: float = 0.2, clip_high: float = 0.28, kl_coef: float = 0.0,
                 kl_ratio_correction: bool = True):
        super().__init__(clip_low, clip_high, kl_coef, "token_mean", kl_ratio_correction)


class GSPOLoss(ClippedPolicyLoss):
    """GSPO (Zheng et al. 2025): one importance ratio per answer, clipped per answer.

    The ratio is the geometric mean of the answer's token ratios, ``exp(mean(log p - log p_old))``;
    it is clipped at the paper's 3e-4 below and 4e-4 above (a length-normalised ratio moves little),
    and the loss is a mean over answers. The KL term, when any, is weighted by the answer's ratio.
    TRL's ``loss_type="grpo"`` with ``importance_sampling_level="sequence"``."""

    name = "gspo"

    def __init__(self, clip_low: float = 3e-4, clip_high: float = 4e-4, kl_coef: float = 0.0,
                 kl_ratio_correction: bool = True):
        super().__init__(clip_low, clip_high, kl_coef, "sequence_mean", kl_ratio_correction)

    def ratio(self, logps, old_logps, mask, sequence_ids):
        sums, counts = per_sequence(logps - old_logps, mask, sequence_ids)
        # Each position gets its answer's ratio; the gradient reaches every token of the answer.
        return torch.exp((sums / counts.clamp(min=1))[sequence_ids.reshape(-1)].reshape(logps.shape))


class DrGRPOLoss(ClippedPolicyLoss):
    """Dr. GRPO (Liu et al. 2025): each answer's token sum over a constant, not its length.

    The clipped surrogate is summed over each answer's tokens and divided by ``max_new_tokens``
    (the stage's longest answer: with an environment, ``environment.max_total_tokens``), not by the
    answer's length, which favours short right answers and long wrong
    ones; then averaged over answers. TRL's ``loss_type="dr_grpo"`` (its constant:
    ``max_completion_length``). Dr. GRPO's other half, advantages not divided by the group's reward
    std, is the stage's ``scale_rewards: false``."""

    name = "dr_grpo"

    def __init__(self, clip_low: float = 0.2, clip_high: float = 0.2, kl_coef: float = 0.0,
                 kl_ratio_correction: bool = True, max_new_tokens: int = 128):
        # "sequence_sum": a mean over answers, so the stage weighs micro-batches by answers.
        super().__init__(clip_low, clip_high, kl_coef, "sequence_sum", kl_ratio_correction)
        self.max_new_tokens = max_new_tokens

    def aggregate(self, per_token, mask, sequence_ids):
        _, tokens = per_sequence(mask, mask, sequence_ids)
        return (per_token * mask).sum() / (count_answers(tokens) * self.max_new_tokens)


class CISPOLoss(PolicyLoss):
    """CISPO (MiniMax-M1, 2025): REINFORCE with a capped, stop-gradient importance weight.

    Per token, ``-sg(min(r, 1 + clip_high)) * A * log p``, with a token-level mean. PPO's clip zeroes
    the gradient of a token outside the trust region; the cap only bounds its weight, so rare
    tokens that matter for reasoning keep learning. No lower cap (the paper sets none). TRL's
    ``loss_type="cispo"``, whose ``epsilon_high`` is the cap itself (``1 + clip_high``); the
    default, 4, is the cap of 5 that TRL recommends (from ScaleRL)."""

    name = "cispo"

    def __init__(self, clip_high: float = 4.0, kl_coef: float = 0.0, kl_ratio_correction: bool = True):
        super().__init__(kl_coef, kl_ratio_correction, clip_high=clip_high)
        self.clip_high = clip_high

    def surrogate(self, ratio, logps, advantages):
        return -torch.clamp(ratio, max=1 + self.clip_high).detach() * advantages * logps

    def clipped(self, ratio, advantages):
        return ratio > 1 + self.clip_high


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


POLICY_LOSSES = (ClippedPolicyLoss, DAPOLoss, GSPOLoss, DrGRPOLoss, CISPOLoss)

# Stage settings a policy loss may declare, by config key. Left unset (null) they leave the loss
# its own default (DAPO's 0.28, GSPO's 3e-4); set, they must be options of the loss.
POLICY_SETTINGS = {"clip_low": "clip_low", "clip_high": "clip_high", "loss_aggregation": "aggregation"}


def rl_losses(registry, cfg, where: str) -> tuple[Loss, Loss | None]:
    """The stage's policy loss and, with a critic (an estimator that ``needs_critic``: gae), its
    value loss, resolved by name (``policy_loss``, ``value_loss``) so a plugin's loss can replace
    either. The stage's clip, aggregation, KL and length settings go to a loss that declares them;
    a clip or aggregation set for a loss that has no such option is an error naming the key.
    ``loss_options`` and ``value_loss_options`` carry a loss's own."""
    settings = {option: getattr(cfg, key) for key, option in POLICY_SETTINGS.items() if getattr(cfg, key) is not None}
    policy = build_loss(registry, cfg.policy_loss, "policy", cfg.loss_options, f"{where}.policy_loss",
                        f"{where}.loss_options", stage_options=settings | {
                            "kl_coef": cfg.kl_coef if cfg.kl_in == "loss" else 0.0,
                            "kl_ratio_correction": cfg.kl_ratio_correction, "max_new_tokens": cfg.max_answer_tokens})
    takes = type(policy).Options.model_fields
    for key, option in POLICY_SETTINGS.items():
        if option in settings and option not in takes:
            raise ConfigError(f"{where}.{key}", f"policy loss {cfg.policy_loss!r} has no option {option} "
                              f"(its options: {', '.join(takes) or 'none'})")
    if not cfg.needs_critic:
        return policy, None
    value = build_loss(registry, cfg.value_loss, "value", cfg.value_loss_options, f"{where}.value_loss",
                       f"{where}.value_loss_options", stage_options={"clip": cfg.value_clip})
    return policy, value
