"""DPO's reference pass: every packed row scored once by the frozen reference, across its workers.

The rows are split over the reference workers, balanced by tokens (longest first onto the least
loaded worker), each worker scores only its share, and the answers are put back in row order. The
reference role gets its own placement group, released as soon as the log-probs are cached, so the
reference workers' GPUs are free again before the trainers start (and may be the same GPUs).
"""

from __future__ import annotations

from typing import Any, Callable

from rayalign.cluster.worker_group import WorkerGroup
from rayalign.workers.reference import ReferenceWorker


def shard_rows(sizes: list[int], ranks: int) -> list[list[int]]:
    """Row indices per rank: every row exactly once, token totals balanced, each rank's in order."""
    loads, shards = [0] * ranks, [[] for _ in range(ranks)]
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(ranks), key=lambda r: (loads[r], r))
        loads[r] += sizes[i]
        shards[r].append(i)
    return [sorted(s) for s in shards]


def score_sharded(group: WorkerGroup, fn: Callable[[Any, dict], Any], batches: list[dict], timeout_s: float) -> list:
    """``fn(model, batch)`` for every batch, each on one worker of ``group``; results in batch order."""
    shards = shard_rows([int(b["input_ids"].numel()) for b in batches], len(group))
    answers = group.run(lambda a, r: a.score.remote(fn, [batches[i] for i in shards[r]]), timeout_s)
    out: list = [None] * len(batches)
    for ids, results in zip(shards, answers):
        if len(results) != len(ids):
            raise RuntimeError(f"a reference worker returned {len(results)} results for {len(ids)} rows")
        for i, result in zip(ids, results):
            out[i] = result
    return out


def reference_logps(ctx, fn: Callable[[Any, dict], Any], batches: list[dict]) -> list:
    """The reference model's ``fn`` on every batch: its own placement group, workers shut down and the
    group released before returning, so the trainers can take the same GPUs."""
    with ctx.cluster.reserve(f"{ctx.name}-reference", ["reference"]) as placement:
        p = placement["reference"]
        group = WorkerGroup(f"{ctx.actor_prefix}/reference", ReferenceWorker, p,
                            lambda r: (ctx.artifacts.model, int(p.num_cpus)))
        try:
            return score_sharded(group, fn, batches, ctx.run.timeouts.step_s)
        finally:
            group.shutdown()
