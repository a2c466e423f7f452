"""Spread work over a worker group round-robin and gather the answers back in input order.

The one home of round-robin sharding: the rollout engines' prompts here, and the RL loop's
reward-model and log-prob passes (``round_robin``)."""

from __future__ import annotations

from rayalign.cluster.worker_group import WorkerGroup
from rayalign.rollout.vllm_engine import Completion, Sampling


def round_robin(n_items: int, n_ranks: int) -> list[list[int]]:
    """Item indices per rank: item i goes to rank i % n_ranks, each rank's in input order."""
    return [list(range(n_items))[r::n_ranks] for r in range(n_ranks)]


def generate_sharded(group: WorkerGroup, prompts: list[list[int]], sampling: Sampling,
                     timeout_s: float) -> list[list[Completion]]:
    """``sampling.n`` completions per prompt, round-robin over the engines, regrouped in input order.

    Engines answer with flat arrays (``generate_batch``), which cross Ray as a few buffers; the
    ``Completion`` objects are built here, once."""
    shards = round_robin(len(prompts), len(group))
    results = group.run(lambda a, r: a.generate_batch.remote([prompts[i] for i in shards[r]], sampling), timeout_s)
    out: list[list[Completion]] = [[] for _ in prompts]
    for shard, batch in zip(shards, results):
        for c in batch.completions():
            out[shard[c.prompt_index]].append(c)
    return out
