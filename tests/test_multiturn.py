"""Multi-turn environments: the contract, the calculator, the episode runner (token in, token out,
limits, failures) and one real ``RLLoop.step`` through it with fake actors."""

from __future__ import annotations

import time
from types import SimpleNamespace

import numpy as np
import pytest
from transformers import AutoTokenizer

from rayalign.environments import Environment, Observation
from rayalign.errors import ConfigError
from rayalign.plugins import get_plugin_manager
from rayalign.rollout.vllm_engine import Completion, Sampling
from rayalign.training.losses import IGNORE_INDEX
from rayalign_rl.calculator import CalculatorEnvironment, evaluate
from rayalign_rl.config import EnvironmentSettings, GRPOConfig
from rayalign_rl.episodes import pack
from rayalign_rl.multiturn import EpisodeRunner, ObservationTokens

# Not append-only: an assistant turn that is not the last loses its reasoning (as Qwen3's template
# drops earlier <think> blocks), so rendering the whole conversation again changes earlier turns.
STRIPPING_TEMPLATE = (
    "{% for m in messages %}{% set c = m['content'] %}"
    "{% if m['role'] == 'assistant' and not loop.last %}{% set c = c.split('</think>')[-1] %}{% endif %}"
    "<|{{ m['role'] }}|>\n{{ c }}<|end|>{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


@pytest.fixture(scope="module")
def stripping_tokenizer(tiny_model_path):
    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    tok.chat_template = STRIPPING_TEMPLATE
    return tok


class Script:
    """A fake engine: turn k of every episode is ``turns[k]`` (``{j}``: the episode's sample) and
    the end-of-turn token; each token's logprob is distinct. Records every prompt it is given."""

    def __init__(self, tokenizer, turns: list[str], finish: str = "stop"):
        self.tok, self.turns, self.finish, self.calls, self.sampled = tokenizer, turns, finish, [], []

    def __call__(self, prompts: list[list[int]], sampling: Sampling) -> list[list[Completion]]:
        k = len(self.calls)
        self.calls.append((prompts, sampling))
        out = []
        for i, _ in enumerate(prompts):
            group = []
            for j in range(sampling.n):
                ids = self.tok(self.turns[min(k, len(self.turns) - 1)].format(j=j + i),
                               add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id]
                ids = ids[: sampling.max_tokens]
                logps = [-0.001 * (1000 * k + t + 1) for t in range(len(ids))]
                self.sampled.append((ids, logps))
                group.append(Completion(i, ids, None, logps, self.finish, weights_version=3))
            out.append(group)
        return out


def prompt(text: str, tok) -> SimpleNamespace:
    from rayalign.data.chat import tokenize_prompt

    messages = [{"role": "user", "content": text}]
    return SimpleNamespace(messages=messages, ids=tokenize_prompt(tok, messages), reference="42")


def settings(**kw) -> EnvironmentSettings:
    return EnvironmentSettings(name="calculator", **kw)


def test_calculator_answers_calls_and_ends_on_an_answer():
    assert evaluate("12*34") == 408 and evaluate("(2+3)**2 - 7 // 2") == 22
    for bad in ("__import__('os')", "2**1000", "1/0", "x+1"):
        with pytest.raises(ValueError):
            evaluate(bad)
    env = CalculatorEnvironment()
    obs = env.step([], "I need <calc>6*7</calc>", [])
    assert obs == Observation(text="<result>42</result>", role="tool", reward=0.0, info={"tool_calls": 1.0})
    assert "<error>" in env.step([], "<calc>open('x')</calc>", []).text
    assert env.step([], "最终结果是42", []).done


def test_trained_ids_are_the_sampled_ids_turn_by_turn_with_a_template_that_is_not_append_only(stripping_tokenizer):
    tok = stripping_tokenizer
    script = Script(tok, ["<think>a{j}</think><calc>6*7</calc>", "<think>b{j}</think>最终结果是42"])
    run = EpisodeRunner(CalculatorEnvironment, settings(), tok, script)
    p = prompt("计算 6*7", tok)
    episodes, stale = run.run([p], Sampling(n=2, seed=1, logprobs=True), version=3)
    assert stale == 0 and len(episodes) == 2 and len(script.calls) == 2
    observation = ObservationTokens(tok)({"role": "tool", "content": "<result>42</result>"})
    for j, e in enumerate(episodes):
        (t1, l1), (t2, l2) = script.sampled[j], script.sampled[2 + j]
        # Turn 2 was generated from exactly the prompt, turn 1's sampled ids and the observation.
        assert script.calls[1][0][j] == p.ids + t1 + observation
        assert e.completion_ids == t1 + observation + t2
        assert e.loss_mask.tolist() == [True] * len(t1) + [False] * len(observation) + [True] * len(t2)
        np.testing.assert_array_equal(e.vllm_logps, np.asarray(l1 + l2, dtype=np.float32))
        assert e.info["end_reason"] == "done" and e.info["turns"] == 2 and e.text == f"<think>b{j}</think>最终结果是42"
        assert e.info["transcript"][1] == {"role": "tool", "content": "<result>42</result>"}
        # Rendering the conversation again would train other ids: the template drops turn 1's reasoning.
        rerendered = tok.apply_chat_template(p.messages + e.info["transcript"], tokenize=False)
        assert tok(rerendered, add_special_tokens=False)["input_ids"] != p.ids + e.completion_ids
    # The packed rows label exactly the sampled ids, at their positions; observations are not labelled.
    rows = pack(episodes, 4096, seed=0)
    for row in rows:
        labels, inputs = row.batch["labels"][0].tolist(), row.batch["input_ids"][0].tolist()
        for i, positions in zip(row.episodes, row.positions):
            e = episodes[i]
            sampled = script.sampled[i][0] + script.sampled[2 + i][0]
            assert [inputs[q] for q in positions] == sampled == [labels[q] for q in positions]
            assert len(positions) == e.num_trained == len(e.vllm_logps)
        assert sum(x != IGNORE_INDEX for x in labels) == sum(len(positions) for positions in row.positions)


def test_limits_end_episodes_with_their_reason(tokenizer):
    calls_forever = ["<calc>1+{j}</calc>"]
    p = prompt("计算 6*7", tokenizer)
    run = EpisodeRunner(CalculatorEnvironment, settings(max_turns=3), tokenizer, Script(tokenizer, calls_forever))
    (e,), _ = run.run([p], Sampling(n=1))
    assert e.info["end_reason"] == "max_turns" and e.info["turns"] == 3 and e.info["info"] == {"tool_calls": 3.0}
    script = Script(tokenizer, calls_forever)
    run = EpisodeRunner(CalculatorEnvironment, settings(max_total_tokens=30), tokenizer, script)
    (e,), _ = run.run([p], Sampling(n=1))
    assert e.info["end_reason"] == "max_tokens" and len(e.completion_ids) <= 30 and e.finish_reason == "length"
    assert all(s.max_tokens <= 30 for _, s in script.calls)
    run = EpisodeRunner(CalculatorEnvironment, settings(max_episode_s=1e-9), tokenizer, Script(tokenizer, calls_forever))
    (e,), _ = run.run([p], Sampling(n=1))
    assert e.info["end_reason"] == "timeout" and e.info["turns"] == 1
    m = run.take_metrics()
    assert m["env/end/timeout"] == 1.0 and m["env/episodes"] == 1.0 and run.take_metrics() == {}
    # A turn sampled under other weights makes its prompt's episodes stale.
    (_, stale) = EpisodeRunner(CalculatorEnvironment, settings(), tokenizer, Script(tokenizer, ["x"])).run(
        [p], Sampling(n=2), version=4)
    assert stale == 2


class Flaky(Environment):
    """Raises on the episode whose first turn says ``boom``, hangs on ``hang``, else a calculator."""

    name = "flaky"

    def step(self, conversation, last_turn_text, last_turn_token_ids):
        if "boom" in last_turn_text:
            raise RuntimeError("sandbox crashed")
        if "hang" in last_turn_text:
            time.sleep(3)
        return CalculatorEnvironment().step(conversation, last_turn_text, last_turn_token_ids)


class StatefulFlaky(Flaky):
    stateful = True


@pytest.mark.parametrize("cls", [Flaky, StatefulFlaky], ids=["driver", "actor"])
def test_an_environment_that_raises_or_hangs_ends_only_its_episode(tokenizer, cls):
    if cls.stateful:
        import sys

        import ray.cloudpickle

        from rayalign.testing import start_local_ray

        start_local_ray(num_cpus=1)
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import tests/
    prompts = [prompt(t, tokenizer) for t in ("a", "b", "c")]
    first = {0: "<calc>6*7</calc>", 1: "boom", 2: "hang"}  # prompt i's first turn: fine, raises, hangs
    calls = []

    def generate(ids, sampling):
        calls.append(ids)
        texts = [first[i] if len(calls) == 1 else "最终结果是42" for i in range(len(ids))]
        return [[Completion(i, tok, None, [-0.5] * len(tok), "stop")]
                for i, tok in enumerate(tokenizer(texts, add_special_tokens=False)["input_ids"])]

    run = EpisodeRunner(cls, EnvironmentSettings(name=cls.name, timeout_s=1.0), tokenizer, generate)
    clock = time.monotonic()
    episodes, _ = run.run(prompts, Sampling(n=1))
    if not cls.stateful:  # (an actor's start-up is not bounded by timeout_s)
        assert time.monotonic() - clock < 2.9  # the hanging call was abandoned, not waited for
    reasons = [e.info["end_reason"] for e in episodes]
    assert reasons[0] == "done" and reasons[2] == "env_timeout"
    assert reasons[1].startswith("env_error: ") and "sandbox crashed" in reasons[1]
    # The failed episodes keep their turn: the stage's rewards score it like any other.
    assert [e.info["turns"] for e in episodes] == [2, 1, 1] and episodes[1].text == "boom"
    m = run.take_metrics()
    assert m["env/errors"] == 1.0 and m["env/timeouts"] == 1.0 and m["env/end/done"] == 1.0


def test_the_hook_registers_calculator_and_the_cli_lists_it(capsys):
    from rayalign.cli import cmd_plugins, describe

    pm = get_plugin_manager()
    assert pm.environments.get("calculator", where="t") is CalculatorEnvironment
    cmd_plugins(SimpleNamespace(action="list"))
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("environments:"))
    assert "calculator (rl)" in line
    assert "call_reward" in describe(pm, "calculator") and "stateful: False" in describe(pm, "calculator")
    cfg = GRPOConfig(environment={"name": "calculator", "options": {"call_reward": 0.1}})
    cfg.environment.check_plugins(pm, "stages[0].grpo.environment")
    assert cfg.environment.options == {"call_reward": 0.1, "role": "tool"}
    with pytest.raises(ConfigError, match="environment.options.cal_reward"):
        EnvironmentSettings(name="calculator", options={"cal_reward": 1}).check_plugins(pm, "stages[0].grpo.environment")
    with pytest.raises(ConfigError, match="no plugin provides environment 'calc'"):
        EnvironmentSettings(name="calc").check_plugins(pm, "stages[0].grpo.environment")


