"""The ``ppo`` and ``grpo`` stages: one RL machinery (``loop.RLLoop``), two sets of defaults.

``ppo``: a critic, GAE advantages, the KL to the reference as a per-token reward penalty.
``grpo``: no critic, group-relative advantages over ``num_generations`` answers per prompt, the
KL as a k3 loss term; ``advantage: rloo`` switches it to RLOO's leave-one-out baseline.
"""

from __future__ import annotations

from pathlib import Path

from rayalign.colocated_memory import PHASES
from rayalign.data.chat import tokenize_prompt
from rayalign.data.datasets import load_records, split
from rayalign.data.sources import dataset_path
from rayalign.errors import ConfigError, DataError
from rayalign.stage import Produces, Stage, StageResult
from rayalign_rl.async_rollout import check_async
from rayalign_rl.config import GRPOConfig, PPOConfig, RLConfig
from rayalign_rl.loop import Prompt, RewardFn, RLLoop
from rayalign_rl.losses import rl_losses
from rayalign_rl.memory_plan import colocated_plan, with_cuda_graphs

REWARD_MODEL = "reward_model"


class RLStage(Stage):
    Config = RLConfig

    def prepare(self, run, plugins, artifacts, index):
        from transformers import AutoTokenizer

        cfg, where = self.config, f"stages[{index}].{self.name}"
        if cfg.advantage in ("grpo", "rloo") and cfg.num_generations < 2:
            raise ConfigError(f"{where}.num_generations", f"advantage {cfg.advantage!r} compares answers to the "
                              "same prompt: needs at least 2")
        self.rewards = []
        for k, term in enumerate(cfg.rewards):
            if term.name == REWARD_MODEL:
                if cfg.reward_model is None:
                    raise ConfigError(f"{where}.rewards[{k}]", "the `reward_model` term needs "
                                      f"{where}.reward_model (a path, or the name an earlier stage gives its model)")
                self.rewards.append(RewardFn(term.name, term.weight, None, term.options))
            else:
                fn = plugins.rewards.get(term.name, where=f"{where}.rewards[{k}].name")
                self.rewards.append(RewardFn(term.name, term.weight, fn, term.options))
        if not self.rewards:
            raise ConfigError(f"{where}.rewards", "no reward: name at least one")
        if cfg.dynamic_sampling and cfg.reward_model is not None and run.resources.colocated:
            # Dynamic sampling scores each round before the next is generated: the reward model would
            # run while the engines hold the shared GPU, which the colocated memory plan does not count.
            raise ConfigError(f"{where}.dynamic_sampling", "not with a reward model on GPUs the engines share "
                              "(resources.colocate): give the reward model GPUs of its own, or use rule rewards only")
        check_async(cfg, run, where)
        rl_losses(plugins.losses, cfg, where)  # a wrong name, family or option stops here, before any worker
        path = dataset_path(run, cfg.prompts, where=f"{where}.prompts")
        records, self.source = load_records(path, "prompt", plugins.formats, run.seed)
        tok = AutoTokenizer.from_pretrained(artifacts.model)
        prompts = []
        for record in records:
            ids = tokenize_prompt(tok, record["prompt"])
            if len(ids) > cfg.max_prompt_length:
                records.ledger.report(record.where, "too_long", f"{len(ids)} prompt tokens after the chat template, "
                                      f"above max_prompt_length={cfg.max_prompt_length}")
            else:
                prompts.append(Prompt(record["prompt"], record.get("reference"), ids))
        records.ledger.check()
        fraction = run.data.eval_fraction if cfg.eval_fraction is None else cfg.eval_fraction
        self.train, self.held_out = split(prompts, fraction, run.seed)
        if not self.train:
            raise DataError(self.source, "no prompt left to train on")
        name = cfg.reward_model
        if name is not None and not (Path(name).expanduser() / "config.json").exists():
            artifacts.expect_model(name, f"{where}.reward_model")  # e.g. reward_model's, checked before any stage runs
        # A colocated plan that cannot fit stops the run here, before any stage starts; run() plans
        # again with the reward model an earlier stage produced.
        colocated_plan(run, cfg, artifacts.model, cfg.reward_model, where)

    def produces(self) -> Produces:
        return Produces(datasets=["rollouts"])

    def _reward_model_path(self, ctx) -> str | None:
        name = self.config.reward_model
        if name is None:
            return None
        if name in ctx.artifacts.models:
            return ctx.artifacts.models[name]
        if (Path(name).expanduser() / "config.json").exists():
            return str(Path(name).expanduser().resolve())
        known = ", ".join(sorted(ctx.artifacts.models)) or "none"
        raise ConfigError(f"stages[{ctx.index}].{self.name}.reward_model",
                          f"{name!r} is neither a model an earlier stage produced (produced: {known}) nor a model directory")

    def memory_plan(self, ctx, reward_model: str | None):
        """The colocated memory plan, logged (None when the roles do not share GPUs)."""
        where = f"stages[{ctx.index}].{self.name}"
        plan = colocated_plan(ctx.run, self.config, ctx.artifacts.model, reward_model, where, ctx.log)
        if plan is None:
            return None
        ctx.log.info("[%s] colocated memory plan: %s", ctx.name, plan.summary())
        if not plan.cuda_graphs and ctx.run.resources.rollout.enforce_eager is None:
            ctx.log.warning("[%s] vLLM runs eager (no CUDA graphs: slower decoding) because with graphs the colocated "
                            "plan needs %.1f GiB per GPU of %.1f; a smaller resources.rollout.gpu_memory_utilization "
                            "or max_tokens_per_micro_batch brings them back", ctx.name,
                            with_cuda_graphs(plan).peak / 2**30, plan.capacity / 2**30)
        return plan

    def run(self, ctx):
        cfg = self.config
        reward_model = self._reward_model_path(ctx)
        plan = self.memory_plan(ctx, reward_model)
        roles = ["trainer", "rollout"]
        roles += ["critic"] if cfg.needs_critic else []
        roles += ["reference"] if cfg.kl_coef > 0 else []
        roles += ["reward"] if reward_model else []
        with ctx.cluster.reserve(ctx.name, roles) as placement:
            loop = RLLoop(ctx, cfg, placement, self.train, self.held_out, self.rewards, reward_model, plan)
            try:
                history, evals = loop.run()
                start_memory = loop.start_memory
                loop.save(str(ctx.work_dir / "model"))
                loop.finish_rollouts(ctx.work_dir / "rollouts.jsonl")
                transport = loop.sync.transport
            finally:
                loop.shutdown()
        first, last = evals[0], evals[-1]
        ctx.log.info("[%s] held-out reward %.3f -> %.3f over %d steps", ctx.name,
                     first.get("reward", float("nan")), last.get("reward", float("nan")), len(history))
        totals = {k: sum(m[k] for m in history) for k in history[0] if k.startswith("time/") and k.endswith("_s")}
        spent = sum(totals.values()) or 1.0
        return StageResult(
            model="model",
            datasets={"rollouts": "rollouts.jsonl"},
            metrics={
                "eval_reward_before": first.get("reward"),
                "eval_reward": last.get("reward"),
                "evals": evals,
                "steps": len(history),
                "stale_rollouts": sum(m["stale"] for m in history),
                "sync_transport": transport,
                "time_share": {k[len("time/"):-len("_s")]: v / spent for k, v in totals.items()},
                "train_prompts": len(self.train),
                "eval_prompts": min(len(self.held_out), cfg.eval_prompts),
                "history": history,
                # Per phase, the highest device memory any GPU of the stage used (CUDA only).
                "device_peak_gib": _phase_peaks(history),
                # ... and what each GPU role's torch allocator reserved at its peak (largest rank),
                # start-up included: the device's figure less their sum is memory outside torch's
                # allocators (vLLM's pool, CUDA contexts, communication buffers).
                "reserved_peak_gib": _role_peaks(history, start_memory),
                "memory_plan_gib": {p: plan.total(p) / 2**30 for p in PHASES} if plan else None,
                "memory_plan": plan.summary() if plan else None,
            },
        )


