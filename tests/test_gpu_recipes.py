"""The RL recipe on GPUs, as users run it, end to end on GPUs.

* one GPU: trainer, reference, reward model and vLLM colocated (the engine sleeps while the
  trainers work; weights reach it by CUDA IPC);
* two GPUs: trainer and rollout apart (weights by NCCL).

CI is CPU-only and skips these. On the GPU machine: ``pytest -m gpu tests/test_gpu_recipes.py``
after the stack is installed (shared/gpu/README.md); docs/performance.md records when they last
passed and where.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO

pytestmark = [pytest.mark.gpu, pytest.mark.slow]
GPUS = torch.cuda.device_count()


def run_recipe(out, *overrides: str, visible: str) -> dict:
    env = {**os.environ, "RAY_ADDRESS": "local", "CUDA_VISIBLE_DEVICES": visible}
    proc = subprocess.run([sys.executable, str(REPO / "recipes" / "sft_then_grpo.py"), f"output_dir={out}", *overrides],
                          capture_output=True, text=True, timeout=1800, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    return {s["stage"]: s["metrics"] for s in summary["stages"]}


def check_rl(grpo: dict, transport: str) -> None:
    assert grpo["sync_transport"] == transport
    assert grpo["eval_reward"] > grpo["eval_reward_before"]
    assert grpo["stale_rollouts"] == 0
    for m in grpo["history"]:
        assert abs(m["sampler_ratio_mean"] - 1) < 1e-2  # the engine samples from the synced policy


@pytest.mark.skipif(GPUS < 1, reason="needs a GPU: CI is CPU-only (run on the GPU machine, docs/performance.md)")
def test_sft_reward_model_grpo_colocated_on_one_gpu(tmp_path):
    stages = run_recipe(tmp_path / "run", "resources.trainer.num_gpus=1", "resources.colocate=true",
                        "resources.rollout.gpu_memory_utilization=0.3", visible="0")
    assert list(stages) == ["sft", "reward_model", "grpo"]
    check_rl(stages["grpo"], "cuda_ipc")


@pytest.mark.skipif(GPUS < 2, reason="needs two GPUs: CI is CPU-only (run on nvidia-h200-x2, docs/performance.md)")
def test_sft_reward_model_grpo_with_trainer_and_rollout_on_separate_gpus(tmp_path):
    stages = run_recipe(tmp_path / "run", "resources.trainer.num_gpus=1", "resources.rollout.num_gpus=1",
                        "resources.rollout.gpu_memory_utilization=0.3", "sft.epochs=4", visible="0,1")
    check_rl(stages["grpo"], "nccl")
