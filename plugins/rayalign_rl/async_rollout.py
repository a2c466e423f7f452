"""Asynchronous rollouts (``async: {max_staleness: K}``, also spelt ``async_rollout:``): the engines
generate the batches of the next steps, up to K ahead, while the trainers score and train.

Versions. The policy's version is the number of updates it took: one per step, so step t trains
at version t and ends at t + 1. Each weight sync loads the policy into the engines under its own
version (syncs may skip versions), and every answer carries the version the engines held when
its generation started (``weights_version``). An answer of step t sampled under version v is
``t - v`` versions stale; K is the most allowed.

The schedule (``Prefetch``, driven by ``RLLoop.step``). An engine takes new weights only between
two ``generate_batch`` calls (its actor would run a sync beside a running generation), so one
generation runs at a time and the driver looks at the engines several times a step: as it takes
the step's batch, once it has it, before the update, between its optimizer steps and after it.
Whenever it finds them idle (``advance``):

1. if the engines are behind the policy and the trainer's weights are a whole version (never
   during the update), sync them now; otherwise the sync waits, and the trainer goes on with the
   batches already generated: a *deferred* sync (``async/sync_deferred``), done at the first
   moment the engines are idle;
2. start the next batch, step j, if ``j <= t + K`` (at most K batches ahead of the step being
   trained) and ``j - v <= K`` with v the engines' version now: it will be trained on within K
   versions of the weights it is sampled with. A batch that would be too stale is not generated
   (no wasted work); it starts after the next sync.

The trainer waits on the engines only for its own step's batch (``async/wait_s``) and for a sync
it finds the engines idle for. With generation faster than training the queue fills: step t+K is
sampled under version t and trained K versions stale, so K > 1 buys slack for uneven batches at
the price of staler answers. With generation slower, the engines never idle and each step waits
on its batch, syncing in between. Which syncs are deferred, and so each batch's exact staleness,
depends on timing; that it stays within K does not. K = 1 keeps one batch ahead, sampled one
version behind.

Answers sampled more than K versions before the policy's (or after it) are still dropped with
their whole group and counted (``async/dropped_stale``, and ``stale``): the schedule never starts
such a batch, so this catches only an engine whose version is not what it was asked to hold.
Each step also reports ``async/staleness_mean`` and ``_max`` (over its answers),
``async/batch_version`` (the engines' version when its generation started), ``async/prefetched``
(started during an earlier step), ``async/syncs`` (done during the step) and ``async/ahead``
(batches started for later steps at its end).

The gap between the sampler and the policy is corrected with truncated importance sampling (Yao
et al. 2025, "Your efficient RL framework secretly brings you off-policy RL training"): each answer
token's advantage is multiplied by ``min(pi_old / pi_sampler, tis_cap)``, where ``pi_old`` is the
trainer's probability of the token before the update (its T=1 log-prob, ``raw_logps``) and
``pi_sampler`` the engine's (vLLM's log-probs, also at T=1). The policy losses' surrogates are
linear in the advantage, so this weighs each token's term of the loss, whatever the policy loss.
The share of tokens whose ratio exceeded the cap is reported each step (``async/tis_clipped_fraction``).

``max_staleness: 0`` (or no ``async``) is the synchronous loop, unchanged. The engines must be able
to generate while the trainer works: on GPUs of their own, or beside the trainer on its GPU with
``resources.split_gpus`` (each in its share of memory); ``resources.colocate`` sleeps them while
the trainer holds the GPU, so ``check_async`` refuses it. A held-out evaluation first waits for the
generation in flight and syncs (it must sample the policy being trained). A checkpoint records the
policy's version; after a restore no batch is ahead: the first step generates its own under the
restored weights, and the schedule resumes from there.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from rayalign.errors import ConfigError
from rayalign.rollout.sharding import ShardedGeneration, collect_sharded, submit_sharded
from rayalign.rollout.weight_sync import SyncStats
from rayalign_rl.episodes import current_episodes


class AsyncRollout(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_staleness: int = Field(1, ge=0, description="how many weight versions behind the policy a sampled answer "
                               "may be, and so how many steps ahead the engines may generate (0: the synchronous "
                               "loop)")
    tis_cap: float = Field(2.0, gt=0, description="truncated importance sampling: each token's weight "
                           "pi_old / pi_sampler is capped here")


def check_async(cfg, run, where: str) -> None:
    """Refuse what asynchronous rollouts cannot do, before any worker starts."""
    if not (cfg.async_rollout and cfg.async_rollout.max_staleness > 0):
        return
    if run.resources.colocated:
        raise ConfigError(f"{where}.async_rollout", "not with resources.colocate: colocated engines cannot "
                          "generate while the trainer holds the GPU; give the rollout engines GPUs of their own, or "
                          "split the trainer's with resources.split_gpus")
    if cfg.dynamic_sampling:
        raise ConfigError(f"{where}.async_rollout", "not with dynamic_sampling: its rounds score each batch "
                          "before sampling the next, so no batch can be generated ahead")
    if cfg.environment is not None:
        raise ConfigError(f"{where}.async_rollout", "not with environment: a multi-turn episode waits on its "
                          "environment between turns, and the batch generated ahead is single-turn")


def tis_weights(trainer_logps: np.ndarray, sampler_logps: np.ndarray, cap: float) -> tuple[np.ndarray, np.ndarray]:
    """Per token, ``min(exp(trainer - sampler), cap)`` and whether the cap acted."""
    ratio = np.exp(trainer_logps.astype(np.float64) - sampler_logps.astype(np.float64))
    return np.minimum(ratio, cap).astype(np.float32), ratio > cap


def apply_tis(episodes, cap: float) -> dict[str, float]:
    """Weigh each answer token's advantage by its truncated importance weight (``tis_weights`` of the
    trainer's ``raw_logps`` against the engine's log-probs); an answer without the engine's
    log-probs keeps weight 1. Returns the step's ``async/tis_*`` metrics."""
    weights, clipped = [], []
    for e in episodes:
        if e.vllm_logps.size != len(e.completion_ids):
            continue
        w, c = tis_weights(e.arrays["raw_logps"], e.vllm_logps, cap)
        e.arrays["advantages"] = e.arrays["advantages"] * w
        weights.append(w)
        clipped.append(c)
    if not weights:
        return {"async/tis_clipped_fraction": float("nan"), "async/tis_weight_mean": float("nan")}
    return {"async/tis_clipped_fraction": float(np.mean(np.concatenate(clipped))),
            "async/tis_weight_mean": float(np.mean(np.concatenate(weights)))}


