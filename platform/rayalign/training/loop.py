"""The driver side of training, shared by every training stage (SFT, DPO, ...).

The driver packs examples into micro-batches, shards them over trainer ranks once, and then
owns the step loop: which micro-batches each rank runs at each step (the data position), the
progress line, and evaluation. Trainers only execute steps, so a later checkpoint can record
exactly where the data stood.
"""

from __future__ import annotations

import math
import random
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from rayalign.cluster.worker_group import Placement, WorkerGroup
from rayalign.stage import StageConfig, StageContext
from rayalign.training.checkpoint import CheckpointStore, TrainingState
from rayalign.training.progress import Progress
from rayalign.workers.base import weighted_mean
from rayalign.workers.trainer import LoraSpec, TrainerWorker, TrainSpec


class LoraOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    r: int = Field(8, ge=1)
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj"]


class TrainingConfig(StageConfig):
    """Options every training stage shares (defaults follow common fine-tuning practice)."""

    epochs: int = Field(1, ge=1, description="passes over the training split")
    lr: float = Field(2e-5, gt=0, description="peak learning rate (cosine decay after warmup)")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="share of steps spent warming up")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="final LR as a share of the peak")
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0, description="gradient clipping")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step per rank")
    max_length: int = Field(1024, ge=8, description="tokens per example after the chat template; a longer one is a "
                            "bad record (`data.bad_records`), never truncated")
    max_tokens_per_micro_batch: int = Field(4096, ge=8, description="packing budget of one row")
    loss_options: dict[str, Any] = Field({}, description="options of the stage's loss beyond the stage's own "
                                         "(`rayalign plugins show <loss>` lists them), checked before any work")
    zero_stage: Literal[2, 3] = 2
    bf16: bool = True
    gradient_checkpointing: bool = False
    attn_implementation: str = Field("auto", description="auto: rayalign_packed on a GPU (varlen flash attention: packed rows get no "
                                     "dense mask), sdpa on CPU; or any transformers "
                                     "attn_implementation (training/attention.py)")
    kernels: Literal["none", "liger"] = Field("none", description="liger: Liger's fused RMSNorm, SwiGLU and RoPE "
                                              "Triton kernels in the trainers' model (GPU, liger-kernel installed)")
    compile: bool = Field(False, description="torch.compile each decoder layer of the trainers' model (dynamic "
                          "shapes; the first steps pay the compilation): training/compiled_layers.py")
    lora: LoraOptions | None = None
    qlora: LoraOptions | None = Field(None, description="QLoRA: these LoRA options over a 4-bit NF4 base "
                                      "(GPU with bitsandbytes; workers/quantization.py)")

    def spec(self, model_path: str, total_steps: int, seed: int, head: str = "lm") -> TrainSpec:
        lora = LoraSpec(**self.lora.model_dump()) if self.lora else None
        return TrainSpec(
            model_path=model_path, total_steps=total_steps, lr=self.lr, weight_decay=self.weight_decay,
            warmup_ratio=self.warmup_ratio, min_lr_ratio=self.min_lr_ratio, grad_accum=self.grad_accum,
            max_grad_norm=self.max_grad_norm, zero_stage=self.zero_stage, bf16=self.bf16,
            gradient_checkpointing=self.gradient_checkpointing, attn_implementation=self.attn_implementation,
            kernels=self.kernels, compile=self.compile,
            lora=lora, qlora=LoraSpec(**self.qlora.model_dump()) if self.qlora else None, seed=seed, head=head,
        )


