"""Spread work over a worker group round-robin and gather the answers back in input order.

The one home of round-robin sharding: the rollout engines' prompts here, and the RL loop's
reward-model and log-prob passes (``round_robin``)."""

from __future__ import annotations

from dataclasses import dataclass

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
    return collect_sharded(group, submit_sharded(group, prompts, sampling), timeout_s)


@dataclass
class ShardedGeneration:
    """A ``generate_batch`` call per engine, in flight (``submit_sharded``)."""

    n_prompts: int
    shards: list[list[int]]
    refs: dict


def submit_sharded(group: WorkerGroup, prompts: list[list[int]], sampling: Sampling) -> ShardedGeneration:
    """Start ``generate_sharded``'s calls without waiting (asynchronous RL generates ahead this way)."""
    shards = round_robin(len(prompts), len(group))
    refs = group.submit(lambda a, r: a.generate_batch.remote([prompts[i] for i in shards[r]], sampling))
    return ShardedGeneration(len(prompts), shards, refs)


def collect_sharded(group: WorkerGroup, started: ShardedGeneration, timeout_s: float) -> list[list[Completion]]:
    """Wait for ``submit_sharded``'s calls; their completions regrouped per prompt, in input order."""
    out: list[list[Completion]] = [[] for _ in range(started.n_prompts)]
    for shard, batch in zip(started.shards, group.wait(started.refs, timeout_s)):
        for c in batch.completions():
            out[shard[c.prompt_index]].append(c)
    return out
