"""What every loss shares: the base class, its contract, and the log-prob arithmetic on packed batches.

Losses are small modules registered by plugins (``register_losses``). Stages pick one by name
from config, so adding a loss never means editing an ``elif loss_type`` chain. Each loss
declares its ``family`` (which stages may use it and what ``forward`` receives) and its options
(the keyword arguments of ``__init__``, typed: they become a pydantic schema checked with the rest
of the config, before any worker starts). ``build_loss`` is how every stage resolves one.

A loss returns ``(loss, metrics)``; metric values may be tensors (0-d, on the batch's device). The
trainer moves all of a step's metrics to the host at once at the end of the step, so a loss that
leaves them on the device costs no host-device synchronisation per micro-batch.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel

# Defined by the data layer, which writes it into labels; re-exported because losses and plugins read it here.
from rayalign.data.labels import IGNORE_INDEX  # noqa: F401
from rayalign.options import signature_schema, validate_options


# What a family's losses get in ``forward`` (the stage that uses them calls it so):
#   sft         (logits, labels) -> mean token loss; see ``needs_logits`` for the labelled path
#   preference  (policy_chosen, policy_rejected, ref_chosen, ref_rejected): per-pair log-prob sums,
#               or per-token means with ``uses_mean_logps``; the ref_* are zeros without ``needs_reference``;
#               plus the keyword ``chosen_nll`` for a loss that sets ``chosen_nll_tokens`` (ORPO)
#   unpaired    (policy_logps, ref_logps, desirable, policy_kl_logps, ref_kl_logps): per-example log-prob
#               sums of a completion, whether it is desirable (bool), and the sums of the mismatched
#               (prompt, another example's completion) sequences that estimate the KL (KTO)
#   reward      (chosen_scores, rejected_scores): one score per answer of a pair
#   policy      (logps, old_logps, advantages, mask, ref_logps, sequence_ids): per-token, [1, T-1]
#   value       (values, old_values, returns, mask): per-token, [1, T-1]
#   token_penalty (logits, labels, mask): an extra term on marked tokens (DPO's unlikelihood)
LossFamily = Literal["sft", "preference", "unpaired", "reward", "policy", "value", "token_penalty"]


class Loss(torch.nn.Module):
    """Base class of registered losses. ``name`` is the key configs use; ``family`` says which
    stages take it. The typed keyword arguments of ``__init__`` are its options (``Options``, a
    pydantic model derived from them unless the class declares its own)."""

    name: ClassVar[str]
    family: ClassVar[LossFamily]
    # Preference losses: False for a reference-free loss (SimPO, ORPO): the stage then starts no
    # reference workers and passes zeros as the reference log-probs.
    needs_reference: ClassVar[bool] = True
    # Preference losses: True to get per-token mean log-probs instead of sums (IPO, SimPO).
    uses_mean_logps: ClassVar[bool] = False
    # Preference losses: the tokens over which ``forward`` also gets the chosen answers' mean NLL, as
    # the keyword ``chosen_nll`` (one token-level mean over the micro-batch's chosen sequences): None,
    # not passed; "answer", the answers' tokens; "sequence", prompt and answer (every token of a chosen
    # sequence but its first), ORPO's SFT term as TRL computes it. May be set per instance from an option.
    chosen_nll_tokens: Literal["answer", "sequence"] | None = None
    Options: ClassVar[type[BaseModel]]
    # False for a token loss that also implements ``from_token_logps(logps, mask)``: it can then run
    # on the labelled tokens' log-probs alone (a stage's ``logits: labelled``), never seeing logits.
    needs_logits: ClassVar[bool] = True
    # True for the mean NLL of the labelled tokens, which also implements ``from_nll_sum(total,
    # count)``: a stage can then compute it from hidden states by a fused linear cross-entropy
    # (training/linear_cross_entropy.py, or Liger's), never holding logits or log-probs.
    token_mean_nll: ClassVar[bool] = False

    def __init__(self, **options: Any):
        super().__init__()
        self.options = options

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "Options" not in cls.__dict__:
            cls.Options = options_schema(cls)


def options_schema(cls: type) -> type[BaseModel]:
    """A pydantic model of ``cls.__init__``'s keyword arguments: their annotations and defaults."""
    return signature_schema(cls.__init__, f"{cls.__name__}Options")


def build_loss(registry, name: str, family: LossFamily, options: dict[str, Any], where: str,
               options_key: str, stage_options: dict[str, Any] | None = None) -> Loss:
    """The registered loss ``name``, checked to be of ``family`` and built with ``options``.

    ``stage_options`` are stage settings a loss may take (DPO's ``beta``, PPO's clips): each goes
    to a loss whose options declare it and is ignored by one that does not. ``options`` (the
    stage's ``loss_options``) must all be the loss's own. Errors name ``where`` (the stage's loss
    key) or ``options_key`` and the option.
    """
    from rayalign.errors import ConfigError

    cls = registry.get(name, where=where)
    got = getattr(cls, "family", None)
    if got != family:
        takes = ", ".join(n for n, c in registry.items() if getattr(c, "family", None) == family)
        what = f"{_a(got)} {got} loss" if got else "a loss that declares no family"
        raise ConfigError(where, f"{name!r} is {what}; this stage takes {_a(family)} {family} loss: {takes}")
    schema = cls.Options
    given = {k: v for k, v in (stage_options or {}).items() if k in schema.model_fields}
    given.update(options)
    validated = validate_options(schema, given, options_key, "loss", name)
    return cls(**{k: getattr(validated, k) for k in schema.model_fields})


def _a(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


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
