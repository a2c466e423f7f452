"""Supervised fine-tuning on chat data: assistant tokens only, packed rows, DeepSpeed trainers."""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import Field

from rayalign.data.chat import tokenize_conversation
from rayalign.data.datasets import dataset_path, load_records, split
from rayalign.data.packing import collate_packed, group_by_tokens
from rayalign.data.validation import within_max_length
from rayalign.errors import ConfigError, DataError
from rayalign.stage import Stage, StageResult
from rayalign.training.loop import TrainerSession, TrainingConfig
from rayalign.training.labelled_logps import LogitsMode, labelled_token_logps
from rayalign.training.losses import IGNORE_INDEX, Loss


class SFTConfig(TrainingConfig):
    dataset: str = Field("sft", description="key under `data:` naming the chat JSONL (null: synthetic), or a dataset "
                         "an earlier stage produces (`curated` from curate, `distilled` from distill)")
    eval_dataset: str | None = Field(None, description="an earlier stage's dataset used for the eval loss instead "
                                     "of a split of `dataset` (e.g. `curated_validation`)")
    loss: str = Field("sft", description="registered loss applied to the logits")
    epochs: int = Field(3, ge=1, description="passes over the training split")
    max_length: int = Field(1024, ge=8, description="tokens per conversation after the chat template; a longer one "
                            "is a bad record (`data.bad_records`), never truncated")
    logits: LogitsMode = "full"


@dataclass
class SFTObjective:
    """One packed row through the model, then the configured token loss (on the full logits, or
    with ``labelled`` on the labelled tokens' log-probs: training/labelled_logps.py)."""

    loss: Loss
    labelled: bool = False

    def __call__(self, model, batch):
        if self.labelled:
            scored = labelled_token_logps(model, batch)
            return self.loss.from_token_logps(scored.logps, scored.mask)
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        return self.loss(logits, batch["labels"])

    def weight(self, batch) -> float:
        return float((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def pack(tokenized: list, max_tokens: int, seed: int) -> list[dict]:
    groups = group_by_tokens([len(t) for t in tokenized], max_tokens, seed)
    return [collate_packed([tokenized[i] for i in g]) for g in groups]


class SFTStage(Stage):
    """Fine-tune on conversations; loss on assistant turns; eval loss on a held-out split."""

    name = "sft"
    Config = SFTConfig

    def prepare(self, run, plugins, artifacts, index):
        cfg = self.config
        self.loss_cls = plugins.losses.get(cfg.loss, where=f"stages[{index}].sft.loss")
        if cfg.logits == "labelled" and self.loss_cls.needs_logits:
            raise ConfigError(f"stages[{index}].sft.logits", f"'labelled' needs a loss that works from token "
                              f"log-probs; loss {cfg.loss!r} needs the logits (use logits: full)")
        self.formats, self.train = plugins.formats, None
        data_keys = [k for k, v in type(run.data).model_fields.items() if v.annotation == (str | None)]
        if cfg.dataset in data_keys and cfg.eval_dataset is None:
            path = dataset_path(run, cfg.dataset, where=f"stages[{index}].sft.dataset")
            self._load(path, None, run, artifacts.model)
        # else: an earlier stage's dataset (curated, distilled), which exists once that stage ran: run() loads it.

    def _load(self, path: str | None, eval_path: str | None, run, model: str) -> None:
        records, self.source = load_records(path, "chat", self.formats, run.seed)
        # Tokenized before any training, so an over-long conversation is a bad record of the
        # preflight (skipped and counted, or the run's one-line error), never a truncated one.
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model)
        tokenize = lambda rs: within_max_length(  # noqa: E731
            rs, lambda r: tokenize_conversation(tok, r["messages"], None, where=r.where), self.config.max_length)[1]
        if eval_path is None:
            self.train, self.eval = split(tokenize(records), run.data.eval_fraction, run.seed)
        else:
            self.train, self.eval = tokenize(records), tokenize(load_records(eval_path, "chat", self.formats, run.seed)[0])

    def _produced(self, ctx, name: str, key: str) -> str | None:
        data_keys = [k for k, v in type(ctx.run.data).model_fields.items() if v.annotation == (str | None)]
        if name in ctx.artifacts.datasets:
            return ctx.artifacts.datasets[name]
        if name in data_keys:
            return getattr(ctx.run.data, name)
        produced = ", ".join(sorted(ctx.artifacts.datasets)) or "none"
        raise ConfigError(f"stages[{ctx.index}].sft.{key}", f"{name!r} is no key under data: and no earlier stage "
                          f"produced a dataset of that name (produced: {produced})")

    def run(self, ctx):
        cfg = self.config
        if self.train is None:
            eval_path = self._produced(ctx, cfg.eval_dataset, "eval_dataset") if cfg.eval_dataset else None
            self._load(self._produced(ctx, cfg.dataset, "dataset"), eval_path, ctx.run, ctx.artifacts.model)
        train, held = self.train, self.eval
        if not train:
            raise DataError(self.source, "no training examples left after the held-out split (data.eval_fraction)")
        train_batches = pack(train, cfg.max_tokens_per_micro_batch, ctx.run.seed)
        eval_batches = pack(held, cfg.max_tokens_per_micro_batch, ctx.run.seed)
        objective = SFTObjective(self.loss_cls(), labelled=cfg.logits == "labelled")
        with ctx.cluster.reserve(ctx.name, ["trainer"]) as placement:
            session = TrainerSession(ctx, placement["trainer"], cfg, objective, train_batches, eval_batches)
            before, history, after = session.train_and_save(str(ctx.work_dir / "model"))
        ctx.log.info(
            "[%s] eval loss %.4f -> %.4f over %d steps",
            ctx.name, before.get("loss", float("nan")), after.get("loss", float("nan")), len(history),
        )
        return StageResult(
            model="model",
            metrics={
                "eval_loss_before": before.get("loss"),
                "eval_loss": after.get("loss"),
                "train_loss": history[-1]["loss"] if history else None,
                "steps": len(history),
                "train_examples": len(train),
                "eval_examples": len(held),
                "train_tokens": sum(len(t) for t in train),
                "history": history,
                **session.reliability,
            },
        )
