"""Next-token cross-entropy on the trained (assistant) tokens only."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rayalign.training.losses import IGNORE_INDEX, Loss


class CrossEntropyLoss(Loss):
    """Mean negative log-likelihood over tokens whose label is not ``IGNORE_INDEX``.

    Matches ``transformers``' causal-LM loss (and so TRL's ``SFTTrainer``) on the same labels.
    """

    name = "sft"
    needs_logits = False

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        targets = labels[:, 1:].reshape(-1)
        num_tokens = (targets != IGNORE_INDEX).sum()
        total = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.size(-1)).float(), targets, ignore_index=IGNORE_INDEX, reduction="sum"
        )
        loss = total / num_tokens.clamp(min=1)
        return loss, {"loss": loss.item(), "count": float(num_tokens.item())}

    def from_token_logps(self, logps: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """The same loss from the labelled tokens' log-probs (zero where ``mask`` is false)."""
        num_tokens = mask.sum()
        loss = -logps.sum() / num_tokens.clamp(min=1)
        return loss, {"loss": loss.item(), "count": float(num_tokens.item())}
