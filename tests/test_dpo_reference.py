"""DPO's reference pass (rayalign_dpo/reference.py): the rows are shared out over the reference
workers, each row scored exactly once, the results those of scoring every row in one process, and
the workers and their placement group gone once the log-probs are back."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from rayalign_dpo.reference import shard_rows


def test_shards_hold_every_row_once_balanced_by_tokens():
    sizes = [900, 10, 500, 480, 30, 20, 700, 60]
    shards = shard_rows(sizes, 3)
    assert sorted(i for s in shards for i in s) == list(range(len(sizes)))
    assert all(s == sorted(s) for s in shards)
    loads = [sum(sizes[i] for i in s) for s in shards]
    assert max(loads) - min(loads) <= max(sizes) // 2, loads
    assert shard_rows([5, 5], 4) == [[0], [1], [], []]  # more workers than rows: some get none


@pytest.fixture(scope="module")
def ray_cluster():
    from rayalign.testing import start_local_ray

    started = start_local_ray()
    yield
    if started:
        import ray

        ray.shutdown()


@pytest.mark.slow
def test_each_row_is_scored_once_across_workers_and_equals_one_process(ray_cluster, tiny_model_path, tmp_path):
    import ray
    from ray.util import placement_group_table
    from transformers import AutoModelForCausalLM

    from rayalign.cluster.runtime import Cluster
    from rayalign.config import ResourcesConfig, RunConfig
    from rayalign.plugins import get_plugin_manager
    from rayalign.stage import Artifacts
    from rayalign_dpo.losses import SigmoidDPOLoss
    from rayalign_dpo.reference import reference_logps
    from rayalign_dpo.stage import DPOObjective, DPOStage

    run = RunConfig.model_validate({"model": tiny_model_path, "stages": [{"dpo": {}}]})
    stage = DPOStage(DPOStage.Config(max_tokens_per_micro_batch=160, max_length=128))
    stage.prepare(run, get_plugin_manager(), Artifacts(model=tiny_model_path), 0)  # synthetic pairs
    batches = stage._batches(stage.train + stage.eval)
    assert len(batches) >= 4
    for i, b in enumerate(batches):
        b["row"] = i  # a host value, as the row's sequence count: passed through to the scorer untouched
    objective = DPOObjective(SigmoidDPOLoss(beta=0.1))
    log = tmp_path / "scored.txt"
    resources = ResourcesConfig.model_validate({"reference": {"num_workers": 2, "num_cpus": 1}})
    ctx = SimpleNamespace(name="dpo-test", actor_prefix="dpo-test", cluster=Cluster(resources),
                          artifacts=Artifacts(model=tiny_model_path), run=SimpleNamespace(timeouts=run.timeouts))

    def recording_logps(model, batch):  # a closure: Ray ships it by value to the workers
        with open(log, "a") as fh:
            fh.write(f"{os.getpid()} {batch['row']}\n")  # which process scored which row
        return objective.logps(model, batch)

    got = reference_logps(ctx, recording_logps, batches)

    scored = [line.split() for line in Path(log).read_text().splitlines()]
    assert sorted(int(row) for _, row in scored) == list(range(len(batches)))  # every row, once
    assert len({pid for pid, _ in scored}) == 2  # by both workers
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    with torch.no_grad():
        for batch, (chosen, rejected) in zip(batches, got):
            want_c, want_r = objective.logps(model, batch)
            assert torch.allclose(chosen, want_c, atol=1e-5) and torch.allclose(rejected, want_r, atol=1e-5)
    # Released: no reference actor left, and the reference placement group removed.
    assert not [a for a in ray.util.list_named_actors(all_namespaces=True) if "reference" in str(a)]
    groups = [g for g in placement_group_table().values() if g.get("name") == "dpo-test-reference-pg"]
    assert groups and all(g["state"] == "REMOVED" for g in groups)


@pytest.mark.slow
def test_a_dpo_stage_with_two_reference_workers_trains_on_their_log_probs(ray_cluster, tmp_path):
    """The stage end to end: the reference role alone first (two workers), then the trainers."""
    from rayalign.testing import run_stage

    run = run_stage("dpo", {"epochs": 1, "max_length": 128, "bf16": False, "lr": 1e-4}, tmp_path=tmp_path,
                    resources={"reference": {"num_workers": 2}})
    cached = torch.load(run.dir / "reference_logps.pt")
    rows = run.metrics["train_pairs"] + run.metrics["eval_pairs"]
    assert sum(len(chosen) for chosen, _ in cached) == rows  # every pair's reference log-prob, once
    assert all(torch.isfinite(c).all() and torch.isfinite(r).all() for c, r in cached)
    assert run.metrics["reward_accuracy"] > run.metrics["reward_accuracy_before"]  # trained against them
