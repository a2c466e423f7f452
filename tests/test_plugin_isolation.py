"""A faulty third-party plugin costs only itself: a name clash sets it aside (never the built-in),
a raising hook takes all of its registrations with it, and its stage failing mid-run ends the run
with one line naming it while the traceback goes to the run's log file."""

import os
import subprocess
import sys

import pytest

from rayalign.errors import ConfigError, DataError, PluginError
from rayalign.plugins import PluginManager
from test_plugin_kit import fake_distribution

CLASHING_REWARD = """
from rayalign.hookspecs import hookimpl
from rayalign.stage import Stage

class Rejection(Stage):
    name = "{stage}"

@hookimpl
def register_stages(register):
    register(Rejection)

@hookimpl
def register_rewards(register):
    register("exact_match", lambda prompt, completion, **example: 1.0)  # the rl plugin's name
"""

RAISING_HOOK = """
from rayalign.hookspecs import hookimpl
from rayalign.stage import Stage

class Half(Stage):
    name = "{stage}"

@hookimpl
def register_stages(register):
    register(Half)
    {stages_raise}

@hookimpl
def register_rewards(register):
    register("{reward}", lambda prompt, completion, **example: 0.5)
    {rewards_raise}
"""

RAISING_STAGE = """
from rayalign.hookspecs import hookimpl
from rayalign.stage import Stage

class Judge(Stage):
    name = "judge_boom"
    needs_model = False

    def run(self, ctx):
        raise RuntimeError("judge unreachable\\n  at http://judge:8000")

@hookimpl
def register_stages(register):
    register(Judge)
"""


@pytest.fixture
def site(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def cli(site, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rayalign.cli", *args], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(site)}, check=check, timeout=600)


def test_a_reward_named_like_a_builtin_sets_aside_the_third_party_plugin(site, caplog):
    fake_distribution(site, "clash_reward", CLASHING_REWARD.format(stage="rejection_a"))
    pm = PluginManager()
    assert pm.rewards.owner["exact_match"] == "rl"  # the built-in keeps its name
    info = pm.info["clash_reward"]
    assert info.broken and "reward 'exact_match' is already registered by built-in plugin 'rl'" in info.error
    assert "rejection_a" not in pm.stages  # and the set-aside plugin's other names go with it
    assert not pm.info["rl"].broken and "grpo" in pm.stages
    assert any("plugin 'clash_reward' (package clash-reward) is broken" in r.getMessage() for r in caplog.records)
    with pytest.raises(ConfigError, match=r"no plugin provides stage 'rejection_a'.*'clash_reward' \(package "
                                          r"clash-reward\) is broken: reward 'exact_match'"):
        pm.stages.get("rejection_a", where="stages[0]")


def test_between_two_third_party_plugins_one_is_set_aside_and_the_other_keeps_everything(site):
    # Names without "_": importlib.metadata takes a dist-info's name up to its first "-".
    for module in ("twinone", "twintwo"):
        fake_distribution(site, module, CLASHING_REWARD.format(stage=f"{module}_stage").replace("exact_match", "twin"))
    pm = PluginManager()
    kept = pm.rewards.owner["twin"]
    aside = ({"twinone", "twintwo"} - {kept}).pop()
    assert not pm.info[kept].broken and f"{kept}_stage" in pm.stages
    assert pm.info[aside].error == f"reward 'twin' is already registered by plugin {kept!r} (package {kept})"
    assert f"{aside}_stage" not in pm.stages


def test_cli_listing_completes_and_shows_the_set_aside_plugin_as_broken(site):
    fake_distribution(site, "clash_cli", CLASHING_REWARD.format(stage="rejection_cli"))
    out = cli(site, "plugins")  # check=True: exit status 0
    line = next(l for l in out.stdout.splitlines() if l.startswith("clash_cli"))
    assert "clash-cli 0.1  BROKEN: reward 'exact_match' is already registered by built-in plugin 'rl'" in line
    rewards = next(l for l in out.stdout.splitlines() if l.startswith("rewards:"))
    assert "exact_match (rl)" in rewards
    from rayalign.cli import LISTED_KINDS

    assert out.stdout.splitlines()[-1].startswith(f"{LISTED_KINDS[-1]}:")  # the listing ran to its end


@pytest.mark.parametrize("raising", ["register_stages", "register_rewards"])
def test_a_raising_hook_drops_all_of_its_plugins_registrations(site, raising):
    module = f"half_{raising[9:]}"  # one module name per case: imports are cached
    fake_distribution(site, module, RAISING_HOOK.format(
        stage=f"{module}_stage", reward=f"{module}_reward",
        stages_raise="raise RuntimeError('boom')" if raising == "register_stages" else "",
        rewards_raise="raise RuntimeError('boom')" if raising == "register_rewards" else ""))
    pm = PluginManager()
    assert f"{module}_reward" not in pm.rewards  # whichever registry is looked at first
    assert f"{module}_stage" not in pm.stages
    assert pm.info[module].error == f"hook {raising} raised RuntimeError('boom')"
    line = next(l for l in cli(site, "plugins").stdout.splitlines() if l.startswith(module))
    assert f"BROKEN: hook {raising} raised RuntimeError('boom')" in line


def test_only_a_third_party_stages_own_exceptions_are_reworded(site, tmp_path):
    from rayalign.pipeline import _third_party_failure

    fake_distribution(site, "judge_unit", RAISING_STAGE.replace("judge_boom", "judge_unit"))
    pm = PluginManager()
    failure = _third_party_failure(pm, "judge_unit", KeyError("missing"), tmp_path)
    assert str(failure) == "plugin error: judge_unit (judge-unit): stage 'judge_unit' raised KeyError: 'missing'"
    # A user error already is one line; a built-in stage's other exceptions are shown in full.
    assert _third_party_failure(pm, "judge_unit", DataError("x.jsonl:3", "bad row"), tmp_path) is None
    assert _third_party_failure(pm, "sft", RuntimeError("ours"), tmp_path) is None


@pytest.mark.slow
def test_a_plugin_stage_raising_mid_run_ends_with_one_line_and_logs_the_traceback(site, tmp_path, tiny_model_path):
    fake_distribution(site, "judge_plugin", RAISING_STAGE)
    out = tmp_path / "run"
    config = tmp_path / "judge.yaml"
    config.write_text(f"model: {tiny_model_path}\noutput_dir: {out}\nstages:\n  - judge_boom: {{}}\n")
    proc = cli(site, "run", str(config), check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    # Ray itself may print notices at start-up; ours is the one line that ends the run.
    lines = proc.stderr.strip().splitlines()
    assert lines[-1] == ("rayalign: plugin error: judge_plugin (judge-plugin): stage 'judge_boom' raised "
                         "RuntimeError: judge unreachable at http://judge:8000")
    assert [l for l in lines if "judge" in l] == lines[-1:]
    assert "Traceback" not in proc.stdout + proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["run.log"]  # nothing finished: only the log of why
    logged = (out / "run.log").read_text()
    assert "Traceback (most recent call last)" in logged
    assert "judge_plugin.py" in logged and 'raise RuntimeError("judge unreachable' in logged
    assert f"traceback in {out / 'run.log'}" in proc.stdout
    # The failed attempt's log does not block the next run in the same output directory.
    config.write_text(f"model: {tiny_model_path}\noutput_dir: {out}\nstages:\n  - judge_boom: {{}}\n")
    again = cli(site, "run", str(config), check=False)
    assert again.returncode == 2 and "already holds a run" not in again.stderr
