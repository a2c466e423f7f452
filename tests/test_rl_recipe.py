"""Online RL end to end on CPU: the SFT -> reward model -> GRPO recipe, a PPO stage with a critic,
and the errors a bad RL config gets before any worker starts."""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import types
from collections import Counter

import pytest

from conftest import run_recipe
from rayalign.config import RunConfig
from rayalign.errors import ConfigError
from rayalign.pipeline import run_pipeline
from rayalign.testing import run_stage

ARITHMETIC = {"prompts": "synthetic:arithmetic/prompts"}


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    """The recipe exactly as the README runs it (its default config), once for the module."""
    return run_recipe("sft_then_grpo.py", tmp_path_factory.mktemp("rl") / "run", timeout=2400)


@pytest.mark.slow
@pytest.mark.timeout(2400)  # its setup runs the whole recipe (~6 min on 2 idle cores)
# The recipe's GRPO settings and why they are what they are: docs/rl.md.
def test_rl_raises_the_held_out_reward(recipe):
    out, stages, stdout = recipe
    assert list(stages) == ["sft", "reward_model", "grpo"]
    grpo = stages["grpo"]["metrics"]
    print(f"held-out reward {grpo['eval_reward_before']:.3f} -> {grpo['eval_reward']:.3f}; "
          f"exact match {grpo['evals'][0]['exact_match']:.3f} -> {grpo['evals'][-1]['exact_match']:.3f}")
    assert grpo["eval_reward"] > grpo["eval_reward_before"]
    # Exact match counts 84 held-out answers: it rose on earlier CI hosts, and stayed at 8 of 84 on
    # one 2-core host on 2026-12-03 while the reward rose (docs/rl.md). It must not fall.
    assert grpo["evals"][-1]["exact_match"] >= grpo["evals"][0]["exact_match"]
    assert "=== results ===" in stdout and "eval_reward=" in stdout


@pytest.mark.slow
@pytest.mark.timeout(2400)  # includes the module's recipe run
def test_rl_reports_what_operators_watch(recipe):
    out, stages, _ = recipe
    grpo = stages["grpo"]["metrics"]
    assert grpo["steps"] == len(grpo["history"]) > 0
    for m in grpo["history"]:
        for key in ("reward", "kl", "entropy", "response_length", "time/generate_share", "time/train_share",
                    "time/sync_share", "policy/clip_fraction", "reward/exact_match", "reward/reward_model"):
            assert key in m and math.isfinite(m[key]), key
        assert m["stale"] == 0
        # Synced weights are the trained weights: the trainer's log-probs of vLLM's samples match
        # vLLM's own (fp32 on both sides), so the importance ratio is 1.
        assert m["sampler_logprob_diff"] < 1e-3 and abs(m["sampler_ratio_mean"] - 1) < 1e-3
    assert [m["weights_version"] for m in grpo["history"]] == list(range(1, grpo["steps"] + 1))
    assert set(grpo["time_share"]) == {"generate", "score", "train", "sync"}  # rewards overlap the log-probs
    assert grpo["sync_transport"] == "object_store"  # CPU
    assert abs(sum(grpo["time_share"].values()) - 1) < 1e-6
    rollouts = [json.loads(line) for line in (out / "02-grpo" / "rollouts.jsonl").read_text().splitlines()]
    assert {r["weights_version"] for r in rollouts} == set(range(grpo["steps"]))  # sampled before each sync
    assert all(r["step"] == r["weights_version"] for r in rollouts)
    # The reward model went to the RL stage by name; the policy stayed the SFT model until RL.
    assert stages["reward_model"]["models"]["reward_model"].endswith("01-reward_model/model")
    assert stages["reward_model"]["model"] is None
    assert stages["grpo"]["input_model"].endswith("00-sft/model")


@pytest.mark.slow
def test_ppo_with_a_critic_runs(tmp_path):
    from rayalign.embedded import embedded_model_path

    run = run_stage("ppo", {"steps": 2, "prompts_per_step": 4, "max_new_tokens": 16, "eval_every": 2,
                            "eval_prompts": 4, "rewards": [{"name": "format_check"}, {"name": "length_penalty",
                                                                                       "options": {"max_chars": 20}}]},
                    tmp_path=tmp_path, model=str(embedded_model_path(0, "arithmetic")), data=ARITHMETIC,
                    resources={"trainer": {"num_cpus": 0.5}, "critic": {"num_cpus": 0.5},
                               "reference": {"num_cpus": 0.5}, "rollout": {"num_cpus": 0.5, "dtype": "float32"}})
    history = run.metrics["history"]
    assert len(history) == 2
    for m in history:
        assert math.isfinite(m["critic/value_loss"]) and math.isfinite(m["policy/policy_loss"])
        assert m["kl"] == m["kl"]  # KL to the reference is computed (in the reward, for PPO)
    assert (run.dir / "model" / "config.json").exists()


