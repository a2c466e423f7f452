"""KTO on unpaired examples ``{prompt, completion, label}``: the dpo stage with another row layout.

Each example is packed beside its mismatched sequence: its own prompt followed by the completion
of the example before it in the micro-batch (cyclically, as TRL's ``KTOTrainer`` rotates a batch's
completions). Those sequences estimate the KL reference point of the micro-batch, so a micro-batch
should hold several examples; a micro-batch of one borrows the completion of the example packed
before it. Reference log-probs of both kinds of sequence come from the reference workers, once,
as for DPO. The mismatched sequences are not truncated and count towards
``max_tokens_per_micro_batch`` as long as their example.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from pydantic import Field

from rayalign.data.chat import Tokenized, tokenize_completion
from rayalign.data.packing import collate_packed, group_by_tokens
from rayalign.data.validation import within_max_length
from rayalign.errors import DataError
from rayalign.training.losses import IGNORE_INDEX
from rayalign_dpo.stage import DPOStage, PairedSequences, PreferenceConfig


class KTOConfig(PreferenceConfig):
    dataset: str = Field("unpaired", description="key under `data:` naming the {prompt, completion, label} examples "
                         "(null: the synthetic pairs, unpaired), or a dataset an earlier stage produces")
    loss: str = Field("kto", description="registered unpaired loss: kto (docs/dpo.md)")
    max_length: int = Field(1024, ge=8, description="tokens of prompt + completion after the chat template; a longer "
                            "example is a bad record (`data.bad_records`), never truncated")


def prompt_length(seq: Tokenized) -> int:
    """Tokens before the first labelled one: the prompt, chat template included."""
    return next(t for t, label in enumerate(seq.labels) if label != IGNORE_INDEX)


def mismatched(example: Tokenized, other: Tokenized) -> Tokenized:
    """``example``'s prompt followed by ``other``'s completion, labelled as in ``other``."""
    p, q = prompt_length(example), prompt_length(other)
    labels = np.concatenate([np.full(p, IGNORE_INDEX, dtype=other.labels.dtype), other.labels[q:]])
    return Tokenized(np.concatenate([example.input_ids[:p], other.input_ids[q:]]), labels)


@dataclass
class KTOObjective(PairedSequences):
    """Rows of (example, mismatched sequence) pairs; the mismatched ones only estimate the KL."""

    def __call__(self, model, batch):
        (sums, counts), _, _ = self._forward(model, batch)
        policy, policy_kl = self._pairs(sums, counts)
        loss, metrics = self.loss(policy, batch["ref_logps"], batch["desirable"], policy_kl.detach(),
                                  batch["ref_kl_logps"])
        metrics["count"] = float(policy.numel())
        return loss, metrics


class KTOStage(DPOStage):
    """KTO on unpaired examples (a completion marked desirable or not) against a frozen reference."""

    name = "kto"
    Config = KTOConfig
    loss_family = "unpaired"
    data_kind = "unpaired"
    unit = "examples"
    reference_keys = ("ref_logps", "ref_kl_logps")

    def _prepare_terms(self, plugins, key: str) -> None:
        pass  # DPO's extra terms (unlikelihood, chosen NLL) have no meaning here

    def _tokenize_records(self, tok, records):
        """The examples within ``max_length`` and their tokens (an over-long one is a bad record)."""
        return within_max_length(records, lambda r: tokenize_completion(tok, r["prompt"], r["completion"], None, r.where),
                                 self.config.max_length)

    def _annotate(self, records, path: str | None) -> None:
        pass  # no marks to read beside the records

    def _load(self, path: str | None, run, model: str | None = None) -> None:
        super()._load(path, run, model)
        if len(self.train) < 2:
            raise DataError(self.source, f"kto needs at least 2 training examples, got {len(self.train)}: its KL "
                            "reference point pairs each prompt with another example's completion")

    def _batches(self, records: list) -> list[dict]:
        """Examples packed into rows, each followed by its mismatched sequence (tokenized by ``_load``)."""
        seqs = [r.tokens for r in records]
        groups = group_by_tokens([2 * len(s) for s in seqs], self.config.max_tokens_per_micro_batch, 0)
        order = [i for g in groups for i in g]
        previous = {i: order[k - 1] for k, i in enumerate(order)}
        batches = []
        for g in groups:
            # The completion of the example before it in the row, cyclically; in a row of one, in the order.
            donors = [g[j - 1] for j in range(len(g))] if len(g) > 1 else [previous[g[0]]]
            sequences = [s for i, d in zip(g, donors) for s in (seqs[i], mismatched(seqs[i], seqs[d]))]
            batch = collate_packed(sequences)
            batch["num_sequences"] = len(sequences)
            batch["desirable"] = torch.tensor([bool(records[i]["label"]) for i in g])
            batches.append(batch)
        return batches

    def objective(self) -> PairedSequences:
        return KTOObjective(self.loss, logits=self.config.logits)

    def report(self, ctx, before: dict, after: dict) -> dict:
        ctx.log.info("[%s] held-out label accuracy %.3f -> %.3f, KL %.4f -> %.4f, loss %.4f -> %.4f", ctx.name,
                     before.get("label_accuracy", float("nan")), after.get("label_accuracy", float("nan")),
                     before.get("kl", float("nan")), after.get("kl", float("nan")),
                     before.get("loss", float("nan")), after.get("loss", float("nan")))
        return {
            "label_accuracy_before": before.get("label_accuracy"),
            "label_accuracy": after.get("label_accuracy"),
            "kl_before": before.get("kl"),
            "kl": after.get("kl"),
            "eval_loss_before": before.get("loss"),
            "eval_loss": after.get("loss"),
        }