@dataclass
class Ahead:
    """A step's batch generated ahead of its step: its prompts, the weights version the engines held
    when its generation started (what its answers carry), the calls in flight (None once
    collected) and the completions."""

    step: int
    prompts: list
    version: int
    started: ShardedGeneration | None
    grouped: list | None = None


class Prefetch:
    """The loop's batches, generated up to ``max_staleness`` steps ahead (see the module's docstring)."""

    def __init__(self, loop, options: AsyncRollout):
        self.loop, self.options = loop, options
        self.ahead: deque[Ahead] = deque()  # started batches in step order; only the last may be generating
        self.policy = 0  # the trainer's weights version: the updates it took, one per step
        self.started = -1  # the last step whose batch was started
        self.synced: list[SyncStats] = []  # the syncs of the step under way (finish_step reports them)
        self.seconds = {"wait": 0.0, "sync": 0.0}

    @property
    def k(self) -> int:
        return self.options.max_staleness

    def _generating(self) -> Ahead | None:
        return self.ahead[-1] if self.ahead and self.ahead[-1].started is not None else None

    def _start(self, step: int) -> None:
        prompts = self.loop.step_prompts(step)
        self.started = step
        self.ahead.append(Ahead(step, prompts, self.loop.sync.version, submit_sharded(
            self.loop.engines, [p.ids for p in prompts], self.loop.sampling(step))))

    def _collect(self, batch: Ahead) -> None:
        if batch.started is not None:
            batch.grouped = collect_sharded(self.loop.engines, batch.started, self.loop.timeouts.step_s)
            batch.started = None

    def _idle(self) -> bool:
        """Whether the engines are between generations (a generation that has finished is collected)."""
        batch = self._generating()
        if batch is not None and self.loop.engines.ready(batch.started.refs):
            self._collect(batch)
        return self._generating() is None

    def _sync(self) -> None:
        clock = time.monotonic()
        self.synced.append(self.loop.gpu.sync_weights(self.policy))
        self.seconds["sync"] += time.monotonic() - clock

    def advance(self, sync: bool = True) -> None:
        """If the engines are idle: give them the policy's weights when they lack them (``sync``: only
        where the trainer's weights are a whole version, between steps), then start the next batch
        if it is at most ``max_staleness`` steps ahead of the policy and would be trained on within
        ``max_staleness`` versions of the weights it is sampled with."""
        if not self._idle():
            return
        if sync and self.loop.sync.version < self.policy:
            self._sync()
        step = max(self.started + 1, self.policy)
        if step < self.loop.cfg.steps and step <= self.policy + self.k and step - self.loop.sync.version <= self.k:
            self._start(step)

    def take(self, step: int) -> tuple[list, list, int, dict[str, float]]:
        """Step ``step``'s prompts, its episodes sampled within ``max_staleness`` versions of the
        policy's, the answers dropped as stale, and the step's ``async/`` metrics; the next batch
        starts generating before this returns when the engines are free."""
        loop = self.loop
        self.policy = step
        while self.ahead and self.ahead[0].step < step:  # not expected: the steps come in order
            self._collect(self.ahead.popleft())
        prefetched = bool(self.ahead)  # started during an earlier step (none at the first, or after a restore)
        self.advance()
        if not self.ahead or self.ahead[0].step != step:  # advance starts the policy's own step when none is ahead
            raise RuntimeError(f"async rollouts: no batch was started for step {step}")
        clock = time.monotonic()
        batch = self.ahead[0]
        self._collect(batch)
        self.seconds["wait"] += time.monotonic() - clock
        self.ahead.popleft()
        self.advance()  # the engines are free now unless a later batch generates: start it before training
        episodes, stale = current_episodes([p.ids for p in batch.prompts], batch.grouped, step, self.k)
        loop.decode(episodes)
        lag = [step - e.weights_version for e in episodes]
        return batch.prompts, episodes, stale, {
            "async/dropped_stale": float(stale), "async/prefetched": float(prefetched),
            "async/batch_version": float(batch.version),
            "async/staleness_mean": float(np.mean(lag)) if lag else float("nan"),
            "async/staleness_max": float(max(lag)) if lag else float("nan")}

    def correct(self, episodes) -> dict[str, float]:
        """Truncated importance sampling of the step's advantages (``apply_tis``)."""
        return apply_tis(episodes, self.options.tis_cap)

    def finish_step(self, step: int) -> tuple[SyncStats, float, dict[str, float]]:
        """Step ``step`` has updated the policy: sync it now if the engines are idle, else leave the
        sync to the first moment they are (deferred). Returns the step's newest sync (the engines'
        version and no bytes when none happened), the seconds its syncs took, and its remaining
        ``async/`` metrics."""
        self.policy = step + 1
        deferred = not self._idle()
        self.advance()
        synced, self.synced = self.synced, []
        last = synced[-1] if synced else SyncStats(self.loop.sync.version, 0.0, 0, 0, self.loop.sync.transport)
        seconds, self.seconds = self.seconds, {"wait": 0.0, "sync": 0.0}
        return last, seconds["sync"], {
            "async/sync_deferred": float(deferred), "async/syncs": float(len(synced)),
            "async/wait_s": seconds["wait"], "async/ahead": float(len(self.ahead))}

    def settle(self) -> None:
        """Wait for the generation in flight and load the policy's weights: before a held-out
        evaluation, which must sample the policy being trained."""
        self._collect_all()
        if self.loop.sync.version < self.policy:  # between steps: in no step's figures
            self.loop.gpu.sync_weights(self.policy)

    def _collect_all(self) -> None:
        for batch in self.ahead:
            self._collect(batch)


def prefetch_for(loop) -> Prefetch | None:
    """The loop's ``Prefetch`` when its config asks for asynchronous rollouts (``max_staleness`` of
    at least 1); None keeps the synchronous loop."""
    options = loop.cfg.async_rollout
    return Prefetch(loop, options) if options is not None and options.max_staleness > 0 else None
