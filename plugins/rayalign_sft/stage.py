"""Supervised fine-tuning on chat data: assistant tokens only, packed rows, DeepSpeed trainers."""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import Field

from rayalign.data.chat import tokenize_conversation
from rayalign.data.datasets import dataset_path, load_records, split
from rayalign.data.packing import collate_packed, group_by_tokens
from rayalign.data.validation import within_max_length
from rayalign.errors import DataError
from rayalign.stage import Stage, StageResult
from rayalign.training.loop import TrainerSession, TrainingConfig
from rayalign.training.losses import IGNORE_INDEX, Loss


class SFTConfig(TrainingConfig):
    dataset: str = Field("sft", description="key under `data:` naming the chat JSONL (null: synthetic)")
    loss: str = Field("sft", description="registered loss applied to the logits")
    epochs: int = Field(3, ge=1, description="passes over the training split")
    max_length: int = Field(1024, ge=8, description="tokens per conversation after the chat template; a longer one "
                            "is a bad record (`data.bad_records`), never truncated")


@dataclass
class SFTObjective:
    """One packed row through the model, then the configured token loss."""

    loss: Loss

    def __call__(self, model, batch):
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
        path = dataset_path(run, cfg.dataset, where=f"stages[{index}].sft.dataset")
        records, self.source = load_records(path, "chat", plugins.formats, run.seed)
        # Tokenized here, before any work, so an over-long conversation is a bad record of the
        # preflight (skipped and counted, or the run's one-line error), never a truncated one.
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(artifacts.model)
        _, tokenized = within_max_length(
            records, lambda r: tokenize_conversation(tok, r["messages"], None, where=r.where), self.config.max_length)
        self.train, self.eval = split(tokenized, run.data.eval_fraction, run.seed)

    def run(self, ctx):
        cfg = self.config
        train, held = self.train, self.eval
        if not train:
            raise DataError(self.source, "no training examples left after the held-out split (data.eval_fraction)")
        train_batches = pack(train, cfg.max_tokens_per_micro_batch, ctx.run.seed)
        eval_batches = pack(held, cfg.max_tokens_per_micro_batch, ctx.run.seed)
        objective = SFTObjective(self.loss_cls())
        with ctx.cluster.reserve(ctx.name, ["trainer"]) as placement:
            session = TrainerSession(ctx, placement["trainer"], cfg, objective, train_batches, eval_batches)
            try:
                before = session.evaluate() if eval_batches else {}
                history = session.fit()
                after = session.evaluate() if eval_batches else {}
                session.save(str(ctx.work_dir / "model"))
            finally:
                session.shutdown()
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
