"""What the trainer, critic and reference workers compute on packed RL rows.

Functions here travel to the worker actors (``compute``/``score``/``setup``); each returns a
tuple of [1, T-1] tensors aligned with the shifted labels. Per-token inputs in a batch
(``old_logps``, ``advantages``, ...) are [1, T] in label alignment, hence the ``[:, 1:]``.

``logits`` (the stage option) picks how the output head runs. ``full``: the model's logits at every
position of the packed row. ``labelled`` (``auto`` on a GPU): the head only at answer positions, a
chunk at a time (``rayalign.training.labelled_logps``), so neither the [tokens x vocabulary] logits
nor their float32 copies exist at once; a 16k-token row of a 152k vocabulary otherwise holds tens
of GB in the update's forward and backward. Both give the same values (tests/test_rl_objectives.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rayalign.training.labelled_logps import (
    chunk_logps, at_positions, label_targets, labelled_logits, labelled_token_logps, wants_labelled)
from rayalign.training.losses import IGNORE_INDEX, Loss, shifted_token_logps
from rayalign.training.scores import token_scores


# Positions x vocabulary entries per float32 temporary in the no-gradient passes below (about
# 1 GiB): a 16k-token row of a 152k vocabulary would otherwise hold several 10 GB copies of its
# logits at once (float copy, log-softmax, exp, product), which torch's allocator then keeps.
LOGPROB_CHUNK_ELEMENTS = 1 << 28


def _logits(model, batch) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits


def _chunks(logits: torch.Tensor) -> list[tuple[int, int]]:
    """Slices ``[s, e + 1)`` of the positions: ``shifted_token_logps`` of a slice scores labels
    s+1..e with logits s..e-1, so the slices' results laid end to end are the whole row's."""
    positions = logits.shape[1] - 1
    step = max(1, LOGPROB_CHUNK_ELEMENTS // logits.shape[-1])
    return [(s, min(s + step, positions)) for s in range(0, positions, step)]


@dataclass
class TokenLogps:
    """Log-prob of each answer token under the sampling distribution ``softmax(logits / T)``
    (the reference model's job). The temperature matters: the policy that produced the answers is
    the tempered one, and TRL's GRPO scores every log-prob that way too."""

    temperature: float = 1.0
    logits: str = "auto"

    def __call__(self, model, batch) -> tuple[torch.Tensor]:
        if wants_labelled(self.logits, batch):
            return (tempered_logps(model, batch, self.temperature)[0],)
        logits, labels = _logits(model, batch), batch["labels"]
        return (torch.cat([shifted_token_logps(logits[:, s : e + 1] / self.temperature, labels[:, s : e + 1])[0]
                           for s, e in _chunks(logits)], dim=1),)


@dataclass
class PolicyForward:
    """The policy before the update: tempered log-probs of the answer tokens, the tempered
    distribution's entropy there, and the raw (T=1) log-probs, which are what vLLM reports and
    so what the sync check compares."""

    temperature: float = 1.0
    logits: str = "auto"

    def __call__(self, model, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if wants_labelled(self.logits, batch):
            return self._labelled(model, batch)
        logits, labels = _logits(model, batch), batch["labels"]
        logps, entropy, raw = [], [], []
        for s, e in _chunks(logits):
            piece, targets = logits[:, s : e + 1], labels[:, s : e + 1]
            raw.append(shifted_token_logps(piece, targets)[0])
            tempered = piece / self.temperature
            logps.append(shifted_token_logps(tempered, targets)[0])
            all_logps = F.log_softmax(tempered[:, :-1].float(), dim=-1)
            entropy.append(-(all_logps.exp() * all_logps).sum(-1))
        return torch.cat(logps, dim=1), torch.cat(entropy, dim=1), torch.cat(raw, dim=1)

    def _labelled(self, model, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        targets, mask, positions = label_targets(batch)
        kept = targets[:, positions].masked_fill(~mask[:, positions], 0)
        logps, entropy, raw = [], [], []
        for start, end, logits in labelled_logits(model, batch):
            tgt = kept[:, start:end]
            raw.append(chunk_logps(logits, tgt))
            logps.append(chunk_logps(logits, tgt, self.temperature))
            all_logps = torch.log_softmax(logits.float() / self.temperature, dim=-1)
            entropy.append(-(all_logps.exp() * all_logps).sum(-1))
        keep = mask[:, positions]
        length = targets.size(1)
        return tuple(at_positions(torch.cat(parts, dim=1) * keep, positions, length)
                     for parts in (logps, entropy, raw))


def tempered_logps(model, batch, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``shifted_token_logps(logits / temperature, labels)`` by way of the labelled path: the
    answer tokens' log-probs laid back into [B, T-1] (zeros elsewhere), and their mask."""
    scored = labelled_token_logps(model, batch, temperature=temperature)
    mask = batch["labels"][:, 1:] != IGNORE_INDEX
    return at_positions(scored.logps, scored.positions, mask.size(1)), mask


def token_values(model, batch) -> tuple[torch.Tensor]:
    """The critic's V(state before token t) for every answer token t."""
    return (token_scores(model, batch)[:, :-1],)


def answer_mask(batch) -> torch.Tensor:
    return batch["labels"][:, 1:] != IGNORE_INDEX


@dataclass
class PolicyObjective:
    loss: Loss  # family `policy`
    kl_in_loss: bool = False
    temperature: float = 1.0
    logits: str = "auto"

    def count(self, batch) -> torch.Tensor:
        """Answer tokens (a loss whose ``aggregation`` is token_mean) or answers (any other: GRPO's
        sequence_mean, Dr. GRPO's sequence_sum): the micro-batch's share of a step, as a 0-d tensor
        where the batch lies (on a GPU, reading it would wait for the device)."""
        if getattr(self.loss, "aggregation", "token_mean") != "token_mean":
            return (batch["sequence_ids"].max() + 1).float()
        return answer_mask(batch).sum().float()

    def weight(self, batch) -> float:
        return float(self.count(batch))

    def __call__(self, model, batch):
        if wants_labelled(self.logits, batch):
            logps, mask = tempered_logps(model, batch, self.temperature)
        else:
            logps, mask = shifted_token_logps(_logits(model, batch) / self.temperature, batch["labels"])
        ref = batch["ref_logps"][:, 1:] if self.kl_in_loss else None
        loss, metrics = self.loss(logps, batch["old_logps"][:, 1:], batch["advantages"][:, 1:], mask, ref,
                                  batch["sequence_ids"][:, 1:])
        metrics["count"] = self.count(batch)
        return loss, metrics


@dataclass
class ValueObjective:
    loss: Loss  # family `value`

    def weight(self, batch) -> float:
        return float(answer_mask(batch).sum())

    def __call__(self, model, batch):
        values = token_values(model, batch)[0]
        loss, metrics = self.loss(values, batch["old_values"][:, 1:], batch["returns"][:, 1:], answer_mask(batch))
        metrics["count"] = answer_mask(batch).sum().float()  # a tensor: no wait for the device
        return loss, metrics
