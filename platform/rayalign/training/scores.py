"""Scalar heads on packed rows: per-token scores (PPO values) and per-sequence scores (rewards).

Reward models and critics are ``AutoModelForSequenceClassification`` checkpoints with one output
(what TRL, OpenRLHF and vLLM's reward serving load). Their own forward pools at the last non-pad
token of a padded row, which a packed row has no notion of, so we run the backbone and the linear
``score`` head ourselves and pick positions from ``sequence_ids``.
"""

from __future__ import annotations

import torch


def hf_model(model):
    """The Hugging Face model under a DeepSpeed engine and/or a PEFT wrapper."""
    model = getattr(model, "module", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def token_scores(model, batch: dict) -> torch.Tensor:
    """The score head applied at every position of the packed row: shape [1, T], float32."""
    hf = hf_model(model)
    hidden = hf.base_model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                           use_cache=False).last_hidden_state
    return hf.score(hidden).squeeze(-1).float()


def last_token_index(sequence_ids: torch.Tensor, num_sequences: int | None = None) -> torch.Tensor:
    """Row position of each packed sequence's last token (sequences are contiguous, in order).

    With ``num_sequences`` (counted on the host when the row was packed) the positions come from
    a scatter of known size; without it, from ``nonzero``, whose output size the host must read
    back from the device first."""
    ids = sequence_ids[0]
    if num_sequences is None:
        ends = torch.nonzero(ids[1:] != ids[:-1]).squeeze(-1)
        return torch.cat([ends, torch.tensor([ids.numel() - 1], device=ids.device)])
    positions = torch.arange(ids.numel(), device=ids.device)
    return torch.zeros(num_sequences, dtype=positions.dtype, device=ids.device).scatter_reduce(
        0, ids, positions, "amax", include_self=False)


def sequence_scores(model, batch: dict) -> torch.Tensor:
    """One score per packed sequence, read at its last token (a reward model's output)."""
    n = batch.get("num_sequences")
    index = last_token_index(batch["sequence_ids"], None if n is None else int(n))
    return token_scores(model, batch)[0, index]
