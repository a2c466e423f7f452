"""Who holds the GPU when, for RL actor groups that share the trainer's GPUs (``resources.colocate``).

One step, as the RL loop drives it (``rayalign.colocated_memory`` sums what each phase holds):

1. generate: engines awake; then they sleep at level 2, dropping weights and KV cache (the sync
   at the end of the step reloads every weight, so keeping a copy in host memory is wasted work);
2. score: the trainers' offloaded optimizer states come back (when the plan offloads them); the
   frozen models (reference, reward) return their cached blocks once their passes are done, so
   the policy trains beside their weights only;
3. train, and at its end every colocated process returns its cached CUDA blocks and the
   trainers' optimizer states go to host memory (when offloading). This closes the train phase
   rather than opening the sync: a phase's memory reading starts from what the GPU holds when it
   begins, so a sync that began before the release would read the training peak as its own;
4. sync: the engines wake their weights only, the new weights are loaded, the trainer frees its
   exported copy, and only then do the KV caches wake.
   So engine weights, KV cache and the trainers' training-time blocks never peak together.

On CUDA every phase ends by reading each GPU group's peaks since the previous phase (torch's
reserved bytes per role, and the device's used bytes, which include vLLM's own pool).
When the memory plan has room for the engines' whole share beside everything else
(``sleep_level`` 0), they stay awake: steps 1 and 4 shrink to the weight load, and no process
returns its cached blocks (the frozen models still do after scoring: the plan counts only their
weights while the policy trains).

Apart from the sync and the memory readings, everything here is a no-op when nothing is colocated.
Each operation's seconds are summed per step (``take_seconds``), so a step's cost of sharing the
GPU is measured, not guessed.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict

from rayalign.cluster.worker_group import WorkerGroup
from rayalign.memory import GiB
from rayalign.rollout.weight_sync import SyncStats, WeightSync

STARTUP_SLEEP_LEVEL = 1  # the engines' first weights are the input model's: keep them for the first steps
WEIGHTS, KV_CACHE = ["weights"], ["kv_cache"]


class Colocation:
    def __init__(self, engines: WorkerGroup, trainers: list[WorkerGroup], frozen: list[WorkerGroup],
                 sync: WeightSync, timeout_s: float, *, colocated: bool, offload_optimizer: bool = False,
                 sleep_level: int = 2, gpu_roles: dict[str, WorkerGroup] | None = None):
        self.engines, self.trainers, self.frozen, self.sync = engines, trainers, frozen, sync
        self.timeout_s, self.colocated = timeout_s, colocated
        self.offload = colocated and offload_optimizer
        self.sleep_level = sleep_level
        self.sleeps = colocated and sleep_level > 0  # else the engines stay awake between steps
        self.gpu_roles = gpu_roles or {}  # role name -> group, for the groups with GPUs
        self.seconds: dict[str, float] = defaultdict(float)  # operation -> seconds since take_seconds
        self._given_back = False  # by after_train, for the sync that follows

    @contextlib.contextmanager
    def _timed(self, operation: str):
        started = time.monotonic()
        try:
            yield
        finally:
            self.seconds[operation] += time.monotonic() - started

    def take_seconds(self) -> dict[str, float]:
        """Seconds spent in each sharing operation (sleep, wake, release, offload, reload) since the
        last call, as ``colocation/<operation>_s`` metrics."""
        out = {f"colocation/{op}_s": v for op, v in self.seconds.items()}
        self.seconds.clear()
        return out

    def _each(self, groups: list[WorkerGroup], call) -> None:
        """``call`` on every actor of ``groups`` at once (they are independent processes)."""
        pending = [(g, g.submit(call)) for g in groups]
        for group, refs in pending:
            group.wait(refs, self.timeout_s)

    def _release(self, groups: list[WorkerGroup]) -> None:
        with self._timed("release"):
            self._each(groups, lambda a, r: a.release_memory.remote())

    def _offload(self) -> None:
        if self.offload:
            with self._timed("offload"):
                self._each(self.trainers, lambda a, r: a.offload_states.remote())

    def _reload(self) -> None:
        if self.offload:
            with self._timed("reload"):
                self._each(self.trainers, lambda a, r: a.reload_states.remote())

    def _wake(self, tags: list[str] | None) -> None:
        with self._timed("wake"):
            self.engines.run(lambda a, r: a.wake_up.remote(tags), self.timeout_s)

    def _give_back(self) -> None:
        """Every other colocated process returns its cached blocks, the optimizer states leave."""
        self._release(self.trainers + self.frozen)
        self._offload()

    def wake_all(self) -> None:
        """Engines fully awake (start of the run), after the others gave the GPU back."""
        if self.colocated:
            self._give_back()
            self._wake(None)

    @contextlib.contextmanager
    def states_on_gpu(self):
        """The trainers' optimizer states where DeepSpeed expects them (a checkpoint), then away again."""
        self._reload()
        yield
        self._offload()

    def after_generate(self) -> None:
        if self.sleeps:
            with self._timed("sleep"):
                self.engines.run(lambda a, r: a.sleep.remote(self.sleep_level), self.timeout_s)

    def before_score(self) -> None:
        self._reload()

    def after_score(self) -> None:
        if self.colocated:
            self._release(self.frozen)

    def after_train(self) -> None:
        """The GPU back from training for the sync's wake, still inside the train phase (step 3)."""
        if self.sleeps:
            self._give_back()
            self._given_back = True

    def sync_weights(self, version: int | None = None) -> SyncStats:
        """The trained weights into the engines as ``version`` (``WeightSync.sync``), waking them in
        two steps when colocated (after the others gave the GPU back, here if ``after_train`` did
        not: a sync outside a step, as after a restore)."""
        if not self.sleeps:
            return self.sync.sync(version)
        if not self._given_back:
            self._give_back()
        self._given_back = False
        self._wake(WEIGHTS)
        stats = self.sync.sync(version)
        self._release(self.trainers[:1])  # the policy's exported copy of its weights
        self._wake(KV_CACHE)
        return stats

    def phase_memory(self, phase: str) -> dict[str, float]:
        """Peak GiB since the previous phase: torch's reserved bytes per GPU role (largest rank), and
        the device's used bytes (largest GPU). Empty when no role has a GPU."""
        if not self.gpu_roles:
            return {}
        pending = {role: (g, g.submit(lambda a, r: a.memory_peaks.remote())) for role, g in self.gpu_roles.items()}
        out, device = {}, 0.0
        for role, (group, refs) in pending.items():
            peaks = [p for p in group.wait(refs, self.timeout_s) if p]
            if not peaks:
                continue
            out[f"memory/{phase}/{role}_reserved_gib"] = max(p["reserved"] for p in peaks) / GiB
            device = max([device] + [p.get("device_used", 0.0) for p in peaks])
        if out:
            out[f"memory/{phase}/device_gib"] = device / GiB
        return out
