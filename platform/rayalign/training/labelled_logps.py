"""Log-probs of only the tokens a batch trains on, without the full [tokens x vocabulary] logits.

A causal LM's output head and its log-softmax are the largest activations of a fine-tuning step
at today's vocabularies (Qwen2: 152k entries; about 12 bytes per token x entry on CUDA with the
fp32 copy and the gradients, docs/memory.md), and a chat dataset trains on a fraction of its
tokens (the assistant turns). So:

1. the head runs only at positions whose next token has a label;
2. it runs a chunk of those positions at a time, with the log-softmax, under activation
   checkpointing, so neither the kept logits nor their fp32 copy outlive their chunk: backward
   recomputes them chunk by chunk.

Where the model can be taken apart at its head (``output_head.split_output_head``: the common
Llama/Qwen/Mistral families, not under ZeRO-3) both hold. Any other model runs its own forward
with transformers' ``logits_to_keep`` (an index tensor), so only (2)'s log-softmax is chunked; a
model without ``logits_to_keep`` gives full logits, which are then indexed (same result, less
saving).

The result equals ``shifted_token_logps`` on the full logits at the kept positions (same
arithmetic, so within float rounding); tests/test_labelled_logps.py checks values and gradients.
A loss that is a plain sum of token NLLs (SFT) can go further, with the head's gradient taken in
the same pass: training/linear_cross_entropy.py.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Annotated, Iterator, Literal

import torch
from pydantic import Field
from torch.utils.checkpoint import checkpoint

from rayalign.training.losses import IGNORE_INDEX
from rayalign.training.output_head import SplitModel, split_output_head
from rayalign.training.scores import hf_model

CHUNK_TOKENS = 1024  # positions per log-softmax chunk: 1024 x 152k fp32 = 0.6 GB at most, briefly

# The stage option (SFT, DPO). ``auto``: ``labelled`` where the rows are on a GPU and the loss
# can take it, ``full`` elsewhere (on CPU both cost the same at the tests' sizes, and ``full`` is
# the path every TRL-equivalence test checks). On a GPU labelled trained as fast as full in much
# less memory (sft_throughput.py and dpo_throughput.py keep measuring both: their `rayalign_full`
# sides); the memory planner's logits term, validated on full logits, over-estimates it.
LogitsMode = Annotated[Literal["auto", "full", "labelled"], Field(
    description="auto: labelled on a GPU where the loss allows it, else full; full: the model's logits at every "
                "position; labelled: the output head only where the next token is trained, in checkpointed chunks "
                "(less memory and head compute; needs a loss that works from token log-probs)")]


def wants_labelled(mode: str, batch: dict, loss_allows: bool = True) -> bool:
    """Whether ``mode`` means the labelled path for this (device-resident) batch."""
    if mode == "auto":
        return loss_allows and batch["input_ids"].is_cuda
    return mode == "labelled"


@dataclass
class LabelledLogps:
    """``logps[b, k]``: log-prob of the label after position ``positions[k]`` in row ``b``;
    ``mask[b, k]`` says whether that label counts (rows of one batch share the kept positions)."""

    logps: torch.Tensor  # [B, K], float32, zero where masked
    mask: torch.Tensor  # [B, K], bool
    positions: torch.Tensor  # [K], positions t of the input scoring label t + 1


def _accepts_logits_to_keep(model) -> bool:
    """Under a DeepSpeed engine and a PEFT wrapper, does the causal LM's forward take ``logits_to_keep``?"""
    return "logits_to_keep" in inspect.signature(hf_model(model).forward).parameters


def chunk_logps(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``log softmax(logits / temperature)[..., target]`` in float32, for logits [..., V] and targets [...]."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def token_logps_of(logits: torch.Tensor, targets: torch.Tensor, chunk: int = CHUNK_TOKENS,
                   temperature: float = 1.0) -> torch.Tensor:
    """``log softmax(logits / temperature)[target]`` for [N, V] logits and [N] targets, ``chunk``
    rows at a time; with gradients on, each chunk is checkpointed (its fp32 work is redone in
    backward, not kept)."""
    save = torch.is_grad_enabled() and logits.requires_grad
    parts = []
    for start in range(0, logits.size(0), chunk):
        rows, tgt = logits[start:start + chunk], targets[start:start + chunk]
        parts.append(checkpoint(chunk_logps, rows, tgt, temperature, use_reentrant=False) if save
                     else chunk_logps(rows, tgt, temperature))
    return torch.cat(parts) if parts else logits.new_zeros(0, dtype=torch.float32)


