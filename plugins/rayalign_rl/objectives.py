"""What the trainer, critic and reference workers compute on packed RL rows.

Functions here travel to the worker actors (``compute``/``score``/``setup``); each returns a
tuple of [1, T-1] tensors aligned with the shifted labels. Per-token inputs in a batch
(``old_logps``, ``advantages``, ...) are [1, T] in label alignment, hence the ``[:, 1:]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rayalign.training.losses import IGNORE_INDEX, shifted_token_logps
from rayalign.training.scores import token_scores
from rayalign_rl.losses import ClippedPolicyLoss, ClippedValueLoss


def _logits(model, batch) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits


@dataclass
class TokenLogps:
    """Log-prob of each answer token under the sampling distribution ``softmax(logits / T)``
    (the reference model's job). The temperature matters: the policy that produced the answers is
    the tempered one, and TRL's GRPO scores every log-prob that way too."""

    temperature: float = 1.0

    def __call__(self, model, batch) -> tuple[torch.Tensor]:
        return (shifted_token_logps(_logits(model, batch) / self.temperature, batch["labels"])[0],)


@dataclass
class PolicyForward:
    """The policy before the update: tempered log-probs of the answer tokens, the tempered
    distribution's entropy there, and the raw (T=1) log-probs, which are what vLLM reports and
    so what the sync check compares."""

    temperature: float = 1.0

    def __call__(self, model, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = _logits(model, batch)
        raw, _ = shifted_token_logps(logits, batch["labels"])
        tempered = logits / self.temperature
        logps, _ = shifted_token_logps(tempered, batch["labels"])
        all_logps = F.log_softmax(tempered[:, :-1].float(), dim=-1)
        entropy = -(all_logps.exp() * all_logps).sum(-1)
        return logps, entropy, raw


def token_values(model, batch) -> tuple[torch.Tensor]:
    """The critic's V(state before token t) for every answer token t."""
    return (token_scores(model, batch)[:, :-1],)


def answer_mask(batch) -> torch.Tensor:
    return batch["labels"][:, 1:] != IGNORE_INDEX


@dataclass
class PolicyObjective:
    loss: ClippedPolicyLoss
    kl_in_loss: bool = False
    temperature: float = 1.0

    def weight(self, batch) -> float:
        """Answer tokens (token_mean) or answers (sequence_mean): the micro-batch's share of a step."""
        if self.loss.aggregation == "sequence_mean":
            return float(int(batch["sequence_ids"].max()) + 1)
        return float(answer_mask(batch).sum())

    def __call__(self, model, batch):
        logps, mask = shifted_token_logps(_logits(model, batch) / self.temperature, batch["labels"])
        ref = batch["ref_logps"][:, 1:] if self.kl_in_loss else None
        loss, metrics = self.loss(logps, batch["old_logps"][:, 1:], batch["advantages"][:, 1:], mask, ref,
                                  batch["sequence_ids"][:, 1:])
        metrics["count"] = self.weight(batch)
        return loss, metrics


@dataclass
class ValueObjective:
    loss: ClippedValueLoss

    def weight(self, batch) -> float:
        return float(answer_mask(batch).sum())

    def __call__(self, model, batch):
        values = token_values(model, batch)[0]
        loss, metrics = self.loss(values, batch["old_values"][:, 1:], batch["returns"][:, 1:], answer_mask(batch))
        metrics["count"] = self.weight(batch)
        return loss, metrics
