"""Rewards, metrics and advantage estimators are contracts like stages and losses: they declare
their options (a pydantic ``Config``), a stage names them through the registries, and a wrong
name or option stops the run with one line naming the config key, before any output directory or
Ray worker exists."""

from __future__ import annotations

import types

import numpy as np
import pytest
import ray
from pydantic import Field

from rayalign.config import RunConfig
from rayalign.errors import ConfigError
from rayalign.hookspecs import hookimpl
from rayalign.metrics import Metric, MetricConfig, build_metrics
from rayalign.pipeline import run_pipeline
from rayalign.plugins import PluginManager
from rayalign.rewards import reward_schema
from rayalign.training.advantages import AdvantageBatch, AdvantageConfig, GroupEstimator
from rayalign_rl import advantages as adv

ARITHMETIC = {"prompts": "synthetic:arithmetic/prompts"}


def short_answer(prompt, completion, reference=None, limit: int = 20, **example):
    """Written against the first documented API: no declared schema, a **example catch-all."""
    return 1.0 if len(completion.split()) <= limit else 0.0


class ShoutConfig(MetricConfig):
    mark: str = Field("!", min_length=1)


class ShoutRate(Metric):
    """Share of completions with the mark."""

    name = "shout_rate"
    Config = ShoutConfig

    def compute(self, prompts, completions, references):
        return sum(self.config.mark in c for c in completions) / max(1, len(completions))


class OldMetric(Metric):
    """A metric from before metrics had options: its own __init__ takes nothing."""

    name = "old_metric"

    def __init__(self):
        self.seen = 0

    def compute(self, prompts, completions, references):
        return 0.0


class MedianConfig(AdvantageConfig):
    scale_rewards: bool = True  # a stage setting it declares, so the stage's value reaches it
    offset: float = 0.0


class MedianBaseline(GroupEstimator):
    """Reward minus the group's median."""

    name = "median"
    Config = MedianConfig

    def group_advantages(self, rewards):
        return rewards - np.median(rewards, axis=1, keepdims=True) + self.config.offset


class CriticEstimator(GroupEstimator):
    name = "needs_values"
    needs_critic = True


def plugins() -> PluginManager:
    module = types.ModuleType("contract_plugin")
    module.register_rewards = hookimpl(lambda register: register("short_answer", short_answer))
    module.register_metrics = hookimpl(lambda register: (register(ShoutRate), register(OldMetric)))
    module.register_advantage_estimators = hookimpl(
        lambda register: (register(MedianBaseline), register(CriticEstimator)))
    return PluginManager(extra_plugins=(module,))


def refused(tmp_path, stage: dict, pm: PluginManager | None = None) -> str:
    out = tmp_path / "run"
    cfg = RunConfig.model_validate({"model": "embedded:arithmetic", "data": ARITHMETIC, "output_dir": str(out),
                                    "stages": [stage]})
    with pytest.raises(ConfigError) as exc:
        run_pipeline(cfg, pm)
    assert not out.exists() and not ray.is_initialized()
    text = str(exc.value)
    assert "\n" not in text
    return text