def label_targets(batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Shifted targets [B, T-1], their mask, and the positions [K] where any row has a label."""
    targets = batch["labels"][:, 1:]
    mask = targets != IGNORE_INDEX
    positions = mask.any(dim=0).nonzero().squeeze(-1)
    return targets, mask, positions


def _head_chunk_logps(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
                      temperature: float = 1.0) -> torch.Tensor:
    return chunk_logps(head(hidden), targets, temperature)


def head_token_logps(split: SplitModel, hidden: torch.Tensor, targets: torch.Tensor,
                     chunk: int = CHUNK_TOKENS, temperature: float = 1.0) -> torch.Tensor:
    """``log softmax(head(hidden) / temperature)[target]`` for [N, H] hidden states and [N] targets,
    ``chunk`` rows at a time; with gradients on, each chunk (head included) is checkpointed."""
    save = torch.is_grad_enabled() and (hidden.requires_grad or split.head.weight.requires_grad)
    parts = []
    for start in range(0, hidden.size(0), chunk):
        rows, tgt = hidden[start:start + chunk], targets[start:start + chunk]
        parts.append(checkpoint(_head_chunk_logps, split.head, rows, tgt, temperature, use_reentrant=False) if save
                     else _head_chunk_logps(split.head, rows, tgt, temperature))
    return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)


def labelled_token_logps(model, batch: dict, chunk: int = CHUNK_TOKENS, temperature: float = 1.0) -> LabelledLogps:
    """Run ``model`` on a (packed) batch and score the labelled tokens, as described above, under
    ``softmax(logits / temperature)`` (RL scores the tempered distribution it sampled from)."""
    targets, mask, positions = label_targets(batch)
    kept_targets, kept_mask = targets[:, positions], mask[:, positions]
    safe = kept_targets.masked_fill(~kept_mask, 0).reshape(-1)
    split = split_output_head(model)
    if split is not None:
        hidden = split.hidden_states(batch)[:, positions]  # [B, K, H]
        flat = head_token_logps(split, hidden.reshape(-1, hidden.size(-1)), safe, chunk, temperature)
        return LabelledLogps(flat.view(kept_mask.shape) * kept_mask, kept_mask, positions)
    inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    if _accepts_logits_to_keep(model):
        logits = model(**inputs, logits_to_keep=positions).logits  # [B, K, V]
    else:
        logits = model(**inputs).logits[:, positions]
    flat = token_logps_of(logits.reshape(-1, logits.size(-1)), safe, chunk, temperature)
    return LabelledLogps(flat.view(kept_mask.shape) * kept_mask, kept_mask, positions)


def labelled_logits(model, batch: dict, chunk: int = CHUNK_TOKENS) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Without gradients: ``(start, end, logits)`` for consecutive slices of the labelled positions
    (``label_targets(batch)[2][start:end]``), ``logits`` [B, end - start, V] computed a slice at a
    time, for passes that need more of the distribution than the labels' log-probs (entropy)."""
    positions = label_targets(batch)[2]
    split = split_output_head(model)
    if split is not None:
        hidden = split.hidden_states(batch)[:, positions]
        for start in range(0, positions.numel(), chunk):
            yield start, min(start + chunk, positions.numel()), split.head(hidden[:, start:start + chunk])
        return
    inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    if _accepts_logits_to_keep(model):
        logits = model(**inputs, logits_to_keep=positions).logits
    else:
        logits = model(**inputs).logits[:, positions]
    for start in range(0, positions.numel(), chunk):
        yield start, min(start + chunk, positions.numel()), logits[:, start:start + chunk]


def at_positions(values: torch.Tensor, positions: torch.Tensor, length: int) -> torch.Tensor:
    """[B, K] values at ``positions`` laid into zeros of [B, length] (gradients flow to ``values``)."""
    return values.new_zeros(values.size(0), length).index_copy(1, positions, values)


def labelled_sequence_logps(model, batch: dict, num_sequences: int,
                            chunk: int = CHUNK_TOKENS) -> tuple[torch.Tensor, torch.Tensor]:
    """``sequence_logps`` (sums and token counts per packed sequence) by way of ``labelled_token_logps``."""
    scored = labelled_token_logps(model, batch, chunk)
    owner = batch["sequence_ids"][:, 1:][:, scored.positions].reshape(-1)
    sums = scored.logps.new_zeros(num_sequences).index_add_(0, owner, scored.logps.reshape(-1))
    counts = scored.logps.new_zeros(num_sequences).index_add_(0, owner, scored.mask.reshape(-1).float())
    return sums, counts
