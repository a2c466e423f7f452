"""Reward-model stage: Bradley-Terry training of a scalar head on preference pairs.

The incoming model (usually the SFT model) gets a fresh one-output ``score`` head
(``AutoModelForSequenceClassification``); each pair becomes two packed sequences, chosen then
rejected, and the score at each sequence's last token is its reward. The stage reports held-out
pairwise accuracy before and after training, and hands the model on as the named model
``reward_model``: later RL stages score with it, while the policy stays the incoming model.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import Field

from rayalign.data.chat_tokens import tokenize_pairs
from rayalign.data.datasets import load_records, split
from rayalign.data.packing import collate_packed, group_by_tokens
from rayalign.data.sources import dataset_path
from rayalign.errors import DataError
from rayalign.stage import Produces, Stage, StageResult
from rayalign.training.loop import TrainerSession, TrainingConfig
from rayalign.training.losses import Loss, build_loss
from rayalign.training.scores import sequence_scores


class RewardModelConfig(TrainingConfig):
    dataset: str = Field("preference", description="key under `data:` naming the pairs JSONL (null: synthetic)")
    loss: str = Field("bradley_terry", description="registered pairwise loss")
    center_rewards: float = Field(0.0, ge=0, description="weight of mean((r_chosen + r_rejected)^2), keeping "
                                  "scores near 0 (TRL's center_rewards_coefficient; 0: off)")
    lr: float = Field(1e-5, gt=0, description="peak learning rate (cosine decay after warmup)")
    max_length: int = Field(1024, ge=8, description="tokens of prompt + answer after the chat template; a longer "
                            "pair is a bad record (`data.bad_records`)")


@dataclass
class RewardObjective:
    loss: Loss

    def scores(self, model, batch):
        scores = sequence_scores(model, batch)
        return scores[0::2], scores[1::2]

    def weight(self, batch) -> float:
        return float(int(batch["sequence_ids"].max()) + 1) / 2  # pairs in the row

    def __call__(self, model, batch):
        chosen, rejected = self.scores(model, batch)
        loss, metrics = self.loss(chosen, rejected)
        metrics["count"] = float(chosen.numel())
        return loss, metrics


def pack_pairs(pairs: list, max_tokens: int) -> list[dict]:
    """(chosen, rejected) tokenizations packed into rows, each pair as two adjacent sequences."""
    groups = group_by_tokens([len(c) + len(r) for c, r in pairs], max_tokens, 0)
    batches = []
    for g in groups:
        batch = collate_packed([s for i in g for s in pairs[i]])
        batch["num_sequences"] = 2 * len(g)  # counted here, so scoring on a GPU never reads it back
        batches.append(batch)
    return batches


class RewardModelStage(Stage):
    """Trains a reward model; the policy model passes through unchanged."""

    name = "reward_model"
    Config = RewardModelConfig

    def prepare(self, run, plugins, artifacts, index):
        from transformers import AutoTokenizer

        cfg = self.config
        self.loss = build_loss(plugins.losses, cfg.loss, "reward", cfg.loss_options,
                               f"stages[{index}].reward_model.loss", f"stages[{index}].reward_model.loss_options",
                               stage_options={"center_rewards": cfg.center_rewards})
        path = dataset_path(run, cfg.dataset, where=f"stages[{index}].reward_model.dataset")
        records, self.source = load_records(path, "preference", plugins.formats, run.seed)
        tok = AutoTokenizer.from_pretrained(artifacts.model)
        # From the token cache when these pairs and this tokenizer were seen before (a restarted run).
        records, pairs = tokenize_pairs(records, tok, cfg.max_length)
        self.train, self.eval = split(pairs, run.data.eval_fraction, run.seed)

    def produces(self) -> Produces:
        return Produces(models=["reward_model"])  # the policy passes through unchanged

    def run(self, ctx):
        cfg = self.config
        train = pack_pairs(self.train, cfg.max_tokens_per_micro_batch)
        held = pack_pairs(self.eval, cfg.max_tokens_per_micro_batch)
        if not train:
            raise DataError(self.source, "no trainable pairs")
        with ctx.cluster.reserve(ctx.name, ["trainer"]) as placement:
            session = TrainerSession(ctx, placement["trainer"], cfg, RewardObjective(self.loss), train, held,
                                     head="score")
            before, history, after = session.train_and_save(str(ctx.work_dir / "model"))
        ctx.log.info("[%s] held-out pairwise accuracy %.3f -> %.3f, margin %.3f -> %.3f", ctx.name,
                     before.get("accuracy", float("nan")), after.get("accuracy", float("nan")),
                     before.get("margin", float("nan")), after.get("margin", float("nan")))
        return StageResult(
            models={"reward_model": "model"},
            metrics={
                "accuracy_before": before.get("accuracy"),
                "accuracy": after.get("accuracy"),
                "margin_before": before.get("margin"),
                "margin": after.get("margin"),
                "eval_loss": after.get("loss"),
                "steps": len(history),
                "train_pairs": len(self.train),
                "eval_pairs": len(self.eval),
                "history": history,
                **session.reliability,
            },
        )