@pytest.mark.parametrize("stage, message", [
    ({"grpo": {"rewards": [{"name": "exact_match", "options": {"patern": "x"}}]}},
     "stages[0].grpo.rewards[0].options.patern: unknown option of reward 'exact_match' (its options: pattern)"),
    ({"ppo": {"rewards": [{"name": "exact_match"}, {"name": "length_penalty", "options": {"max_chars": "many"}}]}},
     "stages[0].ppo.rewards[1].options.max_chars: Input should be a valid integer"),
    ({"grpo": {"rewards": [{"name": "format_check", "options": {"max_chars": 3}}]}},
     "stages[0].grpo.rewards[0].options.max_chars: unknown option of reward 'format_check'"),
    ({"grpo": {"reward_model": "x", "rewards": [{"name": "reward_model", "options": {"scale": 2}}]}},
     "stages[0].grpo.rewards[0].options: the reward model term takes no options"),
    ({"grpo": {"advantage": "rlooo"}},
     "stages[0].grpo.advantage: no plugin provides advantage estimator 'rlooo' (known: gae, grpo, rloo)"),
    ({"grpo": {"advantage_options": {"scale": False}}},
     "stages[0].grpo.advantage_options.scale: unknown option of advantage estimator 'grpo' (its options: "
     "scale_rewards)"),
    ({"ppo": {"advantage": "grpo"}}, "stages[0].ppo.num_generations: advantage 'grpo' compares answers to the "
     "same prompt: needs at least 2"),
    ({"generate": {"metrics": ["exact_match", "distinct_3"]}},
     "stages[0].generate.metrics[1]: no plugin provides metric 'distinct_3'"),
    ({"generate": {"metric_options": {"decline_rate": {}}}},
     "stages[0].generate.metric_options.decline_rate: metric 'decline_rate' is not in metrics"),
    ({"generate": {"metric_options": {"exact_match": {"strict": True}}}},
     "stages[0].generate.metric_options.exact_match.strict: unknown option of metric 'exact_match' (its options: "
     "none)"),
])
def test_a_wrong_name_or_option_is_refused_before_any_work(tmp_path, stage, message):
    assert message in refused(tmp_path, stage)


def test_a_reward_without_a_declared_schema_takes_its_keyword_parameters(tmp_path):
    assert list(reward_schema(short_answer).model_fields) == ["limit"]  # **example takes no option
    text = refused(tmp_path, {"grpo": {"rewards": [{"name": "short_answer", "options": {"limt": 5}}]}}, plugins())
    assert "stages[0].grpo.rewards[0].options.limt: unknown option of reward 'short_answer' (its options: limit)" \
        in text
    from rayalign.options import check_registered
    from rayalign_rl.config import GRPOConfig
    from rayalign_rl.rewards import LAST_NUMBER

    cfg = GRPOConfig.model_validate({"rewards": [{"name": "short_answer", "options": {"limit": "3"}},
                                                 {"name": "exact_match"}]})
    check_registered(cfg, plugins(), "stages[0].grpo")
    # Checked options are typed and complete: what the loop passes as keyword arguments.
    assert cfg.rewards[0].options == {"limit": 3}
    assert cfg.rewards[1].options == {"pattern": LAST_NUMBER}
    assert short_answer("q", "one two three four", **cfg.rewards[0].options) == 0.0


def test_built_in_rewards_declare_their_options():
    from rayalign_rl.rewards import LAST_NUMBER, RULE_REWARDS

    assert {n: list(reward_schema(fn).model_fields) for n, fn in RULE_REWARDS.items()} == {
        "exact_match": ["pattern"], "format_check": ["pattern"], "length_penalty": ["max_chars"]}
    assert reward_schema(RULE_REWARDS["exact_match"])().pattern == LAST_NUMBER


def test_metric_options_reach_the_metric_and_old_metrics_still_build():
    pm = plugins()
    shout, old = build_metrics(pm, ["shout_rate", "old_metric"], {"shout_rate": {"mark": "?"}}, "stages[0].generate")
    assert shout.compute([], ["why?", "no"], [None, None]) == 0.5 and old.seen == 0
    with pytest.raises(ConfigError, match=r"stages\[0\]\.generate\.metric_options\.shout_rate\.mark: String should "
                                          r"have at least 1 character of metric 'shout_rate'"):
        build_metrics(pm, ["shout_rate"], {"shout_rate": {"mark": ""}}, "stages[0].generate")


