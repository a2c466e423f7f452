"""DPO on preference pairs, with reference log-probs computed once by the reference workers.

Each pair becomes two packed sequences (chosen then rejected) in the same row, so one forward
pass scores both. The reference workers score every micro-batch once before training, each a share
of them (rayalign_dpo/reference.py), and are shut down before the trainers start; the log-probs
travel inside the micro-batches and are saved with the stage's outputs. A reference-free loss
(``needs_reference = False``: SimPO, ORPO) starts no reference worker. A loss that takes the chosen
sequences' NLL over their prompts too (ORPO) gets rows that label those tokens as well, summed
apart in the same forward pass (``with_chosen_prompts``). The kto stage (kto_stage.py) is this
stage on unpaired examples.

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

from rayalign.data.chat import Tokenized
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


class PreferenceConfig(TrainingConfig):
    """What the dpo and kto stages share."""

    dataset: str = Field("preference", description="key under `data:` naming the dataset (null: synthetic), or a "
                         "dataset an earlier stage produces")
    loss: str = Field("sigmoid", description="registered loss of the stage's family")
    beta: float = Field(0.1, gt=0, description="strength of the KL constraint to the reference (SimPO: the reward "
                        "scale; ORPO: the odds-ratio term's weight)")
    lr: float = Field(5e-7, gt=0, description="peak learning rate (cosine decay after warmup)")
    eval_fraction: float | None = Field(None, ge=0, lt=1, description="share of the prompts held out "
                                        "for the held-out metrics (null: `data.eval_fraction`); 0 trains "
                                        "on every example, for when a later stage measures on prompts of its own")
    logits: LogitsMode = "auto"


class DPOConfig(PreferenceConfig):
    dataset: str = Field("preference", description="key under `data:` naming the pairs JSONL (null: synthetic), "
                         "or a dataset an earlier stage produces (e.g. `pairs` from `negatives`)")
    loss: str = Field("sigmoid", description="registered preference loss: sigmoid (DPO), ipo, simpo, orpo "
                      "(docs/dpo.md)")
    max_length: int = Field(1024, ge=8, description="tokens of prompt + chosen (and of prompt + rejected) after the "
                            "chat template; a longer pair is a bad record (`data.bad_records`), never truncated")
    unlikelihood: float = Field(0.0, ge=0, description="weight of unlikelihood on repeated tokens of rejected "
                                "answers marked `unlikelihood: true` (0: off)")
    unlikelihood_ngram: int = Field(4, ge=1, description="a token is repeated when the token n-gram it ends "
                                    "occurred earlier in the answer")
    sft_weight: float = Field(0.0, ge=0, description="weight of the chosen answers' mean token NLL added to the "
                              "loss (RPO; TRL's rpo_alpha): keeps DPO from lowering the chosen answers too (0: off)")


def num_sequences(batch: dict) -> int:
    """Sequences in a packed row: counted on the host when packed (``_batches``), so a forward pass
    on the GPU never waits to read it back; else from ``sequence_ids``."""
    n = batch.get("num_sequences")
    return int(n) if n is not None else int(batch["sequence_ids"].max()) + 1


@dataclass
class PairedSequences:
    """Log-probs of packed rows that hold two sequences per example: a pair's chosen and rejected
    answers (DPO), or an example and its mismatched KL sequence (KTO)."""

    loss: Loss
    labelled: bool = False  # ``logits="labelled"``
    # training/labelled_logps.py: full, labelled (score without the full logits; not for a term that
    # reads them, as unlikelihood does), or auto (labelled for rows on a GPU where allowed).
    logits: str = "full"

    def reads_logits(self) -> bool:
        return False

    def _forward(self, model, batch) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple | None, torch.Tensor | None]:
        """Answer log-prob sums and token counts per packed sequence, the same for the chosen prompts
        when the batch scores them (``nll_labels``, see ``with_chosen_prompts``; else None), and
        the logits when kept."""
        num_seqs = num_sequences(batch)
        buckets = num_seqs
        if "nll_labels" in batch:
            batch = {**batch, "labels": batch["nll_labels"], "sequence_ids": batch["nll_sequence_ids"]}
            buckets = 2 * num_seqs
        mode = "labelled" if self.labelled else self.logits
        logits = None
        if wants_labelled(mode, batch, loss_allows=not self.reads_logits()):
            sums, counts = labelled_sequence_logps(model, batch, buckets)
        else:
            logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
            sums, counts = sequence_logps(logits, batch["labels"], batch["sequence_ids"], buckets)
        prompts = (sums[num_seqs:], counts[num_seqs:]) if buckets > num_seqs else None
        return (sums[:num_seqs], counts[:num_seqs]), prompts, logits

    def _pairs(self, sums, counts) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-example log-probs of its two sequences (summed, or mean for IPO, SimPO, ORPO)."""
        logps = sums / counts.clamp(min=1) if self.loss.uses_mean_logps else sums
        return logps[0::2], logps[1::2]

    def logps(self, model, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """What the reference worker computes once per micro-batch: ``_pairs`` of one forward pass."""
        return self._pairs(*self._forward(model, batch)[0])

    def weight(self, batch) -> float:
        return num_sequences(batch) / 2  # examples (pairs) in the row


def chosen_nll(sums: torch.Tensor, counts: torch.Tensor, prompts: tuple | None = None) -> torch.Tensor:
    """Mean token NLL of a row's chosen sequences (every other one from the first): of their
    answers' tokens, and of their prompts' too given ``prompts`` (sums and counts, as ``_forward``)."""
    total, n = sums[0::2].sum(), counts[0::2].sum()
    if prompts is not None:
        total, n = total + prompts[0][0::2].sum(), n + prompts[1][0::2].sum()
    return -total / n.clamp(min=1)


@dataclass
class DPOObjective(PairedSequences):
    unlikelihood: Loss | None = None  # optional token-level term, weighted by ``unlikelihood_weight``
    unlikelihood_weight: float = 0.0
    sft_weight: float = 0.0  # optional NLL of the chosen answers (Pang et al. 2024, "RPO")

    def reads_logits(self) -> bool:
        return self.unlikelihood is not None

    def __call__(self, model, batch):
        (sums, counts), prompts, logits = self._forward(model, batch)
        chosen, rejected = self._pairs(sums, counts)
        extra = {}
        tokens = self.loss.chosen_nll_tokens
        if tokens is not None:  # ORPO's SFT term
            if tokens == "sequence" and prompts is None:
                raise RuntimeError(f"loss {self.loss.name!r} takes the chosen prompts' NLL, but the rows were "
                                   "packed without their labels (with_chosen_prompts)")
            extra["chosen_nll"] = chosen_nll(sums, counts, prompts if tokens == "sequence" else None)
        loss, metrics = self.loss(chosen, rejected, batch["ref_chosen"], batch["ref_rejected"], **extra)
        # Does the policy itself put the chosen answer above the rejected one? Unlike the reward
        # accuracy (relative to the reference, so 0 before training), this is a real "before".
        metrics["preference_accuracy"] = (sums[0::2] > sums[1::2]).float().mean()
        if self.sft_weight:
            nll = chosen_nll(sums, counts)
            loss = loss + self.sft_weight * nll
            metrics["chosen_nll"] = nll.detach()
        if self.unlikelihood is not None:
            ul, ul_metrics = self.unlikelihood(logits, batch["labels"], batch["ul_mask"])
            loss = loss + self.unlikelihood_weight * ul
            metrics.update(ul_metrics)
        metrics["count"] = float(chosen.numel())
        return loss, metrics


def with_chosen_prompts(sequences: list[Tokenized]) -> dict[str, torch.Tensor]:
    """For a packed row of pairs (chosen, rejected, chosen, ...): ``nll_labels``, its labels with
    every token of each chosen sequence but the first labelled, and ``nll_sequence_ids``, which
    counts a chosen prompt's token in bucket ``len(sequences) + k`` (k: its sequence), so one
    forward pass sums the answers and the chosen prompts apart (``PairedSequences._forward``)."""
    n, labels, ids = len(sequences), [], []
    for k, seq in enumerate(sequences):
        chosen = k % 2 == 0
        labels += [IGNORE_INDEX] + (seq.input_ids[1:] if chosen else seq.labels[1:]).tolist()
        ids += [n + k if chosen and label == IGNORE_INDEX else k for label in seq.labels]
    return {"nll_labels": torch.tensor([labels]), "nll_sequence_ids": torch.tensor([ids])}


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
    """Preference optimisation on pairs, against a frozen reference (the incoming model) or, for a
    reference-free loss (SimPO, ORPO), without one."""

    name = "dpo"
    Config = DPOConfig
    loss_family = "preference"
    data_kind = "preference"
    unit = "pairs"
    reference_keys = ("ref_chosen", "ref_rejected")  # where a row's reference log-probs go
    score_chosen_prompts = False  # rows also label the chosen prompts (a loss with chosen_nll_tokens "sequence")
    unlikelihood: Loss | None = None

    def prepare(self, run, plugins, artifacts, index):
        cfg, key = self.config, f"stages[{index}].{self.name}"
        self.loss = build_loss(plugins.losses, cfg.loss, self.loss_family, cfg.loss_options, f"{key}.loss",
                               f"{key}.loss_options", stage_options={"beta": cfg.beta})
        self._prepare_terms(plugins, key)
        check_kernels(cfg.kernels, run, f"{key}.kernels")
        self.formats, self.train, self.eval = plugins.formats, None, None
        if cfg.dataset in data_keys(run):
            path = dataset_path(run, cfg.dataset, where=f"{key}.dataset")
            self._load(path, run, artifacts.model)
        else:  # an earlier stage's dataset, which does not exist yet: run() loads it, its name is checked now
            artifacts.expect_dataset(cfg.dataset, f"{key}.dataset", tried="no key under data:")

    def _prepare_terms(self, plugins, key: str) -> None:
        """What DPO adds to its loss: unlikelihood on marked rejected answers, the chosen prompts' labels."""
        cfg = self.config
        self.score_chosen_prompts = self.loss.chosen_nll_tokens == "sequence"
        self.unlikelihood = None
        if cfg.unlikelihood > 0:
            self.unlikelihood = build_loss(plugins.losses, "unlikelihood", "token_penalty", {},
                                           f"{key}.unlikelihood", f"{key}.unlikelihood")
            if cfg.logits == "labelled":
                raise ConfigError(f"{key}.logits", "'labelled' cannot serve unlikelihood > 0, which "
                                  "reads the logits (use logits: full)")

    def _load(self, path: str | None, run, model: str | None = None) -> None:
        """Load and tokenize the examples; an over-long one is a bad record (skipped and counted, or fatal)."""
        from transformers import AutoTokenizer

        from rayalign.models import resolve_model

        records, self.source = load_records(path, self.data_kind, self.formats, run.seed)
        tok = AutoTokenizer.from_pretrained(model or resolve_model(run))
        records, tokenized = self._tokenize_records(tok, records)
        for record, tokens in zip(records, tokenized):
            record.tokens = tokens
        self._annotate(records, path)
        # By prompt: a held-out prompt trained on in another pair would measure memory, not learning.
        fraction = run.data.eval_fraction if self.config.eval_fraction is None else self.config.eval_fraction
        self.train, self.eval = split(records, fraction, run.seed, key=lambda r: json.dumps(r["prompt"]))

    def _tokenize_records(self, tok, records):
        """The records within ``max_length`` and their (chosen, rejected) tokens, from the token cache
        when this data was tokenized before (as SFT's chats are); an over-long pair is a bad record."""
        return tokenize_pairs(records, tok, self.config.max_length)

    def _annotate(self, records, path: str | None) -> None:
        flagged = unlikelihood_flags(path)
        for record in records:
            record["unlikelihood"] = record.line in flagged

    def _batches(self, records: list) -> list[dict]:
        """Pairs packed into rows, chosen then rejected (tokenized by ``_load``)."""
        cfg = self.config
        pairs = [(*r.tokens, r["unlikelihood"]) for r in records]
        groups = group_by_tokens([len(c) + len(r) for c, r, _ in pairs], cfg.max_tokens_per_micro_batch, 0)
        batches = []
        for g in groups:
            sequences = [s for i in g for s in pairs[i][:2]]
            batch = collate_packed(sequences)
            batch["num_sequences"] = len(sequences)
            if self.score_chosen_prompts:
                batch.update(with_chosen_prompts(sequences))
            if self.unlikelihood is not None:  # aligned with the packed row: chosen, rejected, chosen, ...
                mask = []
                for i in g:
                    chosen, rejected, flagged = pairs[i]
                    mask += [0] * len(chosen)
                    mask += repeated_tokens(rejected, cfg.unlikelihood_ngram) if flagged else [0] * len(rejected)
                batch["ul_mask"] = torch.tensor([mask], dtype=torch.long)
            batches.append(batch)
        return batches

    def objective(self) -> PairedSequences:
        return DPOObjective(self.loss, logits=self.config.logits, unlikelihood=self.unlikelihood,
                            unlikelihood_weight=self.config.unlikelihood, sft_weight=self.config.sft_weight)

    def attach_reference(self, ctx, objective: PairedSequences, batches: list[dict]) -> None:
        """Each row's reference log-probs, two per example, under ``reference_keys``: computed once,
        sharded over the reference workers, whose GPUs are released before the trainers start. A
        reference-free loss (SimPO, ORPO) starts none: its reference log-probs are zeros."""
        if self.loss.needs_reference:
            ref_logps = reference_logps(ctx, objective.logps, batches)
        else:
            ref_logps = [(torch.zeros(b["num_sequences"] // 2),) * 2 for b in batches]
        for batch, values in zip(batches, ref_logps):
            batch.update(zip(self.reference_keys, values))
        torch.save(ref_logps, ctx.work_dir / "reference_logps.pt")

    def run(self, ctx):
        if self.train is None:
            name = self.config.dataset
            if name not in ctx.artifacts.datasets:
                produced = ", ".join(sorted(ctx.artifacts.datasets)) or "none"
                raise ConfigError(f"stages[{ctx.index}].{self.name}.dataset", f"{name!r} is no key under data: and "
                                  f"no earlier stage produced a dataset of that name (produced: {produced})")
            self._load(ctx.artifacts.datasets[name], ctx.run, ctx.artifacts.model)
        train, held = self._batches(self.train), self._batches(self.eval)
        if not train:
            raise DataError(self.source, f"no training {self.unit} left after the held-out split")
        objective = self.objective()
        self.attach_reference(ctx, objective, train + held)
        with ctx.cluster.reserve(ctx.name, ["trainer"]) as placement:
            session = TrainerSession(ctx, placement["trainer"], self.config, objective, train, held)
            before, history, after = session.train_and_save(str(ctx.work_dir / "model"))
        return StageResult(model="model", metrics={**self.report(ctx, before, after), "steps": len(history),
                                                   f"train_{self.unit}": len(self.train),
                                                   f"eval_{self.unit}": len(self.eval),
                                                   "history": history, **session.reliability})

    def report(self, ctx, before: dict, after: dict) -> dict:
        """The held-out metrics before and after training: logged, and returned for metrics.json."""
        ctx.log.info(
            "[%s] held-out preference accuracy %.3f -> %.3f, reward accuracy %.3f -> %.3f, margin %.4f -> %.4f",
            ctx.name, before.get("preference_accuracy", float("nan")), after.get("preference_accuracy", float("nan")),
            before.get("reward_accuracy", float("nan")), after.get("reward_accuracy", float("nan")),
            before.get("reward_margin", float("nan")), after.get("reward_margin", float("nan")),
        )
        return {
            "preference_accuracy_before": before.get("preference_accuracy"),
            "preference_accuracy": after.get("preference_accuracy"),
            "reward_accuracy_before": before.get("reward_accuracy"),
            "reward_accuracy": after.get("reward_accuracy"),
            "reward_margin_before": before.get("reward_margin"),
            "reward_margin": after.get("reward_margin"),
            "eval_loss": after.get("loss"),
        }
