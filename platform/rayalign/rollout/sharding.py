"""Spread prompts over a rollout group's engines and gather the answers back per prompt."""

from __future__ import annotations

from rayalign.cluster.worker_group import WorkerGroup
from rayalign.rollout.vllm_engine import Completion, Sampling


def generate_sharded(group: WorkerGroup, prompts: list[list[int]], sampling: Sampling,
                     timeout_s: float) -> list[list[Completion]]:
    """``sampling.n`` completions per prompt, round-robin over the engines, regrouped in input order.

    Engines answer with flat arrays (``generate_batch``), which cross Ray as a few buffers; the
    ``Completion`` objects are built here, once."""
    k = len(group)
    shards = [list(range(len(prompts)))[r::k] for r in range(k)]
    results = group.run(lambda a, r: a.generate_batch.remote([prompts[i] for i in shards[r]], sampling), timeout_s)
    out: list[list[Completion]] = [[] for _ in prompts]
    for shard, batch in zip(shards, results):
        for c in batch.completions():
            out[shard[c.prompt_index]].append(c)
    return out
