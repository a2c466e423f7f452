"""Driver-side sampling for a stage: completions for many prompts from one model, through the stage's
vLLM rollout workers (the engine adapter they run is ``rollout.vllm_engine``).

The prompts are sharded round-robin over ``resources.rollout.num_workers`` engines; the answer is
regrouped per prompt, in input order, so callers never see the sharding. The generation throughput
(output tokens per second, engines already loaded) goes to the stage's telemetry.
"""

from __future__ import annotations

import time

from rayalign import telemetry
from rayalign.cluster.worker_group import WorkerGroup
from rayalign.rollout.sharding import generate_sharded
from rayalign.rollout.vllm_engine import Completion, Sampling, engine_config
from rayalign.stage import StageContext
from rayalign.workers.rollout import RolloutWorker


def sample_completions(ctx: StageContext, model: str, prompts: list[list[int]], sampling: Sampling,
                       label: str = "rollout") -> list[list[Completion]]:
    """``sampling.n`` completions for each tokenized prompt, from ``model``."""
    engine = engine_config(ctx.run.resources.rollout, model, ctx.run.seed)
    with ctx.cluster.reserve(ctx.name, ["rollout"]) as placement:
        group = WorkerGroup(f"{ctx.actor_prefix}/{label}", RolloutWorker, placement["rollout"],
                            lambda r: (engine, int(placement["rollout"].num_cpus)))
        try:
            # Wait for the engines to load, so the throughput counts generation only.
            group.run(lambda a, r: a.ping.remote(), ctx.run.timeouts.worker_start_s)
            started = time.monotonic()
            out = generate_sharded(group, prompts, sampling, ctx.run.timeouts.step_s)
            seconds = time.monotonic() - started
        finally:
            group.shutdown()
    telemetry.record_generation(ctx.name, sum(len(c.token_ids) for cs in out for c in cs), seconds)
    return out
