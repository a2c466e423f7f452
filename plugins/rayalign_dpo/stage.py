"""DPO on preference pairs, with reference log-probs computed once by the reference workers.

Each pair becomes two packed sequences (chosen then rejected) in the same row, so one forward
pass scores both. The reference workers score every micro-batch once before training, each a share
of them (rayalign_dpo/reference.py), and are shut down before the trainers start; the log-probs
travel inside the micro-batches and are saved with the stage's outputs.

``dataset`` is a key under ``data:`` or the name of a dataset an earlier stage produces (``pairs``
from ``negatives``): that one exists only once the earlier stage ran, so it is loaded in ``run``.
``sft_weight > 0`` adds the chosen answers' token NLL (RPO) so DPO cannot lower them with the
rejected ones, which it does when pairs share a long prefix (a reference and the same reference
looped). With ``unlikelihood > 0`` the tokens of rejected answers marked ``"unlikelihood": true`` that repeat
an earlier n-gram of the answer also get an unlikelihood penalty (the registered loss
``unlikelihood``, Welleck et al. 2019), added to the preference loss with that weight.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
from pydantic import Field

from rayalign.data.chat_tokens import tokenize_pairs
from rayalign.data.datasets import load_records, split
from rayalign.data.packing import collate_packed, group_by_tokens
from rayalign.data.sources import data_keys, dataset_path
from rayalign.data.readers import jsonl_rows
from rayalign.data.validation import RecordProblem
from rayalign.errors import ConfigError, DataError
from rayalign.stage import Stage, StageResult
from rayalign.training.labelled_logps import LogitsMode, labelled_sequence_logps, wants_labelled
from rayalign.training.loop import TrainerSession, TrainingConfig, check_kernels
from rayalign.training.losses import IGNORE_INDEX, Loss, build_loss, sequence_logps
from rayalign_dpo.reference import reference_logps


class DPOConfig(TrainingConfig):
    dataset: str = Field("preference", description="key under `data:` naming the pairs JSONL (null: synthetic), "
                         "or a dataset an earlier stage produces (e.g. `pairs` from `negatives`)")
    loss: str = Field("sigmoid", description="registered preference loss: sigmoid (DPO) or ipo")
    beta: float = Field(0.1, gt=0, description="strength of the KL constraint to the reference")
    lr: float = Field(5e-7, gt=0, description="peak learning rate (cosine decay after warmup)")
    max_length: int = Field(1024, ge=8, description="tokens of prompt + chosen (and of prompt + rejected) after the "
                            "chat template; a longer pair is a bad record (`data.bad_records`), never truncated")
    unlikelihood: float = Field(0.0, ge=0, description="weight of unlikelihood on repeated tokens of rejected "
                                "answers marked `unlikelihood: true` (0: off)")
    unlikelihood_ngram: int = Field(4, ge=1, description="a token is repeated when the token n-gram it ends "
                                    "occurred earlier in the answer")
    sft_weight: float = Field(0.0, ge=0, description="weight of the chosen answers' mean token NLL added to the "
                              "loss (RPO; TRL's rpo_alpha): keeps DPO from lowering the chosen answers too (0: off)")
    eval_fraction: float | None = Field(None, ge=0, lt=1, description="share of the pairs' prompts held out "
                                        "for the held-out preference metrics (null: `data.eval_fraction`); 0 trains "
                                        "on every pair, for when a later stage measures on prompts of its own")
    logits: LogitsMode = "auto"


def num_sequences(batch: dict) -> int:
    """Sequences in a packed row: counted on the host when packed (``_batches``), so a forward pass
    on the GPU never waits to read it back; else from ``sequence_ids``."""
    n = batch.get("num_sequences")
    return int(n) if n is not None else int(batch["sequence_ids"].max()) + 1


@dataclass
class DPOObjective:
    loss: Loss
    unlikelihood: Loss | None = None  # optional token-level term, weighted by ``unlikelihood_weight``
    unlikelihood_weight: float = 0.0
    sft_weight: float = 0.0  # optional NLL of the chosen answers (Pang et al. 2024, "RPO")
    labelled: bool = False  # ``logits="labelled"``
    # training/labelled_logps.py: full, labelled (score without the full logits; not with
    # unlikelihood, which reads them), or auto (labelled for rows on a GPU where allowed).
    logits: str = "full"

    def _forward(self, model, batch) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor | None]:
        """Completion log-prob sums and token counts per packed sequence, and the logits when kept."""
        num_seqs = num_sequences(batch)
        mode = "labelled" if self.labelled else self.logits
        if wants_labelled(mode, batch, loss_allows=self.unlikelihood is None):
            return labelled_sequence_logps(model, batch, num_seqs), None
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        return sequence_logps(logits, batch["labels"], batch["sequence_ids"], num_seqs), logits

    def _pairs(self, sums, counts) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-pair log-probs of chosen and rejected completions (summed, or mean for IPO)."""
        logps = sums / counts.clamp(min=1) if self.loss.uses_mean_logps else sums
        return logps[0::2], logps[1::2]

    def logps(self, model, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """What the reference worker computes once per micro-batch: ``_pairs`` of one forward pass."""
        return self._pairs(*self._forward(model, batch)[0])

    def weight(self, batch) -> float:
        return num_sequences(batch) / 2  # pairs in the row

    def __call__(self, model, batch):
        (sums, counts), logits = self._forward(model, batch)
        chosen, rejected = self._pairs(sums, counts)
        loss, metrics = self.loss(chosen, rejected, batch["ref_chosen"], batch["ref_rejected"])
        # Does the policy itself put the chosen answer above the rejected one? Unlike the reward
        # accuracy (relative to the reference, so 0 before training), this is a real "before".
        metrics["preference_accuracy"] = (sums[0::2] > sums[1::2]).float().mean()
        if self.sft_weight:
            nll = -sums[0::2].sum() / counts[0::2].sum().clamp(min=1)
            loss = loss + self.sft_weight * nll
            metrics["chosen_nll"] = nll.detach()
        if self.unlikelihood is not None:
            ul, ul_metrics = self.unlikelihood(logits, batch["labels"], batch["ul_mask"])
            loss = loss + self.unlikelihood_weight * ul
            metrics.update(ul_metrics)
        metrics["count"] = float(chosen.numel())
        return loss, metrics


def repeated_tokens(tokenized, n: int) -> list[int]:
    """1 on each completion token that ends a token n-gram seen earlier in the completion, else 0."""
    positions = [t for t, label in enumerate(tokenized.labels) if label != IGNORE_INDEX]
    ids = [tokenized.labels[t] for t in positions]
    mask, seen = [0] * len(tokenized), set()
    for j in range(n - 1, len(ids)):
        gram = tuple(ids[j - n + 1 : j + 1])
        if gram in seen:
            mask[positions[j]] = 1
        seen.add(gram)
    return mask


def unlikelihood_flags(path: str | None) -> set[int]:
    """Line numbers of the pairs JSONL records marked ``"unlikelihood": true`` (bad lines are not)."""
    if path is None or path.startswith("synthetic:"):
        return set()
    # Lines as the loader counts them; a bad record is not flagged (the loader named and counted it).
    return {lineno for _, lineno, record in jsonl_rows(path)
            if not isinstance(record, RecordProblem) and record.get("unlikelihood", False)}


class DPOStage(Stage):
    """Preference optimisation against a frozen reference (the incoming model)."""

    name = "dpo"
    Config = DPOConfig

    def prepare(self, run, plugins, artifacts, index):
        cfg = self.config
        self.loss = build_loss(plugins.losses, cfg.loss, "preference", cfg.loss_options, f"stages[{index}].dpo.loss",
                               f"stages[{index}].dpo.loss_options", stage_options={"beta": cfg.beta})
        self.unlikelihood = None
        if cfg.unlikelihood > 0:
            self.unlikelihood = build_loss(plugins.losses, "unlikelihood", "token_penalty", {},
                                           f"stages[{index}].dpo.unlikelihood", f"stages[{index}].dpo.unlikelihood")
            if cfg.logits == "labelled":
                raise ConfigError(f"stages[{index}].dpo.logits", "'labelled' cannot serve unlikelihood > 0, which "
                                  "reads the logits (use logits: full)")
        check_kernels(cfg.kernels, run, f"stages[{index}].dpo.kernels")
        self.formats, self.train, self.eval = plugins.formats, None, None
        if cfg.dataset in data_keys(run):
            path = dataset_path(run, cfg.dataset, where=f"stages[{index}].dpo.dataset")
            self._load(path, run, artifacts.model)
        else:  # an earlier stage's dataset, which does not exist yet: run() loads it, its name is checked now
            artifacts.expect_dataset(cfg.dataset, f"stages[{index}].dpo.dataset", tried="no key under data:")

    def _load(self, path: str | None, run, model: str | None = None) -> None:
        """Load and tokenize the pairs; an over-long pair is a bad record (skipped and counted, or fatal)."""
        from transformers import AutoTokenizer

        from rayalign.models import resolve_model

        records, self.source = load_records(path, "preference", self.formats, run.seed)
        tok = AutoTokenizer.from_pretrained(model or resolve_model(run))
        records, tokenized = tokenize_pairs(records, tok, self.config.max_length)  # cached, as SFT's chats are
        flagged = unlikelihood_flags(path)
        for record, (chosen, rejected) in zip(records, tokenized):
            record["unlikelihood"] = record.line in flagged
            record.tokens = (chosen, rejected)
        # By prompt: a held-out prompt trained on in another pair would measure memory, not learning.
        fraction = run.data.eval_fraction if self.config.eval_fraction is None else self.config.eval_fraction
        self.train, self.eval = split(records, fraction, run.seed, key=lambda r: json.dumps(r["prompt"]))

    def _batches(self, records: list) -> list[dict]:
        """Pairs packed into rows, chosen then rejected (tokenized by ``_load``)."""
        cfg = self.config
        pairs = [(*r.tokens, r["unlikelihood"]) for r in records]
        groups = group_by_tokens([len(c) + len(r) for c, r, _ in pairs], cfg.max_tokens_per_micro_batch, 0)
        batches = []
        for g in groups:
            batch = collate_packed([s for i in g for s in pairs[i][:2]])
            batch["num_sequences"] = 2 * len(g)
            if self.unlikelihood is not None:  # aligned with the packed row: chosen, rejected, chosen, ...
                mask = []
                for i in g:
                    chosen, rejected, flagged = pairs[i]
                    mask += [0] * len(chosen)
                    mask += repeated_tokens(rejected, cfg.unlikelihood_ngram) if flagged else [0] * len(rejected)
                batch["ul_mask"] = torch.tensor([mask], dtype=torch.long)
            batches.append(batch)
        return batches

    def run(self, ctx):
        if self.train is None:
            name = self.config.dataset
            if name not in ctx.artifacts.datasets:
                produced = ", ".join(sorted(ctx.artifacts.datasets)) or "none"
                raise ConfigError(f"stages[{ctx.index}].dpo.dataset", f"{name!r} is no key under data: and no "
                                  f"earlier stage produced a dataset of that name (produced: {produced})")
            self._load(ctx.artifacts.datasets[name], ctx.run, ctx.artifacts.model)
        train, held = self._batches(self.train), self._batches(self.eval)
        if not train:
            raise DataError(self.source, "no training pairs left after the held-out split")
        objective = DPOObjective(self.loss, self.unlikelihood, self.config.unlikelihood, self.config.sft_weight,
                                 logits=self.config.logits)
        # Sharded over the reference workers; their GPUs are released before the trainers start.
        # A reference-free loss (SimPO, ORPO) starts none: its reference log-probs are zeros.
        if self.loss.needs_reference:
            ref_logps = reference_logps(ctx, objective.logps, train + held)
        else:
            ref_logps = [(torch.zeros(b["num_sequences"] // 2),) * 2 for b in train + held]
        for batch, (c, r) in zip(train + held, ref_logps):
            batch["ref_chosen"], batch["ref_rejected"] = c, r
        torch.save(ref_logps, ctx.work_dir / "reference_logps.pt")
        with ctx.cluster.reserve(ctx.name, ["trainer"]) as placement:
            session = TrainerSession(ctx, placement["trainer"], self.config, objective, train, held)
            before, history, after = session.train_and_save(str(ctx.work_dir / "model"))
        ctx.log.info(
            "[%s] held-out preference accuracy %.3f -> %.3f, reward accuracy %.3f -> %.3f, margin %.4f -> %.4f",
            ctx.name, before.get("preference_accuracy", float("nan")), after.get("preference_accuracy", float("nan")),
            before.get("reward_accuracy", float("nan")), after.get("reward_accuracy", float("nan")),
            before.get("reward_margin", float("nan")), after.get("reward_margin", float("nan")),
        )
        return StageResult(
            model="model",
            metrics={
                "preference_accuracy_before": before.get("preference_accuracy"),
                "preference_accuracy": after.get("preference_accuracy"),
                "reward_accuracy_before": before.get("reward_accuracy"),
                "reward_accuracy": after.get("reward_accuracy"),
                "reward_margin_before": before.get("reward_margin"),
                "reward_margin": after.get("reward_margin"),
                "eval_loss": after.get("loss"),
                "steps": len(history),
                "train_pairs": len(self.train),
                "eval_pairs": len(self.eval),
                "history": history,
                **session.reliability,
            },
        )
