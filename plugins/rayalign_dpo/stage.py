"""DPO on preference pairs, with reference log-probs computed once by the reference worker.

Each pair becomes two packed sequences (chosen then rejected) in the same row, so one forward
pass scores both. The reference model scores every micro-batch once before training; its
log-probs travel inside the micro-batches and are saved with the stage's outputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from pydantic import Field

from rayalign.cluster.worker_group import WorkerGroup
from rayalign.data.chat import tokenize_completion
from rayalign.data.datasets import dataset_path, load_records, split
from rayalign.data.packing import collate_packed, group_by_tokens
from rayalign.errors import DataError
from rayalign.stage import Stage, StageResult
from rayalign.training.loop import TrainerSession, TrainingConfig
from rayalign.training.losses import Loss, sequence_logps
from rayalign.workers.reference import ReferenceWorker


class DPOConfig(TrainingConfig):
    dataset: str = Field("preference", description="key under `data:` naming the pairs JSONL (null: synthetic)")
    loss: str = Field("sigmoid", description="registered preference loss: sigmoid (DPO) or ipo")
    beta: float = Field(0.1, gt=0, description="strength of the KL constraint to the reference")
    lr: float = Field(5e-7, gt=0, description="peak learning rate (cosine decay after warmup)")


@dataclass
class DPOObjective:
    loss: Loss

    def logps(self, model, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-pair log-probs of chosen and rejected completions (summed, or mean for IPO)."""
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        num_seqs = int(batch["sequence_ids"].max()) + 1
        sums, counts = sequence_logps(logits, batch["labels"], batch["sequence_ids"], num_seqs)
        logps = sums / counts.clamp(min=1) if getattr(self.loss, "uses_mean_logps", False) else sums
        return logps[0::2], logps[1::2]

    def weight(self, batch) -> float:
        return float(int(batch["sequence_ids"].max()) + 1) / 2  # pairs in the row

    def __call__(self, model, batch):
        chosen, rejected = self.logps(model, batch)
        loss, metrics = self.loss(chosen, rejected, batch["ref_chosen"], batch["ref_rejected"])
        metrics["count"] = float(chosen.numel())
        return loss, metrics


class DPOStage(Stage):
    """Preference optimisation against a frozen reference (the incoming model)."""

    name = "dpo"
    Config = DPOConfig

    def prepare(self, run, plugins, artifacts, index):
        cfg = self.config
        loss_cls = plugins.losses.get(cfg.loss, where=f"stages[{index}].dpo.loss")
        self.loss = loss_cls(beta=cfg.beta)
        path = dataset_path(run, cfg.dataset, where=f"stages[{index}].dpo.dataset")
        records, self.source = load_records(path, "preference", plugins.formats, run.seed)
        self.train, self.eval = split(records, run.data.eval_fraction, run.seed)

    def _batches(self, tok, records, part: str) -> list[dict]:
        cfg = self.config
        pairs = []
        for i, r in enumerate(records):
            where = f"{self.source} ({part} #{i})"
            chosen = tokenize_completion(tok, r["prompt"], r["chosen"], cfg.max_length, where)
            rejected = tokenize_completion(tok, r["prompt"], r["rejected"], cfg.max_length, where)
            if chosen.num_trained and rejected.num_trained:
                pairs.append((chosen, rejected))
        groups = group_by_tokens([len(c) + len(r) for c, r in pairs], cfg.max_tokens_per_micro_batch, 0)
        return [collate_packed([s for i in g for s in pairs[i]]) for g in groups]

    def run(self, ctx):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(ctx.artifacts.model)
        train, held = self._batches(tok, self.train, "train"), self._batches(tok, self.eval, "eval")
        if not train:
            raise DataError(self.source, "no trainable pairs (completions truncated away)")
        objective = DPOObjective(self.loss)
        timeouts = ctx.run.timeouts
        with ctx.cluster.reserve(ctx.name, ["trainer", "reference"]) as placement:
            ref = WorkerGroup(f"{ctx.actor_prefix}/reference", ReferenceWorker, placement["reference"],
                              lambda r: (ctx.artifacts.model, int(placement["reference"].num_cpus)))
            try:
                ref_logps = ref.run(lambda a, r: a.score.remote(objective.logps, train + held), timeouts.step_s)[0]
            finally:
                ref.shutdown()
            for batch, (c, r) in zip(train + held, ref_logps):
                batch["ref_chosen"], batch["ref_rejected"] = c, r
            torch.save(ref_logps, ctx.work_dir / "reference_logps.pt")
            session = TrainerSession(ctx, placement["trainer"], self.config, objective, train, held)
            try:
                before = session.evaluate() if held else {}
                history = session.fit()
                after = session.evaluate() if held else {}
                session.save(str(ctx.work_dir / "model"))
            finally:
                session.shutdown()
        ctx.log.info(
            "[%s] held-out reward accuracy %.3f -> %.3f, margin %.4f -> %.4f",
            ctx.name, before.get("reward_accuracy", float("nan")), after.get("reward_accuracy", float("nan")),
            before.get("reward_margin", float("nan")), after.get("reward_margin", float("nan")),
        )
        return StageResult(
            model="model",
            metrics={
                "reward_accuracy_before": before.get("reward_accuracy"),
                "reward_accuracy": after.get("reward_accuracy"),
                "reward_margin_before": before.get("reward_margin"),
                "reward_margin": after.get("reward_margin"),
                "eval_loss": after.get("loss"),
                "steps": len(history),
                "train_pairs": len(self.train),
                "eval_pairs": len(self.eval),
                "history": history,
            },
        )
