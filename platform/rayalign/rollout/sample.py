"""Sample completions for many prompts from one model with the vLLM rollout workers of a stage.

The prompts are sharded round-robin over ``resources.rollout.num_workers`` engines; the answer is
regrouped per prompt, in input order, so callers never see the sharding. The generation throughput
(output tokens per second, engines already loaded) goes to the stage's telemetry.
"""

from __future__ import annotations

import time

from rayalign import telemetry
from rayalign.cluster.worker_group import WorkerGroup
from rayalign.rollout.vllm_engine import Completion, Sampling
from rayalign.stage import StageContext
from rayalign.workers.rollout import RolloutWorker


def sample_completions(ctx: StageContext, model: str, prompts: list[list[int]], sampling: Sampling,
                       label: str = "rollout") -> list[list[Completion]]:
    """``sampling.n`` completions for each tokenized prompt, from ``model``."""
    engine = ctx.run.resources.rollout.engine(model, ctx.run.seed)
    out: list[list[Completion]] = [[] for _ in prompts]
    with ctx.cluster.reserve(ctx.name, ["rollout"]) as placement:
        group = WorkerGroup(f"{ctx.actor_prefix}/{label}", RolloutWorker, placement["rollout"],
                            lambda r: (engine, int(placement["rollout"].num_cpus)))
        try:
            k = len(group)
            shards = [list(range(len(prompts)))[r::k] for r in range(k)]
            # Wait for the engines to load, so the throughput counts generation only.
            group.run(lambda a, r: a.ping.remote(), ctx.run.timeouts.worker_start_s)
            started = time.monotonic()
            results = group.run(lambda a, r: a.generate.remote([prompts[i] for i in shards[r]], sampling),
                                ctx.run.timeouts.step_s)
            seconds = time.monotonic() - started
        finally:
            group.shutdown()
    for shard, completions in zip(shards, results):
        for c in completions:
            out[shard[c.prompt_index]].append(c)
    telemetry.record_generation(ctx.name, sum(len(c.token_ids) for cs in out for c in cs), seconds)
    return out
