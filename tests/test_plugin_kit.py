"""What a plugin author relies on: discovery of an installed package, failure isolation,
hookspec versioning, `rayalign plugins show`, and the example plugin used from a recipe config."""

import json
import subprocess
import sys
import textwrap

import pytest

from rayalign.config import RunConfig, validate_stages
from rayalign.errors import ConfigError
from rayalign.hookspecs import HOOKSPEC_VERSION
from rayalign.plugins import PluginManager


def fake_distribution(root, module: str, source: str, entry_point: str | None = None):
    """An installed distribution as importlib.metadata sees one: a module and its dist-info."""
    (root / f"{module}.py").write_text(textwrap.dedent(source))
    info = root / f"{module.replace('_', '-')}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module.replace('_', '-')}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[rayalign]\n{entry_point or module} = {module}\n")


STAGE_PLUGIN = """
from rayalign.hookspecs import hookimpl
from rayalign.stage import Stage

class Shiny(Stage):
    name = "shiny"

@hookimpl
def {hook}(register{extra}):
    register(Shiny)
"""

BROKEN = {
    "import error": ("import missing_dependency_xyz\n", "failed to import 'bad_import_error': ModuleNotFoundError"),
    "misspelt hook": (STAGE_PLUGIN.format(hook="register_stage", extra=""), "unknown hook register_stage"),
    "wrong signature": (STAGE_PLUGIN.format(hook="register_stages", extra=", extra"), "extra"),
    "hookspec version": (
        "RAYALIGN_HOOKSPEC = '>=2'\n" + STAGE_PLUGIN.format(hook="register_stages", extra=""),
        f"supports hookspec versions >=2 but this rayalign provides {HOOKSPEC_VERSION}",
    ),
    "raising hook": (
        "from rayalign.hookspecs import hookimpl\n@hookimpl\ndef register_stages(register):\n    raise RuntimeError('boom')\n",
        "hook register_stages raised RuntimeError('boom')",
    ),
}


@pytest.fixture
def site(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_installed_example_package_is_discovered():
    info = PluginManager().info["example"]
    assert (info.package, info.version) == ("rayalign-example", "0.1.0")
    assert info.hooks == ["register_metrics", "register_rewards", "register_stages"]


def test_a_new_package_is_discovered_through_its_entry_point(site):
    fake_distribution(site, "shiny_plugin", STAGE_PLUGIN.format(hook="register_stages", extra=""))
    pm = PluginManager()
    assert pm.info["shiny_plugin"].package == "shiny-plugin" and pm.stages.owner["shiny"] == "shiny_plugin"


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_plugin_warns_unless_a_run_needs_it(site, case, caplog):
    source, reason = BROKEN[case]
    module = "bad_" + case.replace(" ", "_")  # one module name per case: imports are cached
    package = module.replace("_", "-")
    fake_distribution(site, module, source)
    pm = PluginManager()  # loading never raises for an installed plugin
    assert "sft" in pm.stages  # the rest of the platform works (and every hook has now run)
    assert pm.info[module].broken and reason in pm.info[module].error
    assert any(f"plugin '{module}' (package {package}) is broken" in r.message for r in caplog.records)
    # A run that does not use it validates; one that needs its stage stops, naming it.
    validate_stages(RunConfig(stages=[{"sft": {}}]), pm.stages)
    with pytest.raises(ConfigError, match=rf"stages\[1\]: no plugin provides stage 'shiny'.*'{module}' \(package {package}\) is broken"):
        validate_stages(RunConfig(stages=[{"sft": {}}, {"shiny": {}}]), pm.stages)


def test_a_run_needing_a_broken_plugin_stops_before_any_work(site, tmp_path):
    from rayalign.pipeline import run_pipeline

    fake_distribution(site, "bad_plugin", BROKEN["import error"][0], entry_point="shiny")
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match="package bad-plugin"):
        run_pipeline(RunConfig(output_dir=str(out), stages=[{"shiny": {}}]), plugins=PluginManager())
    assert not out.exists()