class TrainerSession:
    """A trainer group set up on a model with micro-batches loaded, driven step by step.

    The step composition depends only on the seed and the global batch (ranks x grad_accum), not
    on how it is split: step s trains micro-batches ``order[s*B:(s+1)*B]`` of one seeded global
    order per epoch, rank r taking its consecutive ``grad_accum`` of them. So 2 ranks x 1 and
    1 rank x 2 take identical steps, and the data position is one number.
    """

    def __init__(self, ctx: StageContext, placement: Placement, cfg: TrainingConfig, objective,
                 train_batches: list[dict], eval_batches: list[dict], head: str = "lm"):
        import ray

        self.ctx, self.cfg = ctx, cfg
        self.timeouts = ctx.run.timeouts
        n = len(placement.bundles)
        self.num_train = len(train_batches)
        self.global_batch = n * cfg.grad_accum
        self.steps_per_epoch = math.ceil(self.num_train / self.global_batch)
        self.total_steps = self.steps_per_epoch * cfg.epochs
        self.store = CheckpointStore(ctx.checkpoint_dir, ctx.run.reliability.keep_checkpoints, ctx.log)
        self._order, self._order_epoch = [], -1
        self.reliability: dict = {}  # skipped steps and rollbacks of the last fit(), for metrics
        # Each micro-batch's weight in a step's mean: trained tokens (SFT) or pairs (DPO).
        self.weights = [objective.weight(b) for b in train_batches]
        self.has_eval = bool(eval_batches)
        eval_ids = list(range(self.num_train, self.num_train + len(eval_batches)))
        self.eval_shards = [eval_ids[r::n] for r in range(n)]
        # One copy per node in the object store, shared by every rank there.
        data = ray.put([to_numpy(b) for b in train_batches + eval_batches])
        spec = cfg.spec(ctx.artifacts.model, self.total_steps, ctx.run.seed, head)
        self.group = start_trainers(ctx, placement, spec, objective)
        self.group.run(lambda a, r: a.load_batches.remote(data), self.timeouts.step_s)

    def epoch_order(self, epoch: int) -> list[int]:
        """The global micro-batch order of one epoch, padded to whole steps.

        Padding repeats micro-batches from the start of the order and is counted in the metrics
        (``repeated_micro_batches``), never silent.
        """
        order = list(range(self.num_train))
        random.Random(self.ctx.run.seed * 1000 + epoch).shuffle(order)
        short = self.steps_per_epoch * self.global_batch - len(order)
        return order + [order[i % len(order)] for i in range(short)]

    def step_batches(self, step: int) -> list[int]:
        """The micro-batches of optimizer step ``step`` (0-based), from the step number alone."""
        epoch, s = divmod(step, self.steps_per_epoch)
        if self._order_epoch != epoch:
            self._order, self._order_epoch = self.epoch_order(epoch), epoch
        return self._order[s * self.global_batch : (s + 1) * self.global_batch]

    def fit(self) -> list[dict[str, float]]:
        rel = self.ctx.run.reliability
        state = self.restore()
        progress = Progress(self.ctx.name, self.total_steps, self.ctx.log)
        ga = self.cfg.grad_accum
        while state.step < self.total_steps:
            chunk = self.step_batches(state.step)
            metrics = train_step(self.group, chunk, self.weights, ga, self.timeouts.step_s)
            state.step += 1
            metrics.update(step=state.step, epoch=state.step / self.steps_per_epoch, batches=chunk)
            state.history.append(metrics)
            if metrics["skipped"]:
                state.skipped += 1
                self.ctx.log.warning("[%s] step %d skipped: non-finite gradient norm (loss %s)",
                                     self.ctx.name, state.step, metrics.get("loss"))
            reason = exploded(state.history, rel.max_consecutive_skips, rel.loss_spike_factor)
            if reason:
                state = self.rollback(state, reason)
                continue
            progress.update(state.step, metrics)
            if rel.checkpoint_every and state.step % rel.checkpoint_every == 0 and state.step < self.total_steps:
                self.checkpoint(state)
        self.reliability = {"skipped_steps": state.skipped, "rollbacks": state.rollbacks, "events": state.events}
        history = state.history
        if history:
            history[-1]["repeated_micro_batches"] = (self.steps_per_epoch * self.global_batch - self.num_train) * self.cfg.epochs
        return history

    # -- checkpoints, resume and rollback ------------------------------------------------------

    def checkpoint(self, state: TrainingState) -> None:
        tmp = self.store.begin(state.step)
        self.group.run(lambda a, r: a.save_checkpoint.remote(str(tmp)), self.timeouts.step_s)
        path = self.store.commit(tmp, state)
        self.ctx.log.info("[%s] checkpoint %s", self.ctx.name, path.name)

    def restore(self) -> TrainingState:
        """The newest valid checkpoint of this stage (after a restart or resume), else step 0."""
        latest = self.store.latest()
        if latest is None:
            state = TrainingState()
            if self.ctx.run.reliability.checkpoint_every:
                self.checkpoint(state)  # a rollback target before the first step
            return state
        path, state = latest
        self.group.run(lambda a, r: a.load_checkpoint.remote(str(path), state.lr_scale), self.timeouts.step_s)
        self.ctx.log.info("[%s] resumed from %s (step %d of %d)", self.ctx.name, path.name, state.step, self.total_steps)
        return state

    def rollback(self, state: TrainingState, reason: str) -> TrainingState:
        rel = self.ctx.run.reliability
        latest = self.store.latest()
        if latest is None or state.rollbacks >= rel.max_rollbacks:
            why = "no checkpoint to return to (set reliability.checkpoint_every)" if latest is None else \
                f"{state.rollbacks} rollbacks already (reliability.max_rollbacks)"
            raise TrainingDiverged(f"stage {self.ctx.name}: {reason} at step {state.step}; {why}")
        path, restored = latest
        restored.lr_scale = state.lr_scale * rel.lr_backoff
        restored.rollbacks, restored.skipped = state.rollbacks + 1, state.skipped
        restored.events = state.events + [{"event": "rollback", "at_step": state.step, "to_step": restored.step,
                                           "reason": reason, "lr_scale": restored.lr_scale}]
        self.group.run(lambda a, r: a.load_checkpoint.remote(str(path), restored.lr_scale), self.timeouts.step_s)
        self.ctx.log.warning("[%s] %s at step %d: rolled back to %s with the LR scaled by %g",
                             self.ctx.name, reason, state.step, path.name, restored.lr_scale)
        return restored

    def train_and_save(self, path: str) -> tuple[dict[str, float], list[dict], dict[str, float]]:
        """The whole stage's training: held-out metrics before, every step, held-out metrics after,
        and the model written to ``path``. The trainers are shut down either way."""
        try:
            before = self.evaluate() if self.has_eval else {}
            history = self.fit()
            after = self.evaluate() if self.has_eval else {}
            self.save(path)
        finally:
            self.shutdown()
        return before, history, after

    def evaluate(self) -> dict[str, float]:
        per_rank = self.group.run(lambda a, r: a.evaluate.remote(self.eval_shards[r]), self.timeouts.step_s)
        return weighted_mean([m for rank in per_rank for m in rank])

    def save(self, path: str) -> None:
        self.group.run(lambda a, r: a.save.remote(path), self.timeouts.step_s)

    def shutdown(self) -> None:
        self.group.shutdown()