def test_one_rl_step_trains_the_episodes_of_an_environment(tmp_path, tokenizer):
    """A real ``RLLoop.step`` with the fake actors of test_colocation_order: sample goes through the
    environment, the trainer gets the observations unlabelled, the step reports ``env/`` metrics."""
    import json

    from rayalign.rollout.vllm_engine import CompletionBatch
    from rayalign.testing import start_local_ray
    from test_colocation_order import FakeEngine, make_loop

    start_local_ray(num_cpus=1)
    loop, _ = make_loop(tmp_path, tokenizer, colocated=False, offload=False)
    loop.cfg.environment = settings(max_turns=3)
    call, answer = (tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
                    for t in ("<calc>6*7</calc>", "最终结果是42"))

    class ToolEngine(FakeEngine):
        def generate_batch(self, prompts, sampling):
            turns = [call if len(p) <= 3 else answer for p in prompts for _ in range(sampling.n)]  # prompts: 3 ids
            offsets = np.cumsum([0] + [len(t) for t in turns])
            return CompletionBatch(np.repeat(np.arange(len(prompts), dtype=np.int32), sampling.n), offsets,
                                   np.concatenate(turns).astype(np.int32), np.full(offsets[-1], -0.5, np.float32),
                                   ["stop"] * len(turns), None, weights_version=self.version)

    loop.engines.obj = ToolEngine()
    metrics = loop.step(0)
    assert metrics["env/end/done"] == 4.0 and metrics["env/errors"] == 0.0 and metrics["env/info/tool_calls"] == 1.0
    assert metrics["env/turns"] == 2.0 and metrics["episodes"] == 4.0
    labels = np.concatenate([np.asarray(b["labels"])[0] for b in loop.policy.obj.batches])
    assert np.count_nonzero(labels != IGNORE_INDEX) == 4 * (len(call) + len(answer))  # the model's tokens only
    logged = [json.loads(line) for line in loop.rollouts_path.read_text().splitlines()]
    assert {r["environment"]["end_reason"] for r in logged} == {"done"} and logged[0]["completion"] == "最终结果是42"


