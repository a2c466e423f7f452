"""Padding-free packing: many sequences share one row, each with its own position ids.

Attention never crosses sequences: with no attention mask, ``use_cache=False`` (a KV cache switches
the detection off) and position ids that restart at 0,
``transformers`` builds a block-diagonal causal mask (sdpa/eager) or uses variable-length
flash-attention, so a packed row computes exactly what the sequences would compute alone.
"""

from __future__ import annotations

import random
from typing import Sequence

import numpy as np
import torch

from rayalign.data.chat import Tokenized
from rayalign.data.labels import IGNORE_INDEX


def group_by_tokens(lengths: Sequence[int], max_tokens: int, seed: int) -> list[list[int]]:
    """Shuffle indices, then fill rows of at most ``max_tokens`` in that order.

    A group is a list of indices into ``lengths``; a sequence longer than ``max_tokens`` gets a
    row of its own (the tokenizer already truncated it to the model's max length).
    """
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    groups: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i in order:
        if current and used + lengths[i] > max_tokens:
            groups.append(current)
            current, used = [], 0
        current.append(i)
        used += lengths[i]
    if current:
        groups.append(current)
    return groups


def collate_packed(sequences: Sequence[Tokenized]) -> dict[str, torch.Tensor]:
    """One packed row: ``input_ids``, ``position_ids``, ``labels``, ``sequence_ids`` of shape [1, T] (int64)."""
    lengths = np.array([len(seq) for seq in sequences], dtype=np.int64)
    starts = np.cumsum(lengths) - lengths
    empty = np.zeros(0, dtype=np.int32)
    input_ids = np.concatenate([empty, *(seq.input_ids for seq in sequences)])
    labels = np.concatenate([empty, *(seq.labels for seq in sequences)])  # a copy: the sequences stay as they are
    # The first token of a sequence must not be scored by the last token of the previous one.
    labels[starts[lengths > 0]] = IGNORE_INDEX
    position_ids = np.arange(len(input_ids)) - np.repeat(starts, lengths)
    sequence_ids = np.repeat(np.arange(len(sequences)), lengths)
    as_row = lambda xs: torch.from_numpy(xs.astype(np.int64)).unsqueeze(0)  # noqa: E731
    return {
        "input_ids": as_row(input_ids),
        "position_ids": as_row(position_ids),
        "labels": as_row(labels),
        "sequence_ids": as_row(sequence_ids),
    }
