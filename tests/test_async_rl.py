"""Asynchronous rollouts (``async_rollout``), across real ``RLLoop.step`` calls with recording fakes
for the engines and trainers (``test_colocation_order``'s): the batch of step t+1 is generated
before step t trains, answers carry the version they were sampled under, answers more than
``max_staleness`` versions old are dropped and counted, truncated importance sampling weighs the
advantages, and ``max_staleness: 0`` is the synchronous loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rayalign.config import RunConfig
from rayalign.errors import ConfigError
from rayalign.plugins import get_plugin_manager
from rayalign.rollout.vllm_engine import CompletionBatch
from rayalign_rl.async_rollout import AsyncRollout, apply_tis, prefetch_for, tis_weights
from rayalign_rl.config import GRPOConfig, PPOConfig
from rayalign_rl.episodes import Episode
from rayalign_rl.loop import RewardFn
from rayalign_rl.stage import GRPOStage
from test_colocation_order import FakeEngine, FakeTrainer, make_loop, ray_started  # noqa: F401 (a fixture)

SAMPLER_LOGP, TRAINER_LOGP = -0.5, -0.4  # so each token's importance ratio is exp(0.1)


class SeededEngine(FakeEngine):
    """Answer j to a prompt has 2 + j tokens; the tokens and log-probs follow the sampling seed,
    so each step samples its own answers. ``lag`` stamps answers as sampled that many versions
    before the engine's weights (as an engine behind its sync would)."""

    def __init__(self, logp: float = SAMPLER_LOGP):
        super().__init__()
        self.logp, self.lag, self.seeds = logp, 0, []

    def generate_batch(self, prompts, sampling) -> CompletionBatch:
        self.seeds.append(sampling.seed)
        lengths = [2 + j for _ in prompts for j in range(sampling.n)]
        rng = np.random.default_rng(sampling.seed)
        return CompletionBatch(
            prompt_index=np.repeat(np.arange(len(prompts), dtype=np.int32), sampling.n),
            offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            token_ids=rng.integers(40, 60, sum(lengths)).astype(np.int32),
            logprobs=np.full(sum(lengths), self.logp, dtype=np.float32), finish_reasons=["stop"] * len(lengths),
            texts=None, weights_version=self.version - self.lag)


class LossTrainer(FakeTrainer):
    """Log-probs ``TRAINER_LOGP`` everywhere; a step's loss is a fixed function of the rows it trains
    on (their advantages and old log-probs), so two runs report equal losses only if they trained
    on equal rows."""

    def compute(self, fn, ids):
        return [tuple(torch.full((1, self.batches[i]["input_ids"].shape[1] - 1), TRAINER_LOGP) for _ in range(3))
                for i in ids]

    def train_step(self, indices, scales):
        loss = sum(s * float((self.batches[i]["advantages"] * (1 + self.batches[i]["input_ids"] % 7)).sum())
                   for i, s in zip(indices, scales))
        return {"loss": loss, "count": 1.0, "grad_norm": 0.5, "lr": 1e-6, "skipped": 0.0}


def by_length(prompt, completion, reference=None):
    return float(len(completion))


def async_loop(tmp_path, tokenizer, engine_logp=SAMPLER_LOGP, **async_rollout):
    tmp_path.mkdir(parents=True, exist_ok=True)
    loop, log = make_loop(tmp_path, tokenizer, colocated=False, offload=False)
    update = {"steps": 4, "prompts_per_step": 2, "ppo_epochs": 2}
    if async_rollout:
        update["async_rollout"] = AsyncRollout(**async_rollout)
    loop.cfg = loop.cfg.model_copy(update=update)
    loop.engines.obj, loop.policy.obj = SeededEngine(engine_logp), LossTrainer()
    loop.rewards = [RewardFn("length", 1.0, by_length, {})]
    loop.prefetch = prefetch_for(loop)  # as RLLoop._start does
    return loop, log


def run_steps(loop, n: int) -> list[dict]:
    return [loop.step(s) for s in range(n)]


def losses(history: list[dict]) -> list[float]:
    return [m["policy/loss"] for m in history]


