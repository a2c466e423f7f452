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
    family = "sft"
    needs_logits = False
    token_mean_nll = True

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        targets = labels[:, 1:].reshape(-1)
        total = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.size(-1)).float(), targets, ignore_index=IGNORE_INDEX, reduction="sum"
        )
        return self.from_nll_sum(total, (targets != IGNORE_INDEX).sum())

    def from_token_logps(self, logps: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The same loss from the labelled tokens' log-probs (zero where ``mask`` is false)."""
        return self.from_nll_sum(-logps.sum(), mask.sum())

    def from_nll_sum(self, total: torch.Tensor,
                     num_tokens: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The same loss from the summed NLL of the ``num_tokens`` labelled tokens (a fused kernel's)."""
        loss = total / num_tokens.clamp(min=1)
        # Tensors: the trainer reads every metric of a step in one transfer (training/losses.py).
        return loss, {"loss": loss.detach(), "count": num_tokens.detach()}