class _RecordingRewardModel:
    """A reward-model worker group of one rank that records the conversations it is asked to score."""

    def __init__(self):
        self.seen: list[list[dict]] = []
        self.score = SimpleNamespace(remote=self._score)

    def _score(self, convs):
        self.seen += convs
        return [float(len(c)) for c in convs]

    def __len__(self):
        return 1

    def submit(self, call):
        return [call(self, 0)]

    def wait(self, in_flight, timeout_s):
        return in_flight


def test_a_reward_model_scores_a_multi_turn_episode_on_its_whole_exchange():
    from rayalign_rl.episodes import Episode
    from rayalign_rl.loop import Prompt, RewardFn, RLLoop

    prompt = Prompt([{"role": "user", "content": "What is 12*34?"}], "408", [1, 2])
    transcript = [{"role": "assistant", "content": "<calc>12*34</calc>"}, {"role": "tool", "content": "<result>408</result>"},
                  {"role": "assistant", "content": "408"}]
    multi = Episode(0, [1, 2], [3, 4, 5], "408", "stop", 0, np.zeros(2, np.float32), info={"transcript": transcript})
    single = Episode(0, [1, 2], [6], "407", "stop", 0, np.zeros(1, np.float32))
    model = _RecordingRewardModel()
    loop = SimpleNamespace(rewards=[RewardFn("reward_model", 1.0, None, {})], reward_model=model,
                           timeouts=SimpleNamespace(step_s=5.0))
    RLLoop.start_rewards(loop, [prompt], [multi, single])()
    assert model.seen == [prompt.messages + transcript, prompt.messages + [{"role": "assistant", "content": "407"}]]
    assert (multi.reward, single.reward) == (4.0, 2.0)  # each scored on what it was shown
