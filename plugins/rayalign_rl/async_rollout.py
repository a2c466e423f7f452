"""Asynchronous rollouts (``async_rollout: {max_staleness: K}``): the engines sample the answers of
step t+1 while the trainers score and train on step t.

The schedule, as ``RLLoop.step`` drives it through ``Prefetch``:

1. take step t's batch: the one generated ahead during step t-1 (or, at the first step and after a
   restore, one generated now), then at once start generating step t+1's on the engines;
2. score and train on step t while step t+1 generates;
3. before the weight sync, wait for that generation to finish: an engine cannot take new weights
   in the middle of a ``generate_batch`` (its actor runs two calls at once), so the sync always
   falls between two generation calls; then the sync loads version t+1 as in the synchronous loop.

So step t+1's answers were sampled with the weights of version t and are trained on when the
policy is at version t+1: one version behind. ``max_staleness`` (K) is how far behind an answer
may be: answers sampled more than K versions before the policy's (or after it) are dropped with
their whole group and counted (``async/dropped_stale``, and in ``stale``). One generation is in
flight at a time, so this schedule keeps one batch ahead and its answers are one version old; a K
above 1 only widens what is accepted.

The gap between the sampler and the policy is corrected with truncated importance sampling (Yao
et al. 2025, "Your efficient RL framework secretly brings you off-policy RL training"): each answer
token's advantage is multiplied by ``min(pi_old / pi_sampler, tis_cap)``, where ``pi_old`` is the
trainer's probability of the token before the update (its T=1 log-prob, ``raw_logps``) and
``pi_sampler`` the engine's (vLLM's log-probs, also at T=1). The policy losses' surrogates are
linear in the advantage, so this weighs each token's term of the loss, whatever the policy loss.
The share of tokens whose ratio exceeded the cap is reported each step (``async/tis_clipped_fraction``).

``max_staleness: 0`` (or no ``async_rollout``) is the synchronous loop, unchanged. Colocated
engines cannot generate while the trainer holds the GPU, so ``async_rollout`` needs the engines on
GPUs of their own (``check_async`` refuses ``resources.colocate``). After a restore no batch is
ahead: the first step generates its own, and the schedule resumes from there.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from rayalign.errors import ConfigError
from rayalign.rollout.sharding import ShardedGeneration, collect_sharded, submit_sharded
from rayalign_rl.episodes import current_episodes


class AsyncRollout(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_staleness: int = Field(1, ge=0, description="how many weight versions behind the policy a sampled answer "
                               "may be; older ones are dropped and counted (0: the synchronous loop)")
    tis_cap: float = Field(2.0, gt=0, description="truncated importance sampling: each token's weight "
                           "pi_old / pi_sampler is capped here")


def check_async(cfg, run, where: str) -> None:
    """Refuse what asynchronous rollouts cannot do, before any worker starts."""
    if not (cfg.async_rollout and cfg.async_rollout.max_staleness > 0):
        return
    if run.resources.colocated:
        raise ConfigError(f"{where}.async_rollout", "not with resources.colocate: colocated engines cannot "
                          "generate while the trainer holds the GPU; give the rollout engines GPUs of their own")
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
    """A step's batch generated ahead of its step: its prompts, the calls in flight (None once
    collected) and the completions."""

    step: int
    prompts: list
    started: ShardedGeneration | None
    grouped: list | None = None


class Prefetch:
    """The loop's batches, generated one step ahead (see the module's docstring)."""

    def __init__(self, loop, options: AsyncRollout):
        self.loop, self.options = loop, options
        self.ahead: deque[Ahead] = deque()

    def _start(self, step: int) -> Ahead:
        prompts = self.loop.step_prompts(step)
        return Ahead(step, prompts, submit_sharded(self.loop.engines, [p.ids for p in prompts], self.loop.sampling(step)))

    def _collect(self, batch: Ahead) -> None:
        if batch.started is not None:
            batch.grouped = collect_sharded(self.loop.engines, batch.started, self.loop.timeouts.step_s)
            batch.started = None

    def take(self, step: int) -> tuple[list, list, int, dict[str, float]]:
        """Step ``step``'s prompts, its episodes sampled within ``max_staleness`` versions of the
        policy's, the answers dropped as stale, and the step's ``async/`` metrics; step ``step + 1``
        starts generating before this returns."""
        loop, k = self.loop, self.options.max_staleness
        while self.ahead and self.ahead[0].step < step:  # not expected: the steps come in order
            self._collect(self.ahead.popleft())
        prefetched = bool(self.ahead) and self.ahead[0].step == step
        batch = self.ahead.popleft() if prefetched else self._start(step)
        self._collect(batch)
        if step + 1 < loop.cfg.steps and not self.ahead:
            self.ahead.append(self._start(step + 1))
        version = loop.sync.version
        episodes, stale = current_episodes([p.ids for p in batch.prompts], batch.grouped, version, k)
        loop.decode(episodes)
        lag = [version - e.weights_version for e in episodes]
        return batch.prompts, episodes, stale, {
            "async/dropped_stale": float(stale), "async/prefetched": float(prefetched),
            "async/staleness_mean": float(np.mean(lag)) if lag else float("nan")}

    def correct(self, episodes) -> dict[str, float]:
        """Truncated importance sampling of the step's advantages (``apply_tis``)."""
        return apply_tis(episodes, self.options.tis_cap)

    def finish_generation(self) -> float:
        """Wait for the generation running ahead, so a weight sync may follow; the seconds waited."""
        clock = time.monotonic()
        for batch in self.ahead:
            self._collect(batch)
        return time.monotonic() - clock



def prefetch_for(loop) -> Prefetch | None:
    """The loop's ``Prefetch`` when its config asks for asynchronous rollouts (``max_staleness`` of
    at least 1); None keeps the synchronous loop."""
    options = loop.cfg.async_rollout
    return Prefetch(loop, options) if options is not None and options.max_staleness > 0 else None
