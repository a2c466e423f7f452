"""Plugin discovery through entry points, registries, and start-up failures."""

import subprocess
import sys
import types

import pytest

from rayalign.errors import ConfigError, PluginError
from rayalign.hookspecs import hookimpl
from rayalign.plugins import PluginManager
from rayalign.stage import Stage


def test_builtins_load_through_entry_points():
    pm = PluginManager()
    for name in ("sft", "dpo", "generate", "formats"):
        info = pm.info[name]
        assert info.package == "rayalign" and info.version == "0.1.0"
    assert {"sft", "dpo", "generate"} <= set(pm.stages)
    assert {"sft", "sigmoid", "ipo"} <= set(pm.losses)
    assert pm.stages.owner["dpo"] == "dpo"
    assert "register_stages" in pm.info["sft"].hooks


def test_misspelt_hook_fails_at_startup_naming_the_plugin():
    bad = types.ModuleType("typo_plugin")

    @hookimpl
    def register_stage(register):  # missing "s": matches no hook
        pass

    bad.register_stage = register_stage
    with pytest.raises(PluginError, match="typo_plugin.*register_stage"):
        PluginManager(extra_plugins=(bad,), load_entry_points=False)


def test_wrong_hook_signature_is_rejected():
    bad = types.ModuleType("sig_plugin")

    @hookimpl
    def register_stages(register, extra):
        pass

    bad.register_stages = register_stages
    with pytest.raises(PluginError, match="sig_plugin"):
        PluginManager(extra_plugins=(bad,), load_entry_points=False)


def test_duplicate_registration_names_both_plugins():
    class Clash(Stage):
        name = "sft"

    clash = types.ModuleType("clash_plugin")
    clash.register_stages = hookimpl(lambda register: register(Clash))
    pm = PluginManager(extra_plugins=(clash,))
    with pytest.raises(PluginError, match="already registered by plugin 'sft'"):
        pm.stages


def test_unknown_stage_lists_known_ones():
    pm = PluginManager()
    with pytest.raises(ConfigError, match=r"stages\[1\]: no plugin provides stage 'dpoo' \(known: .*dpo"):
        pm.stages.get("dpoo", where="stages[1]")


def test_blocklist_env_var(monkeypatch):
    monkeypatch.setenv("RAYALIGN_DISABLE_PLUGINS", "dpo, generate")
    pm = PluginManager()
    assert "dpo" not in pm.info and "dpo" not in pm.stages and "sft" in pm.stages


def test_cli_lists_plugins_with_package_and_version():
    out = subprocess.run([sys.executable, "-m", "rayalign.cli", "plugins"], capture_output=True, text=True, check=True)
    lines = out.stdout.splitlines()
    assert any(line.split()[:3] == ["dpo", "rayalign", "0.1.0"] for line in lines), out.stdout
    assert any(line.startswith("stages:") and "sft (sft)" in line for line in lines)
    losses = next(line for line in lines if line.startswith("losses:"))
    for policy_loss in ("clipped_policy", "dapo", "gspo", "dr_grpo", "cispo"):
        assert f" {policy_loss} (rl)" in losses, losses