def check_kernels(kernels: str, run, where: str) -> None:
    """Refuse Liger's kernels before any worker starts where they cannot run: CPU trainers, or no
    liger-kernel on this machine (the workers share its environment)."""
    if kernels != "liger":
        return
    import importlib.util

    from rayalign.errors import ConfigError

    if run.resources.trainer.num_gpus <= 0:
        raise ConfigError(where, "liger kernels are Triton kernels and need GPU trainers "
                          "(resources.trainer.num_gpus is 0)")
    if importlib.util.find_spec("liger_kernel") is None:
        raise ConfigError(where, "liger-kernel is not installed (pip install liger-kernel)")


def start_trainers(ctx: StageContext, placement: Placement, spec: TrainSpec, objective, role: str = "trainer") -> WorkerGroup:
    """A trainer group of ``placement``'s ranks, joined into one DeepSpeed job and set up on ``spec``."""
    n = len(placement.bundles)
    threads = max(1, int(placement.num_cpus))
    group = WorkerGroup(f"{ctx.actor_prefix}/{role}", TrainerWorker, placement, lambda r: (r, n, threads))
    timeout = ctx.run.timeouts.worker_start_s
    master = group.run(lambda a, r: a.free_address.remote(), timeout, ranks=[0])[0]
    counts = group.run(lambda a, r: a.setup.remote(master, spec, objective), timeout)
    ctx.log.info("[%s] %d %s(s), %d trainable parameters, %d steps", ctx.name, n, role, counts[0], spec.total_steps)
    return group


