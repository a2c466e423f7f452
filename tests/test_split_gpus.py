"""``resources.split_gpus``: the trainer and the rollout engines split the trainer's GPUs by memory,
both awake (asynchronous RL on one GPU). The bundle layout is pure; the Ray test reserves the
placement on a cluster that declares one (logical) GPU and reads which GPU each actor was given."""

from __future__ import annotations

import sys

import pytest
import ray

from rayalign.cluster.runtime import Cluster
from rayalign.cluster.worker_group import WorkerGroup
from rayalign.config import ResourcesConfig, load_config
from rayalign.errors import ConfigError
from rayalign.workers.base import Worker

ONE_GPU = {"split_gpus": True, "trainer": {"num_gpus": 1, "num_cpus": 2},
           "rollout": {"num_gpus": 1, "num_cpus": 1, "gpu_memory_utilization": 0.35},
           "reference": {"num_gpus": 1}}


def test_trainer_and_engine_share_each_trainer_bundle_and_other_roles_keep_their_own():
    cluster = Cluster(ResourcesConfig.model_validate(ONE_GPU))
    bundles, selectors, placements = cluster._bundles([cluster.role("trainer"), cluster.role("rollout"),
                                                       cluster.role("reference")])
    # One GPU bundle for the trainer rank and its engine, half each in Ray's books; the reference
    # (not split) gets a GPU of its own.
    assert bundles == [{"GPU": 1, "CPU": 3}, {"CPU": 1, "GPU": 1}]
    assert placements["trainer"].bundles == placements["rollout"].bundles == [0]
    assert placements["trainer"].num_gpus == placements["rollout"].num_gpus == 0.5
    assert placements["reference"].bundles == [1] and placements["reference"].num_gpus == 1
    assert selectors == [{}, {}]


def test_split_gpus_syncs_through_cuda_ipc_and_means_nothing_without_trainer_gpus():
    split = ResourcesConfig.model_validate(ONE_GPU)
    assert split.split and not split.colocated and split.weight_sync_transport == "cuda_ipc"
    own = ResourcesConfig.model_validate({**ONE_GPU, "split_gpus": False})
    assert own.weight_sync_transport == "nccl"  # engines on GPUs of their own
    cpu = ResourcesConfig.model_validate({"split_gpus": True})
    assert not cpu.split and cpu.weight_sync_transport == "object_store"
    cluster = Cluster(cpu)
    bundles, _, placements = cluster._bundles([cluster.role("trainer"), cluster.role("rollout")])
    assert bundles == [{"CPU": 1}, {"CPU": 1}] and placements["rollout"].num_gpus == 0


def test_split_gpus_refuses_colocate_and_engines_that_do_not_match_the_trainer_ranks():
    with pytest.raises(ConfigError, match=r"resources: split_gpus and colocate both share"):
        load_config(None, ["resources.split_gpus=true", "resources.colocate=true"])
    with pytest.raises(ConfigError, match=r"resources: split_gpus puts one engine on each trainer rank's GPU"):
        load_config(None, ["resources.split_gpus=true", "resources.trainer.num_gpus=1",
                           "resources.trainer.num_workers=2"])


def test_the_trainers_memory_check_leaves_the_engines_share_out(tiny_model_path, monkeypatch):
    import logging

    from rayalign.config import RunConfig
    from rayalign.memory import check_training_memory

    monkeypatch.setenv("RAYALIGN_GPU_MEMORY_GIB", "80")
    split = RunConfig.model_validate({"model": tiny_model_path, "resources": ONE_GPU, "stages": [{"grpo": {}}]})
    apart = RunConfig.model_validate({**split.model_dump(), "resources": {**ONE_GPU, "split_gpus": False}})
    from rayalign.config import validate_stages
    from rayalign.plugins import get_plugin_manager

    estimates = {}
    for name, run in (("split", split), ("apart", apart)):
        entries = validate_stages(run, get_plugin_manager().stages, "")
        estimates[name] = check_training_memory(run, entries, tiny_model_path, logging.getLogger("rayalign"))[0]
    assert estimates["apart"].capacity == 80 * 2**30
    assert estimates["split"].capacity == pytest.approx(80 * 2**30 * (1 - 0.35))


class WhichGpu(Worker):
    def gpu_ids(self) -> list:
        return [str(g) for g in ray.get_gpu_ids()]


def test_the_trainer_and_its_engine_land_on_the_same_gpu():
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/
    ray.init(num_cpus=4, num_gpus=1, include_dashboard=False, namespace="rayalign-testing", log_to_driver=False)
    try:
        with Cluster(ResourcesConfig.model_validate(ONE_GPU)).reserve("split", ["trainer", "rollout"]) as placement:
            groups = [WorkerGroup(f"split/{role}", WhichGpu, placement[role], lambda r: (1,))
                      for role in ("trainer", "rollout")]
            try:
                trainer, engine = (g.run(lambda a, r: a.gpu_ids.remote(), 60)[0] for g in groups)
            finally:
                for g in groups:
                    g.shutdown()
        assert trainer == engine == ["0"]  # both in the cluster's one GPU, each with half of it
    finally:
        ray.shutdown()
