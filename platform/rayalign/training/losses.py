"""What every loss shares: the base class and the log-prob arithmetic on packed batches.

Losses are small modules registered by plugins (``register_losses``). Stages pick one by name
from config, so adding a loss never means editing an ``elif loss_type`` chain.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


class Loss(torch.nn.Module):
    """Base class of registered losses. ``name`` is the key configs use."""

    name: ClassVar[str]
    # False for a token loss that also implements ``from_token_logps(logps, mask)``: it can then run
    # on the labelled tokens' log-probs alone (a stage's ``logits: labelled``), never seeing logits.
    needs_logits: ClassVar[bool] = True

    def __init__(self, **options: float):
        super().__init__()
        self.options = options


def shifted_token_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of each next token and a mask of the positions that count.

    ``labels`` are aligned with the inputs (Hugging Face convention): position t's logits score
    label t+1. Returns tensors of shape ``labels.shape`` minus one step in time.
    """
    logits = logits[:, :-1].float()
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    safe = targets.masked_fill(~mask, 0)
    logps = torch.gather(F.log_softmax(logits, dim=-1), 2, safe.unsqueeze(-1)).squeeze(-1)
    return logps * mask, mask


def sequence_logps(
    logits: torch.Tensor, labels: torch.Tensor, sequence_ids: torch.Tensor, num_sequences: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of completion-token log-probs per sequence of a packed row, and their token counts.

    ``sequence_ids[0, t]`` says which packed sequence token t belongs to; the label of token t+1
    is scored by token t, which belongs to the same sequence because every sequence starts with
    an ignored (prompt/template) token.
    """
    token_logps, mask = shifted_token_logps(logits, labels)
    owner = sequence_ids[:, 1:].reshape(-1)
    sums = torch.zeros(num_sequences, dtype=token_logps.dtype, device=token_logps.device)
    counts = torch.zeros(num_sequences, dtype=token_logps.dtype, device=token_logps.device)
    sums.index_add_(0, owner, token_logps.reshape(-1))
    counts.index_add_(0, owner, mask.reshape(-1).to(token_logps.dtype))
    return sums, counts
