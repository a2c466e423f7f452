"""The RL stage's colocated memory plan: which models share the trainer's GPU, sized from their
config.json files and the stage's settings (``rayalign.colocated_memory`` does the sums)."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

from rayalign.colocated_memory import ColocatedPlan, ColocatedSetup, plan_colocated, refusal
from rayalign.errors import ConfigError
from rayalign.memory import ModelShape, gpu_memory_gib, plan_for_stage


def _local(path: str | None) -> bool:
    return path is not None and (Path(path).expanduser() / "config.json").exists()


def colocated_plan(run, cfg, model: str, reward_model: str | None, where: str,
                   log: logging.Logger | None = None) -> ColocatedPlan | None:
    """The plan for an RL stage whose roles share the trainer's GPUs, or None when there is none
    to make (roles on GPUs of their own or on CPU, the GPU's memory unknown, a hub model id).
    ``reward_model``: its directory, or a name an earlier stage has not produced yet (its shape is
    then taken to be the policy's: reward models start from the same base). Raises ``ConfigError``
    with the numbers when no plan fits."""
    res = run.resources
    if not res.colocated or not _local(model):
        return None
    capacity = gpu_memory_gib()
    if capacity is None:
        if log:
            log.info("colocated memory plan skipped: GPU memory unknown here; set RAYALIGN_GPU_MEMORY_GIB to check it")
        return None
    policy = ModelShape.from_dir(Path(model).expanduser())
    reward = None
    if reward_model is not None:
        reward = ModelShape.from_dir(Path(reward_model).expanduser()) if _local(reward_model) else policy
    setup = ColocatedSetup(
        policy=policy,
        # The RL passes run the output head on answer tokens only, a chunk at a time, unless
        # the stage asks for full logits (rayalign_rl.objectives).
        training=replace(plan_for_stage(cfg, run, capacity), vllm_fraction=0.0,
                         logits="full" if cfg.logits == "full" else "labelled"),
        engine_fraction=res.rollout.gpu_memory_utilization,
        max_model_len=res.rollout.max_model_len,
        reference=policy if cfg.kl_coef > 0 else None,
        critic=(reward or policy) if cfg.needs_critic else None,
        reward=reward,
        export_whole_model=res.weight_sync_transport == "cuda_ipc",
        bucket_bytes=cfg.sync_bucket_mb << 20,
    )
    plan = plan_colocated(setup, res.colocate_offload_optimizer, res.rollout.enforce_eager, res.colocate_sleep)
    if not plan.fits:
        raise ConfigError(where, refusal(plan, where))
    return plan


def with_cuda_graphs(plan: ColocatedPlan) -> ColocatedPlan:
    """The same plan with CUDA graphs on (to say how far from fitting it was)."""
    return plan_colocated(plan.setup, plan.offload_optimizer, enforce_eager=False, sleep=plan.sleep_level != 0)
