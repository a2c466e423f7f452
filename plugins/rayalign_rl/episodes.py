"""Episodes (a prompt and one sampled answer) and their packing into training rows.

Per-token quantities (log-probs, values, advantages) live per episode as arrays over the answer's
tokens. In a packed row they sit at the answer tokens' label positions: ``scatter`` puts them
there and ``gather`` reads a model's shifted outputs (position t-1 scores label t) back out.

A multi-turn episode (``rayalign_rl.multiturn``) has a ``loss_mask`` over ``completion_ids``: True
on the tokens the model sampled, False on the environment's observations. Only the masked tokens
are labelled, and its per-token arrays hold one value per model token.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
import torch

from rayalign.data.chat import Tokenized
from rayalign.data.packing import collate_packed, group_by_tokens
from rayalign.training.losses import IGNORE_INDEX


@dataclass
class Episode:
    prompt_index: int  # into the step's prompt records
    prompt_ids: list[int]
    completion_ids: list[int]
    text: str | None  # None until decoded (engines return token ids; the loop decodes in a batch)
    finish_reason: str
    weights_version: int
    vllm_logps: np.ndarray
    reward: float = 0.0
    reward_terms: dict[str, float] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)  # old_logps, ref_logps, values, ...
    loss_mask: np.ndarray | None = None  # multi-turn: True on the model's tokens of completion_ids
    info: dict = field(default_factory=dict)  # multi-turn: end_reason, turns, the transcript, ...

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)

    @property
    def num_trained(self) -> int:
        """The answer tokens the model sampled: what the per-token arrays cover."""
        return len(self.completion_ids) if self.loss_mask is None else int(np.count_nonzero(self.loss_mask))

    def labels(self) -> list[int]:
        """``completion_ids`` where the loss is taken, IGNORE_INDEX on observations."""
        if self.loss_mask is None:
            return list(self.completion_ids)
        return np.where(self.loss_mask, np.asarray(self.completion_ids), IGNORE_INDEX).tolist()

    def trained_offsets(self) -> np.ndarray:
        """Offsets in ``completion_ids`` of the tokens the loss covers."""
        if self.loss_mask is None:
            return np.arange(len(self.completion_ids))
        return np.flatnonzero(self.loss_mask)


def current_episodes(prompts: list[list[int]], grouped: list[list], version: int,
                     max_staleness: int = 0) -> tuple[list[Episode], int]:
    """Episodes from completions sampled under weights ``version`` (or, asynchronous RL, up to
    ``max_staleness`` versions before it), and how many answers were stale (sampled under any
    other version) and dropped. A prompt keeps its answers only if all are current: group
    baselines (GRPO, RLOO) need whole groups. For the same reason an empty answer stays: it has no
    token to train, but its reward is part of its group's baseline."""
    episodes, stale = [], 0
    for i, completions in enumerate(grouped):
        if any(not version - max_staleness <= c.weights_version <= version for c in completions):
            stale += len(completions)
            continue
        episodes += [Episode(i, prompts[i], c.token_ids, c.text, c.finish_reason, c.weights_version,
                             np.asarray(c.logprobs if c.logprobs is not None else [], dtype=np.float32))
                     for c in completions]
    return episodes, stale


def informative_groups(episodes: list[Episode]) -> tuple[list[Episode], int]:
    """The episodes of the prompts whose answers did not all get the same reward, and how many
    prompts were dropped (DAPO's dynamic sampling). Under a group baseline (GRPO, RLOO) an all-equal
    group's advantages are zero: it would take its share of the step and teach nothing but its KL
    term. ``episodes`` are prompt-major, as ``current_episodes`` returns them."""
    kept, dropped = [], 0
    for _, group in itertools.groupby(episodes, key=lambda e: e.prompt_index):
        group = list(group)
        if len({e.reward for e in group}) > 1:
            kept += group
        else:
            dropped += 1
    return kept, dropped


@dataclass
class PackedRow:
    batch: dict[str, torch.Tensor]
    episodes: list[int]  # indices of the episodes in the row, in order
    positions: list[np.ndarray]  # label positions of each episode's answer tokens


def pack(episodes: list[Episode], max_tokens: int, seed: int) -> list[PackedRow]:
    rows = []
    for group in group_by_tokens([len(e) for e in episodes], max_tokens, seed):
        seqs = [Tokenized(episodes[i].prompt_ids + episodes[i].completion_ids,
                          [IGNORE_INDEX] * len(episodes[i].prompt_ids) + episodes[i].labels()) for i in group]
        batch = collate_packed(seqs)
        positions, start = [], 0
        for i in group:
            positions.append(start + len(episodes[i].prompt_ids) + episodes[i].trained_offsets())
            start += len(episodes[i])
        rows.append(PackedRow(batch, list(group), positions))
    return rows


def gather(row: PackedRow, shifted: torch.Tensor) -> list[np.ndarray]:
    """Per-episode arrays from a [1, T-1] tensor aligned with the shifted labels."""
    flat = shifted[0].numpy()
    return [flat[pos - 1] for pos in row.positions]


def scatter(row: PackedRow, arrays: list[np.ndarray]) -> torch.Tensor:
    """A [1, T] float tensor holding each episode's array at its answer tokens' label positions."""
    full = np.zeros(row.batch["input_ids"].shape[1], dtype=np.float32)
    for pos, values in zip(row.positions, arrays):
        full[pos] = values
    return torch.from_numpy(full)[None]