def test_max_staleness_zero_is_the_synchronous_loop(tmp_path, tokenizer, ray_started):
    sync_loop, _ = async_loop(tmp_path / "sync", tokenizer)
    zero_loop, _ = async_loop(tmp_path / "zero", tokenizer, max_staleness=0)
    assert zero_loop.prefetch is None
    sync, zero = run_steps(sync_loop, 3), run_steps(zero_loop, 3)
    assert np.allclose(losses(sync), losses(zero), atol=1e-6, rtol=0) and len(set(losses(sync))) == 3
    untimed = lambda m: {k: v for k, v in m.items() if not k.startswith("time/")}  # noqa: E731
    assert [untimed(m) for m in sync] == [untimed(m) for m in zero]
    assert not any(k.startswith("async/") for k in zero[0])


def test_ahead_the_batches_are_the_same_and_only_the_sampler_gap_is_weighed(tmp_path, tokenizer, ray_started):
    # With the sampler's log-probs equal to the trainer's, every importance weight is 1: the async
    # loop trains on exactly the synchronous loop's batches (the same prompts and seeds per step).
    sync_loop, _ = async_loop(tmp_path / "sync", tokenizer, engine_logp=TRAINER_LOGP)
    ahead_loop, _ = async_loop(tmp_path / "ahead", tokenizer, engine_logp=TRAINER_LOGP, max_staleness=1)
    sync, ahead = run_steps(sync_loop, 3), run_steps(ahead_loop, 3)
    assert np.allclose(losses(sync), losses(ahead), atol=1e-6, rtol=0)
    assert [m["async/tis_clipped_fraction"] for m in ahead] == [0.0] * 3
    assert sync_loop.engines.obj.seeds == ahead_loop.engines.obj.seeds[:3]
    # A sampler gap of 0.1 per token: each token's advantage weighs exp(0.1), or the cap if lower.
    for cap, weight, clipped in ((2.0, np.exp(0.1), 0.0), (1.05, 1.05, 1.0)):
        loop, _ = async_loop(tmp_path / f"cap{cap}", tokenizer, max_staleness=1, tis_cap=cap)
        metrics = loop.step(0)
        assert metrics["async/tis_clipped_fraction"] == clipped
        assert metrics["async/tis_weight_mean"] == pytest.approx(weight, rel=1e-6)
        assert metrics["policy/loss"] == pytest.approx(sync[0]["policy/loss"] * weight, rel=1e-5)


def test_the_next_batch_generates_before_the_step_trains_and_syncs_between_generations(tmp_path, tokenizer,
                                                                                      ray_started):
    loop, log = async_loop(tmp_path, tokenizer, max_staleness=1)
    engine = loop.engines.obj
    first = loop.step(0)
    calls = [(r, m) for r, m, _ in log if m in ("generate_batch", "train_step", "update_weights")]
    # step 0's batch, then step 1's started before step 0 trains; the sync after both
    assert calls[:2] == [("rollout", "generate_batch")] * 2 and calls[-1] == ("rollout", "update_weights")
    assert ("trainer", "train_step") in calls[2:-1] and ("rollout", "generate_batch") not in calls[2:]
    assert engine.seeds == [loop.sampling(0).seed, loop.sampling(1).seed]
    assert first["async/prefetched"] == 0.0 and first["async/staleness_mean"] == 0.0
    log.clear()
    second = loop.step(1)
    # step 1 trains on the batch sampled under version 0 while the policy is at version 1, and
    # starts step 2's generation (under version 1) before it trains
    assert engine.seeds[2:] == [loop.sampling(2).seed]
    assert second["async/prefetched"] == 1.0 and second["async/staleness_mean"] == 1.0
    assert second["async/dropped_stale"] == second["stale"] == 0.0 and second["weights_version"] == 2.0
    assert [m for r, m, _ in log if m in ("generate_batch", "train_step")][0] == "generate_batch"
    import json

    logged = [json.loads(line) for line in loop.rollouts_path.read_text().splitlines()]
    assert {(r["step"], r["weights_version"]) for r in logged} == {(0, 0), (1, 0)}
    loop.step(2)
    loop.step(3)  # the last step starts nothing ahead
    assert len(engine.seeds) == 4 and not loop.prefetch.ahead