def _config(stage: str, options: dict, out) -> RunConfig:
    return RunConfig.model_validate({"model": "embedded:arithmetic", "data": ARITHMETIC, "output_dir": str(out),
                                     "stages": [{stage: options}]})


@pytest.mark.parametrize("stage, options, key, words", [
    ("grpo", {"num_generations": 1}, "stages[0].grpo.num_generations", "greater than or equal to 2"),
    ("ppo", {"advantage": "rloo"}, "stages[0].ppo.num_generations", "at least 2"),
    ("grpo", {"rewards": [{"name": "reward_model"}]}, "stages[0].grpo.rewards[0]", "reward_model"),
    ("ppo", {"rewards": [{"name": "nonesuch"}]}, "stages[0].ppo.rewards[0].name", "exact_match"),
    ("grpo", {"epochs": 3}, "stages[0].grpo.epochs", "`steps` counts rollout batches"),
])
def test_bad_rl_configs_fail_before_any_worker(tmp_path, stage, options, key, words):
    out = tmp_path / "run"
    with pytest.raises(ConfigError) as err:
        run_pipeline(_config(stage, options, out))
    assert err.value.where == key and words in str(err.value)
    assert not out.exists()


@pytest.mark.slow
def test_killed_reward_worker_resumes_rl_from_its_last_checkpoint(tmp_path, caplog):
    from rayalign.embedded import embedded_model_path
    from rayalign.hookspecs import hookimpl
    from rayalign.plugins import PluginManager
    from rayalign.testing import start_local_ray

    model = str(embedded_model_path(0, "arithmetic"))
    checkpoint = tmp_path / "run" / "checkpoints" / "00-grpo" / "step-00000002"
    killed = {}

    def kill_reward_actor_after_checkpoint(prompt, completion, **_):
        """A rule reward runs on the driver just before the reward model is asked: the first call
        after step 2's checkpoint SIGKILLs the reward actor, so step 3's scoring must hit the dead
        process (a watcher thread racing the run could land after the actor's last use)."""
        if checkpoint.exists() and not killed:
            import ray

            killed["pid"] = ray.get(ray.get_actor("grpo/reward/0").pid.remote(), timeout=30)
            os.kill(killed["pid"], signal.SIGKILL)
        return 0.0

    plugin = types.ModuleType("kill_reward_actor")
    plugin.register_rewards = hookimpl(lambda register: register("kill_reward_actor", kill_reward_actor_after_checkpoint))
    cfg = RunConfig.model_validate({
        "model": model, "data": ARITHMETIC, "output_dir": str(tmp_path / "run"),
        "reliability": {"checkpoint_every": 2},
        "resources": {"trainer": {"num_cpus": 0.5}, "reward": {"num_cpus": 0.5},
                      "rollout": {"num_cpus": 0.5, "dtype": "float32"}},
        # A causal LM loads as a reward model with a fresh score head: enough to have a reward actor.
        "stages": [{"grpo": {"steps": 4, "prompts_per_step": 4, "num_generations": 2, "max_new_tokens": 16,
                             "kl_coef": 0.0, "eval_every": 4, "eval_prompts": 4, "reward_model": model,
                             "rewards": [{"name": "format_check"}, {"name": "kill_reward_actor", "weight": 0.0},
                                         {"name": "reward_model", "weight": 0.1}]}}],
    })
    start_local_ray(num_cpus=4)
    caplog.set_level(logging.INFO, logger="rayalign")
    out = run_pipeline(cfg, plugins=PluginManager(extra_plugins=(plugin,)))
    metrics = json.loads((out / "00-grpo" / "metrics.json").read_text())["metrics"]
    assert killed["pid"] and metrics["restarts"] == 1
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("[grpo] worker grpo/reward/0: died (") for m in messages)
    assert any("resumed from step-00000002 (step 2 of 4, weights version 2)" in m for m in messages)
    # Nothing lost but the steps after the checkpoint, which were redone: 4 steps, versions 1..4.
    assert [m["step"] for m in metrics["history"]] == [1, 2, 3, 4]
    assert [m["weights_version"] for m in metrics["history"]] == [1, 2, 3, 4]
    # The rollout log keeps steps 1-2 from before the kill and has steps 3-4 once each, as redone.
    rollouts = [json.loads(line) for line in (out / "00-grpo" / "rollouts.jsonl").read_text().splitlines()]
    assert Counter(r["step"] for r in rollouts) == {0: 8, 1: 8, 2: 8, 3: 8}
    assert [r["weights_version"] for r in rollouts] == sorted(r["weights_version"] for r in rollouts)
    assert not (tmp_path / "run" / "checkpoints").exists()  # removed once the stage finished
