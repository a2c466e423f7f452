"""The embedded tool-use example: SFT on calculator calls, then GRPO with the calculator environment
(recipes/sft_then_tools.py), and the tool-use data it trains on."""

from __future__ import annotations

import json

import pytest

from conftest import run_recipe
from rayalign.data.datasets import load_records
from rayalign.data.tools import ToolTask
from rayalign.plugins import get_plugin_manager


def test_tool_data_loads_with_tool_messages_and_disjoint_prompts():
    formats = get_plugin_manager().formats
    sft, _ = load_records("synthetic:tools/sft", "chat", formats, 0)
    prompts, _ = load_records("synthetic:tools/prompts", "prompt", formats, 0)
    calls = [r["messages"] for r in sft if len(r["messages"]) == 4]
    assert 0.3 < len(calls) / len(sft) < 0.7  # SFT leaves RL a choice: call the tool or not
    assert [m["role"] for m in calls[0]] == ["user", "assistant", "tool", "assistant"]
    a, b = map(int, calls[0][1]["content"].removeprefix("<calc>").removesuffix("</calc>").split("*"))
    assert calls[0][2]["content"] == f"<result>{a * b}</result>" and calls[0][3]["content"].endswith(str(a * b))
    asked = {r["messages"][0]["content"] for r in sft}
    assert not asked & {p["prompt"][0]["content"] for p in prompts}  # RL's questions are new to SFT
    assert len(ToolTask(0).records("eval")) == 64


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    """The recipe exactly as the docs run it (its default config), once for the module."""
    return run_recipe("sft_then_tools.py", tmp_path_factory.mktemp("tools") / "run", timeout=900)


@pytest.mark.slow
@pytest.mark.timeout(900)  # its setup runs the whole recipe (~2 min on 2 idle cores)
def test_rl_raises_tool_use_and_exact_match(recipe):
    out, stages, stdout = recipe
    assert list(stages) == ["sft", "grpo"]
    evals = stages["grpo"]["metrics"]["evals"]
    before, after = evals[0], evals[-1]
    print(f"tool use {before['env/multi_turn_rate']:.3f} -> {after['env/multi_turn_rate']:.3f}; "
          f"exact match {before['exact_match']:.3f} -> {after['exact_match']:.3f}")
    assert after["env/multi_turn_rate"] >= before["env/multi_turn_rate"] + 0.2
    assert after["exact_match"] >= before["exact_match"] + 0.2
    assert "=== tool use, held out: before RL -> after ===" in stdout and "tool_use_rate:" in stdout


@pytest.mark.slow
@pytest.mark.timeout(900)  # includes the module's recipe run
def test_tool_episodes_are_logged_with_their_transcripts(recipe):
    out, stages, _ = recipe
    grpo = stages["grpo"]["metrics"]
    for m in grpo["history"]:
        assert m["env/errors"] == 0 and m["env/timeouts"] == 0
        assert m["env/info/tool_calls"] > 0  # every step samples some calls: the signal RL needs
    for e in grpo["evals"]:  # the held-out eval counts the calls too
        assert e["env/episodes"] == grpo["eval_prompts"]
        assert e["env/info/tool_calls"] >= e["env/multi_turn_rate"]
    rollouts = [json.loads(line) for line in (out / "01-grpo" / "rollouts.jsonl").read_text().splitlines()]
    called = [r for r in rollouts if len(r["environment"]["transcript"]) > 1]
    assert called
    roles = [m["role"] for m in called[0]["environment"]["transcript"]]
    assert roles[:3] == ["assistant", "tool", "assistant"]
