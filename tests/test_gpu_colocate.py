"""One GPU shared by a DeepSpeed trainer and a sleeping vLLM engine (single-GPU machines).

Needs a GPU: the CPU build of vLLM has no sleep mode (host RAM is not what a trainer lacks).
"""

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: vLLM's sleep mode is CUDA-only")]


def test_trainer_and_sleeping_vllm_share_one_gpu(tiny_model_path, tokenizer):
    import ray

    from rayalign.cluster.runtime import Cluster
    from rayalign.cluster.worker_group import WorkerGroup
    from rayalign.config import ResourcesConfig, RoleResources, RolloutResources
    from rayalign.data.chat import tokenize_conversation, tokenize_prompt
    from rayalign.data.packing import collate_packed
    from rayalign.data.synthetic import SyntheticWorld
    from rayalign.rollout.vllm_engine import EngineConfig, Sampling
    from rayalign.training.loop import to_numpy
    from rayalign.workers.rollout import RolloutWorker
    from rayalign.workers.trainer import TrainerWorker, TrainSpec
    from rayalign_sft.loss import CrossEntropyLoss
    from rayalign_sft.stage import SFTObjective

    ray.init(num_cpus=4, num_gpus=1, include_dashboard=False)
    try:
        resources = ResourcesConfig(
            trainer=RoleResources(num_gpus=1),
            rollout=RolloutResources(num_gpus=1, gpu_memory_utilization=0.3),
            colocate=True,
        )
        with Cluster(resources).reserve("colocate", ["trainer", "rollout"]) as placement:
            assert placement["trainer"].num_gpus == placement["rollout"].num_gpus == 0.5
            engine = EngineConfig(model=tiny_model_path, gpu_memory_utilization=0.3, enable_sleep_mode=True)
            rollout = WorkerGroup("colocate/rollout", RolloutWorker, placement["rollout"], lambda r: (engine, 1))
            trainer = WorkerGroup("colocate/trainer", TrainerWorker, placement["trainer"], lambda r: (r, 1, 1))
            prompt = tokenize_prompt(tokenizer, [{"role": "user", "content": "Where does Bob live?"}])
            greedy = Sampling(temperature=0.0, max_tokens=8, logprobs=True)
            first = rollout.run(lambda a, r: a.generate.remote([prompt], greedy), 600)[0][0]

            awake_free = rollout.run(lambda a, r: a.device_memory.remote(), 60)[0][0]
            rollout.run(lambda a, r: a.sleep.remote(), 120)
            asleep_free = rollout.run(lambda a, r: a.device_memory.remote(), 60)[0][0]
            assert asleep_free > awake_free + 512 * 2**20  # the KV cache and weights left the GPU

            world = SyntheticWorld(0)
            seqs = [tokenize_conversation(tokenizer, e["messages"], 256) for e in world.chat_examples()[:16]]
            batches = [to_numpy(collate_packed(seqs[i : i + 4])) for i in range(0, 16, 4)]
            objective = SFTObjective(CrossEntropyLoss())
            master = trainer.run(lambda a, r: a.free_address.remote(), 60)[0]
            spec = TrainSpec(model_path=tiny_model_path, total_steps=4, lr=1e-3, bf16=True)
            trainer.run(lambda a, r: a.setup.remote(master, spec, objective), 600)
            trainer.run(lambda a, r: a.load_batches.remote(batches), 60)
            losses = [trainer.run(lambda a, r: a.train_step.remote([i], [1.0]), 120)[0]["loss"] for i in range(4)]
            assert losses[-1] < losses[0]

            rollout.run(lambda a, r: a.wake_up.remote(), 120)
            again = rollout.run(lambda a, r: a.generate.remote([prompt], greedy), 120)[0][0]
            assert again.token_ids == first.token_ids  # the woken engine kept its weights
            trainer.shutdown()
            rollout.shutdown()
    finally:
        ray.shutdown()