def test_blocklisted_plugin_is_not_loaded_and_not_reported(site, monkeypatch, caplog):
    fake_distribution(site, "bad_plugin", BROKEN["import error"][0])
    monkeypatch.setenv("RAYALIGN_DISABLE_PLUGINS", "bad_plugin")
    pm = PluginManager()
    assert "bad_plugin" not in pm.info and not caplog.records


def test_cli_marks_broken_plugins(site):
    fake_distribution(site, "bad_plugin", BROKEN["import error"][0])
    out = subprocess.run([sys.executable, "-m", "rayalign.cli", "plugins"], capture_output=True, text=True,
                         env={"PYTHONPATH": str(site), "PATH": ""}, check=True)
    line = next(l for l in out.stdout.splitlines() if l.startswith("bad_plugin"))
    assert "bad-plugin 0.1  BROKEN: failed to import" in line


def test_plugins_show_prints_a_stage_schema_with_defaults_and_help():
    out = subprocess.run([sys.executable, "-m", "rayalign.cli", "plugins", "show", "reward_eval"],
                         capture_output=True, text=True, check=True).stdout
    assert out.startswith("stage reward_eval (plugin example): Answer held-out prompts greedily")
    assert "  num_prompts: int (default 8)  held-out prompts to answer (at most)" in out
    assert "  rewards: dict[str, float] (default {'mentions_reference': 1.0})  reward name -> weight" in out


@pytest.mark.slow
def test_recipe_config_uses_the_example_stage_and_reports_its_metric(tmp_path):
    config = tmp_path / "cfg.yaml"
    config.write_text(textwrap.dedent(f"""
        output_dir: {tmp_path / "run"}
        stages:
          - reward_eval: {{num_prompts: 3, max_new_tokens: 8, metrics: [exclamation_rate]}}
    """))
    proc = subprocess.run([sys.executable, "-m", "rayalign.cli", "run", str(config)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    metrics = summary["stages"][0]["metrics"]
    assert summary["stages"][0]["stage"] == "reward_eval"
    assert 0.0 <= metrics["exclamation_rate"] <= 1.0 and "mean_reward" in metrics


@pytest.mark.slow
def test_tutorial_copy_rename_install_and_run(tmp_path):
    """docs/writing-plugins.md steps 1-4, as a new author follows them."""
    import shutil

    from conftest import REPO

    src = tmp_path / "rayalign-judge"
    shutil.copytree(REPO / "plugins" / "example", src, ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
    (src / "rayalign_example").rename(src / "rayalign_judge")
    for path in [src / "pyproject.toml", *src.rglob("*.py")]:
        text = path.read_text().replace("rayalign_example", "rayalign_judge").replace("rayalign-example", "rayalign-judge")
        text = text.replace('example = "rayalign_judge"', 'judge = "rayalign_judge"').replace('"reward_eval"', '"judge_eval"')
        # Registered names are global: the example's stay taken while it is installed.
        text = text.replace('"mentions_reference"', '"judge_mentions"').replace('"exclamation_rate"', '"judge_exclamations"')
        path.write_text(text)
    site = tmp_path / "site"  # installed beside, not into, the shared test environment
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(site), str(src)], check=True, capture_output=True, timeout=300)
    env = {**__import__("os").environ, "PYTHONPATH": str(site)}
    listing = subprocess.run([sys.executable, "-m", "rayalign.cli", "plugins"], env=env, capture_output=True,
                             text=True, check=True).stdout
    assert any(l.split()[:3] == ["judge", "rayalign-judge", "0.1.0"] for l in listing.splitlines()), listing
    assert "judge_eval (judge)" in listing
    config = tmp_path / "my_recipe.yaml"
    config.write_text(f"output_dir: {tmp_path / 'run'}\nstages:\n  - judge_eval: {{num_prompts: 2, max_new_tokens: 4}}\n")
    proc = subprocess.run([sys.executable, "-m", "rayalign.cli", "run", str(config)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((tmp_path / "run" / "00-judge_eval" / "metrics.json").read_text())
    assert record["stage"] == "judge_eval" and "judge_exclamations" in record["metrics"]