def test_answers_older_than_max_staleness_are_dropped_and_counted(tmp_path, tokenizer, ray_started):
    loop, _ = async_loop(tmp_path, tokenizer, max_staleness=1)
    loop.step(0)  # policy at version 1; step 1's batch was sampled under version 0
    loop.engines.obj.lag = 2
    prompts, episodes, stale, metrics = loop.prefetch.take(1)
    assert len(episodes) == 4 and metrics["async/staleness_mean"] == 1.0 and stale == 0
    loop.prefetch.finish_generation()
    loop.sync.sync()  # version 2; step 2's batch is stamped version 1 - 2 = -1: three behind
    prompts, episodes, stale, metrics = loop.prefetch.take(2)
    assert episodes == [] and stale == 4 and metrics["async/dropped_stale"] == 4.0
    wider, _ = async_loop(tmp_path / "wider", tokenizer, max_staleness=3)
    wider.engines.obj.lag = 3
    _, episodes, stale, metrics = wider.prefetch.take(0)
    assert stale == 0 and len(episodes) == 4 and metrics["async/staleness_mean"] == 3.0


def test_truncated_importance_weights_match_the_formula():
    trainer = np.array([-1.0, -0.2, -3.0, -0.5], dtype=np.float32)
    sampler = np.array([-1.5, -0.2, -1.0, -0.1], dtype=np.float32)
    weights, clipped = tis_weights(trainer, sampler, cap=1.5)
    hand = [min(np.exp(t - s), 1.5) for t, s in zip(trainer.tolist(), sampler.tolist())]
    assert np.allclose(weights, hand, rtol=1e-6) and clipped.tolist() == [True, False, False, False]
    episode = Episode(0, [1, 2], [5, 6, 7, 8], "x", "stop", 0, sampler,
                      arrays={"raw_logps": trainer, "advantages": np.full(4, 2.0, dtype=np.float32)})
    no_logps = Episode(0, [1], [5], "y", "stop", 0, np.zeros(0, dtype=np.float32),
                       arrays={"raw_logps": np.zeros(1), "advantages": np.ones(1, dtype=np.float32)})
    metrics = apply_tis([episode, no_logps], cap=1.5)
    assert np.allclose(episode.arrays["advantages"], 2.0 * np.array(hand), rtol=1e-6)
    assert no_logps.arrays["advantages"].tolist() == [1.0]  # no sampler log-probs: weight 1
    assert metrics["async/tis_clipped_fraction"] == 0.25
    assert metrics["async/tis_weight_mean"] == pytest.approx(np.mean(hand))


def test_async_is_refused_with_colocated_engines_dynamic_sampling_and_environments():
    run = RunConfig(resources={"colocate": True, "trainer": {"num_gpus": 1}})
    stage = GRPOStage(GRPOConfig(async_rollout={"max_staleness": 1}))
    with pytest.raises(ConfigError, match=r"stages\[0\]\.grpo\.async_rollout: not with resources\.colocate"):
        stage.prepare(run, get_plugin_manager(), None, 0)
    stage = GRPOStage(GRPOConfig(async_rollout={"max_staleness": 1}, dynamic_sampling=True))
    with pytest.raises(ConfigError, match=r"stages\[0\]\.grpo\.async_rollout: not with dynamic_sampling"):
        stage.prepare(RunConfig(), get_plugin_manager(), None, 0)
    stage = GRPOStage(GRPOConfig(async_rollout={"max_staleness": 1}, environment={"name": "calculator"}))
    with pytest.raises(ConfigError, match=r"stages\[0\]\.grpo\.async_rollout: not with environment"):
        stage.prepare(RunConfig(), get_plugin_manager(), None, 0)
    with pytest.raises(ValueError, match="max_staleness"):
        PPOConfig(async_rollout={"max_staleness": -1})
    with pytest.raises(ValueError, match="tis_cap"):
        PPOConfig(async_rollout={"tis_cap": 0})