def split_step(chunk: list[int], weights: list[float], ranks: int, grad_accum: int) -> tuple[list[list[int]], list[list[float]]]:
    """Which micro-batches each rank runs for one optimizer step on ``chunk``, and the scale of each.

    A step holds ``ranks * grad_accum`` micro-batches, or fewer (an epoch's tail, a small RL
    batch). Each rank takes ``ceil(len(chunk) / ranks)`` consecutive ones, since ZeRO reduces
    gradients in every backward and so every rank must run as many; a slot left over (fewer than
    one per rank) gets a micro-batch at scale 0, which adds no gradient.

    DeepSpeed divides each micro-batch loss by grad_accum and averages gradients over ranks;
    scaling by weight * ga * n / total undoes both and leaves the step's loss as
    sum(weight_i * mean_loss_i) / total: one mean over the step.
    """
    if not 0 < len(chunk) <= ranks * grad_accum:
        raise ValueError(f"a step takes 1 to {ranks * grad_accum} micro-batches, not {len(chunk)}")
    per = -(-len(chunk) // ranks)
    padded = list(chunk) + [chunk[0]] * (ranks * per - len(chunk))
    total = sum(weights[i] for i in chunk) or 1.0
    per_rank = [padded[r * per : (r + 1) * per] for r in range(ranks)]
    scales = [[weights[i] * grad_accum * ranks / total if r * per + k < len(chunk) else 0.0 for k, i in enumerate(ids)]
              for r, ids in enumerate(per_rank)]
    return per_rank, scales


def train_step(group: WorkerGroup, chunk: list[int], weights: list[float], grad_accum: int, timeout_s: float) -> dict:
    """One optimizer step on the loaded micro-batches ``chunk``, split across ranks by ``split_step``."""
    per_rank, scales = split_step(chunk, weights, len(group), grad_accum)
    results = group.run(lambda a, r: a.train_step.remote(per_rank[r], scales[r]), timeout_s)
    metrics = weighted_mean([m for m in results if m.get("count", 1.0) > 0])
    metrics["skipped"] = max(r["skipped"] for r in results)
    return metrics


def to_numpy(batch: dict) -> dict:
    """Tensors as numpy arrays: the object store hands those to every rank without a copy."""
    return {k: v.numpy() if hasattr(v, "numpy") else v for k, v in batch.items()}


class TrainingDiverged(RuntimeError):
    """The loss kept exploding after every rollback the config allows."""


def exploded(history: list[dict], max_skips: int, spike_factor: float | None, window: int = 20) -> str | None:
    """Why the last step calls for a rollback: too many skipped steps in a row, or a loss spike."""
    skips = 0
    for m in reversed(history):
        if not m.get("skipped"):
            break
        skips += 1
    if skips >= max_skips:
        return f"{skips} consecutive non-finite steps"
    if spike_factor is None:
        return None
    previous = [m["loss"] for m in history[-window - 1 : -1] if not m.get("skipped") and math.isfinite(m["loss"])]
    loss = history[-1].get("loss", float("nan"))
    if len(previous) >= 3 and math.isfinite(loss) and loss > spike_factor * (sum(previous) / len(previous)):
        return f"loss {loss:.4g} above {spike_factor:g}x its running mean {sum(previous) / len(previous):.4g}"
    return None
