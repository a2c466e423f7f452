"""DAPO's two stage options, across one real ``RLLoop.step`` with scripted engines and trainers:
dynamic sampling (prompts whose answers all got the same reward are dropped and replaced) and
overlong filtering (answers cut off at ``max_new_tokens`` are left out of the update). TRL has no
dynamic sampling; its overlong filtering (``mask_truncated_completions``) acts in generation, not
in the loss the equivalence tests call, so both are checked against their definitions here."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rayalign.config import RunConfig
from rayalign.errors import ConfigError
from rayalign.plugins import get_plugin_manager
from rayalign.rollout.vllm_engine import CompletionBatch
from rayalign_rl.config import GRPOConfig, PPOConfig
from rayalign_rl.loop import RewardFn
from rayalign_rl.stage import GRPOStage
from test_colocation_order import FakeEngine, make_loop, ray_started  # noqa: F401 (a fixture)


class ScriptedEngine(FakeEngine):
    """Answer j to each prompt is the text ``"j"``: 2 + j tokens ending by "stop", except the last
    answer of each prompt, cut off at ``max_tokens`` ("length")."""

    def generate_batch(self, prompts, sampling) -> CompletionBatch:
        lengths = [sampling.max_tokens if j == sampling.n - 1 else 2 + j for _ in prompts for j in range(sampling.n)]
        return CompletionBatch(
            prompt_index=np.repeat(np.arange(len(prompts), dtype=np.int32), sampling.n),
            offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            token_ids=np.full(sum(lengths), 40, dtype=np.int32), logprobs=np.full(sum(lengths), -0.5, dtype=np.float32),
            finish_reasons=["length" if j == sampling.n - 1 else "stop" for _ in prompts for j in range(sampling.n)],
            texts=[str(j) for _ in prompts for j in range(sampling.n)], weights_version=self.version)


def by_prompt_parity(prompt, completion, reference=None):
    """Prompt "k + 1?": every answer scores 1.0 when k is even (a group to drop), else answer j scores j."""
    return 1.0 if int(prompt.split()[0]) % 2 == 0 else float(completion)


def scripted_loop(tmp_path, tokenizer, **options):
    loop, _ = make_loop(tmp_path, tokenizer, colocated=False, offload=False)
    loop.cfg = loop.cfg.model_copy(update=options)
    loop.engines.obj = ScriptedEngine()
    loop.rewards = [RewardFn("parity", 1.0, by_prompt_parity, {})]
    loop.train = loop.train * 3  # 12 prompts, 6 of them with differing rewards
    return loop


def trained_sequences(loop) -> list:
    """(advantage, answer tokens) of every answer in the rows the policy's last update loaded."""
    out = []
    for batch in loop.policy.obj.batches:
        ids, answer = batch["sequence_ids"][0], batch["labels"][0] != -100
        for s in np.unique(ids[answer]):
            at = answer & (ids == s)
            out.append((float(batch["advantages"][0][at][0]), int(at.sum())))
    return out


def test_dynamic_sampling_drops_equal_groups_and_refills_from_further_prompts(tmp_path, tokenizer, ray_started):
    loop = scripted_loop(tmp_path, tokenizer, dynamic_sampling=True, sampling_rounds=4, prompts_per_step=3)
    cfg = loop.cfg
    # What the rounds draw: round r takes the prompts of step r * steps; keep the first three odd ones.
    drawn = [p for r in range(cfg.sampling_rounds) for p in loop.step_prompts(r * cfg.steps)]
    odd = [i for i, p in enumerate(drawn) if int(p.text.split()[0]) % 2]
    rounds = odd[2] // cfg.prompts_per_step + 1
    assert rounds > 1, "the scripted prompts must need a refill"
    metrics = loop.step(0)
    assert metrics["dynamic_sampling/rounds"] == rounds
    seen = rounds * cfg.prompts_per_step
    assert metrics["dynamic_sampling/dropped_groups"] == seen - sum(i < seen for i in odd)
    # Trained on: three whole groups, each with differing rewards, so every advantage is non-zero.
    assert metrics["episodes"] == 3 * cfg.num_generations
    trained = trained_sequences(loop)
    assert len(trained) == 3 * cfg.num_generations and all(abs(a) > 0.5 for a, _ in trained)
    logged = [json.loads(line)["prompt"] for line in loop.rollouts_path.read_text().splitlines()]
    assert sorted(logged) == sorted(drawn[i].text for i in odd[:3] for _ in range(cfg.num_generations))


def test_without_dynamic_sampling_equal_groups_are_trained_on(tmp_path, tokenizer, ray_started):
    loop = scripted_loop(tmp_path, tokenizer, prompts_per_step=3)
    metrics = loop.step(0)
    assert not any(k.startswith("dynamic_sampling/") for k in metrics) and "overlong_filtered" not in metrics
    assert metrics["episodes"] == 3 * loop.cfg.num_generations == len(trained_sequences(loop))


def test_overlong_filtering_leaves_cut_off_answers_out_of_the_update_only(tmp_path, tokenizer, ray_started):
    loop = scripted_loop(tmp_path, tokenizer, overlong_filtering=True, prompts_per_step=3, num_generations=3)
    metrics = loop.step(0)
    # One answer per prompt reached max_new_tokens: scored and counted in the step's metrics ...
    assert metrics["overlong_filtered"] == 3 and metrics["episodes"] == 9 and metrics["truncated"] == pytest.approx(1 / 3)
    # ... and in its group's baseline, but not trained on: the update's rows hold the other answers.
    trained = trained_sequences(loop)
    assert sorted(n for _, n in trained) == [2, 2, 2, 3, 3, 3]
    # An odd prompt's rewards are 0, 1, 2: the mean, 1, includes the cut-off answer's 2, so the
    # answer "1" has advantage 0 and the answer "0" a negative one (without the 2, "1" would be above the mean).
    odd = [a for a, n in trained if abs(a) > 0]
    assert odd and all(a < 0 for a in odd)


def test_a_step_whose_answers_were_all_cut_off_trains_on_nothing_and_goes_on(tmp_path, tokenizer, ray_started):
    loop = scripted_loop(tmp_path, tokenizer, overlong_filtering=True, num_generations=1)  # one answer: cut off
    metrics = loop.step(0)
    assert metrics["overlong_filtered"] == metrics["episodes"] == 2
    assert loop.policy.obj.batches == [] and not any(k.startswith("policy/") for k in metrics)
    assert metrics["weights_version"] == 1.0  # the step still synced and ended


def test_dynamic_sampling_needs_groups_and_its_own_reward_gpus():
    with pytest.raises(ConfigError, match=r"^config error: stages\[0\]\.ppo\.dynamic_sampling: .*num_generations"):
        PPOConfig(dynamic_sampling=True).check_plugins(get_plugin_manager(), "stages[0].ppo")
    stage = GRPOStage(GRPOConfig(dynamic_sampling=True, reward_model="rm", rewards=[{"name": "reward_model"}]))
    run = RunConfig(resources={"colocate": True, "trainer": {"num_gpus": 1}})
    with pytest.raises(ConfigError, match=r"stages\[0\]\.grpo\.dynamic_sampling: not with a reward model on GPUs"):
        stage.prepare(run, get_plugin_manager(), None, 0)