def _phase_peaks(history: list[dict]) -> dict[str, float] | None:
    peaks = {}
    for m in history:
        for key, value in m.items():
            if key.startswith("memory/") and key.endswith("/device_gib"):
                phase = key.split("/")[1]
                peaks[phase] = max(peaks.get(phase, 0.0), value)
    return peaks or None


def _role_peaks(history: list[dict], start: dict[str, float]) -> dict[str, dict[str, float]] | None:
    """{phase: {role: GiB}} from the ``memory/<phase>/<role>_reserved_gib`` metrics, and
    ``memory/start/device_gib`` as the start phase's ``device``."""
    peaks: dict[str, dict[str, float]] = {}
    for m in [start, *history]:
        for key, value in m.items():
            if key.startswith("memory/") and key.endswith("_gib"):
                _, phase, name = key.split("/")
                role = name[:-len("_reserved_gib")] if name.endswith("_reserved_gib") else name[:-len("_gib")]
                peaks.setdefault(phase, {})[role] = max(peaks.get(phase, {}).get(role, 0.0), value)
    return peaks or None


class PPOStage(RLStage):
    """PPO with a critic (GAE), KL to the reference in the reward."""

    name = "ppo"
    Config = PPOConfig


class GRPOStage(RLStage):
    """GRPO (or RLOO): group-relative advantages, no critic, KL in the loss."""

    name = "grpo"
    Config = GRPOConfig