def test_a_plugin_estimator_gets_its_options_and_the_stage_settings_it_declares():
    from rayalign.options import check_registered
    from rayalign_rl.config import GRPOConfig

    pm = plugins()
    cfg = GRPOConfig.model_validate({"advantage": "median", "advantage_options": {"offset": 1.0},
                                     "scale_rewards": False})
    check_registered(cfg, pm, "stages[0].grpo")
    assert not cfg.needs_critic
    est = adv.stage_estimator(pm, cfg, "stages[0].grpo")
    assert (est.config.offset, est.config.scale_rewards) == (1.0, False)
    batch = AdvantageBatch(rewards=[1.0, 2.0, 4.0, 0.0, 0.0, 3.0], kl=[np.zeros(2, np.float32)] * 6, kl_coef=0.0,
                           group_size=3)
    out = est.estimate(batch).advantages
    np.testing.assert_allclose([a[0] for a in out], [0.0, 1.0, 3.0, 1.0, 1.0, 4.0])
    assert all(a.shape == (2,) for a in out)
    # An estimator that reads values gets a critic, whatever its name: the stage, the loop and the
    # colocated plan ask the config's needs_critic.
    cfg = GRPOConfig.model_validate({"advantage": "needs_values"})
    check_registered(cfg, pm, "stages[0].grpo")
    assert cfg.needs_critic


def _old_advantages(rewards, kl, kl_penalty, g, kind, values=None, gamma=1.0, lam=0.95, whiten=True, scale=True):
    """What RLLoop.advantages computed before estimators were registered, for comparison."""
    if kind == "gae":
        out = []
        for r, k, v in zip(rewards, kl, values):
            token_rewards = -kl_penalty * k
            token_rewards[-1] += r
            out.append(adv.gae(token_rewards, v, gamma, lam))
        a = [x for x, _ in out]
        return (adv.whiten(a) if whiten else a), [x for _, x in out]
    seq = np.array([r - kl_penalty * k.sum() for r, k in zip(rewards, kl)]).reshape(-1, g)
    scalar = adv.grpo(seq, scale) if kind == "grpo" else adv.rloo(seq)
    return [np.full(len(k), a, dtype=np.float32) for k, a in zip(kl, scalar.reshape(-1))], None


@pytest.mark.parametrize("kind", ["gae", "grpo", "rloo"])
def test_built_in_estimators_compute_what_the_loop_did(kind):
    from rayalign.plugins import get_plugin_manager
    from rayalign_rl.config import GRPOConfig

    rng = np.random.default_rng(0)
    lengths = [3, 5, 2, 4, 6, 1]
    rewards = [float(x) for x in rng.normal(size=6)]
    kl = [rng.normal(size=n).astype(np.float32) for n in lengths]
    values = [rng.normal(size=n).astype(np.float32) for n in lengths]
    cfg = GRPOConfig.model_validate({"advantage": kind, "num_generations": 3, "gamma": 0.9, "lam": 0.8})
    est = adv.stage_estimator(get_plugin_manager(), cfg, "stages[0].grpo")
    assert est.needs_critic == (kind == "gae") == cfg.needs_critic
    got = est.estimate(AdvantageBatch(rewards, [k.copy() for k in kl], 0.05, 3, values if est.needs_critic else None))
    want, returns = _old_advantages(rewards, [k.copy() for k in kl], 0.05, 3, kind, values, gamma=0.9, lam=0.8)
    for a, b in zip(got.advantages, want):
        np.testing.assert_array_equal(a, b)
    assert (got.returns is None) == (returns is None)
    for a, b in zip(got.returns or [], returns or []):
        np.testing.assert_array_equal(a, b)


def test_plugins_lists_and_shows_estimators_and_reward_options():
    from rayalign.cli import describe

    pm = plugins()
    assert "needs_critic: True" in describe(pm, "gae")
    shown = describe(pm, "exact_match")  # a metric and a reward of one name: both are shown
    assert "metric exact_match" in shown and "reward exact_match" in shown and "pattern: str" in shown
    assert "limit: int (default 20)" in describe(pm, "short_answer")
    assert "offset: float (default 0.0)" in describe(pm, "median")
