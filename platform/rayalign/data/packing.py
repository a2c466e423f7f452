"""Padding-free packing: many sequences share one row, each with its own position ids.

Attention never crosses sequences: with no attention mask, ``use_cache=False`` (a KV cache switches
the detection off) and position ids that restart at 0,
``transformers`` builds a block-diagonal causal mask (sdpa/eager) or uses variable-length
flash-attention, so a packed row computes exactly what the sequences would compute alone.
"""

from __future__ import annotations

import random
from typing import Sequence

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
    """One packed row: ``input_ids``, ``position_ids``, ``labels``, ``sequence_ids`` of shape [1, T]."""
    input_ids, position_ids, labels, sequence_ids = [], [], [], []
    for k, seq in enumerate(sequences):
        input_ids += seq.input_ids
        position_ids += range(len(seq))
        # The first token of a sequence must not be scored by the last token of the previous one.
        labels += [IGNORE_INDEX] + seq.labels[1:]
        sequence_ids += [k] * len(seq)
    as_row = lambda xs: torch.tensor([xs], dtype=torch.long)  # noqa: E731
    return {
        "input_ids": as_row(input_ids),
        "position_ids": as_row(position_ids),
        "labels": as_row(labels),
        "sequence_ids": as_row(sequence_ids),
    }
