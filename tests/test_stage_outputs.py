"""Stages declare the datasets and models they produce; consumers' names are checked before any work."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
import types

import pytest

from rayalign.config import RunConfig, load_config
from rayalign.errors import ConfigError
from rayalign.hookspecs import hookimpl
from rayalign.plugins import PluginManager, get_plugin_manager
from rayalign.stage import Artifacts, Produces, Stage, StageConfig, StageResult

from conftest import REPO


class MakeRows(Stage):
    """Declares ``rows``; returns it and, undeclared, ``extra``."""

    name = "make_rows"
    needs_model = False

    def produces(self) -> Produces:
        return Produces(datasets=["rows"])

    def run(self, ctx):
        for name in ("rows", "extra"):
            (ctx.work_dir / f"{name}.jsonl").write_text(json.dumps({"n": 1}) + "\n")
        return StageResult(datasets={"rows": "rows.jsonl", "extra": "extra.jsonl"})


class ReadRowsConfig(StageConfig):
    dataset: str = "rows"


class ReadRows(Stage):
    """Consumes an earlier stage's dataset by name."""

    name = "read_rows"
    Config = ReadRowsConfig
    needs_model = False

    def prepare(self, run, plugins, artifacts, index):
        artifacts.expect_dataset(self.config.dataset, f"stages[{index}].read_rows.dataset")

    def run(self, ctx):
        with open(ctx.artifacts.datasets[self.config.dataset]) as fh:
            rows = fh.read().splitlines()
        return StageResult(metrics={"rows": len(rows)})


class NeverRuns(Stage):
    """A first stage that would take long: declares ``pairs`` and ``samples`` and must never run."""

    name = "never_runs"
    needs_model = False

    def produces(self) -> Produces:
        return Produces(datasets=["pairs", "samples"])

    def run(self, ctx):
        raise AssertionError("a stage ran although a later stage's config was wrong")


@hookimpl
def register_stages(register):
    for stage in (MakeRows, ReadRows, NeverRuns):
        register(stage)


def _plugins() -> PluginManager:
    return PluginManager(extra_plugins=(types.SimpleNamespace(register_stages=register_stages),))


def test_artifacts_expect_a_declared_name_and_refuse_another_in_one_line():
    artifacts = Artifacts(will_produce=Produces(datasets=["pairs", "samples"]) + Produces(models=["reward_model"]))
    artifacts.expect_dataset("pairs", "stages[1].dpo.dataset")
    artifacts.expect_model("reward_model", "stages[2].ppo.reward_model")
    with pytest.raises(ConfigError) as err:
        artifacts.expect_dataset("pair", "stages[1].dpo.dataset")
    assert str(err.value) == ("config error: stages[1].dpo.dataset: 'pair' is no key under data:, no file and no "
                              "dataset an earlier stage produces (earlier stages produce: pairs, samples)")
    with pytest.raises(ConfigError, match=r"'rm' is no model directory and no model an earlier stage produces "
                                          r"\(earlier stages produce: reward_model\)"):
        artifacts.expect_model("rm", "stages[2].ppo.reward_model")


def test_a_misspelt_dataset_name_stops_the_run_before_any_stage_runs(tmp_path):
    from rayalign.pipeline import run_pipeline

    out = tmp_path / "run"
    cfg = RunConfig.model_validate({"output_dir": str(out), "stages": [{"never_runs": {}}, {"dpo": {"dataset": "pair"}}]})
    with pytest.raises(ConfigError) as err:
        run_pipeline(cfg, plugins=_plugins())
    message = str(err.value)
    assert "\n" not in message
    assert message == ("config error: stages[1].dpo.dataset: 'pair' is no key under data: and no dataset an earlier "
                       "stage produces (earlier stages produce: pairs, samples)")
    assert not out.exists()  # no output directory, so no stage started


def test_rayalign_run_refuses_a_misspelt_name_of_a_builtin_producer_in_one_line(tmp_path):
    """negatives declares ``pairs``: ``dpo: {dataset: pair}`` fails before mine samples anything."""
    config = tmp_path / "cfg.yaml"
    config.write_text(textwrap.dedent(f"""
        output_dir: {tmp_path / "run"}
        stages:
          - mine: {{n: 1, max_tokens: 8}}
          - detect: {{}}
          - negatives: {{target: repetition}}
          - dpo: {{dataset: pair}}
    """))
    proc = subprocess.run([sys.executable, "-m", "rayalign.cli", "run", str(config)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1] == ("rayalign: config error: stages[3].dpo.dataset: 'pair' is no key under data: and no "
                         "dataset an earlier stage produces (earlier stages produce: samples, knowledge, detections, "
                         "pairs)"), proc.stderr[-3000:]
    assert not (tmp_path / "run").exists()


def test_a_declared_name_passes_and_an_undeclared_one_is_a_warning(tmp_path, caplog, monkeypatch):
    from rayalign.pipeline import STRICT_OUTPUTS, run_pipeline
    from rayalign.testing import start_local_ray

    monkeypatch.setenv(STRICT_OUTPUTS, "1")  # strict is for built-in stages only: these are a test's
    cfg = RunConfig.model_validate({"output_dir": str(tmp_path / "run"),
                                    "stages": [{"make_rows": {}}, {"read_rows": {"dataset": "rows"}}]})
    start_local_ray(num_cpus=1)
    with caplog.at_level(logging.WARNING, logger="rayalign"):
        out = run_pipeline(cfg, plugins=_plugins())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stages"][1]["metrics"]["rows"] == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("stage 'make_rows' returned dataset 'extra' that its produces() does not declare (declared: rows)"
               in w for w in warnings), warnings


def test_a_builtin_stage_returning_an_undeclared_name_raises_when_strict(monkeypatch):
    from rayalign.pipeline import STRICT_OUTPUTS, _check_declared

    plugins = get_plugin_manager()
    result = StageResult(datasets={"generations": "generations.jsonl", "extra": "extra.jsonl"})
    monkeypatch.setenv(STRICT_OUTPUTS, "1")
    with pytest.raises(RuntimeError, match=r"stage 'generate' returned dataset 'extra' that its produces\(\) "
                                           r"does not declare \(declared: generations\)"):
        _check_declared(plugins, "generate", Produces(datasets=["generations"]), result)
    monkeypatch.delenv(STRICT_OUTPUTS)
    _check_declared(plugins, "generate", Produces(datasets=["generations"]), result)  # a warning only


@pytest.mark.parametrize("recipe", sorted(p.name for p in (REPO / "recipes" / "configs").glob("*.yaml")))
def test_every_recipe_names_only_what_earlier_stages_declare(recipe, monkeypatch, tmp_path):
    """Every recipe's prepares pass, names of earlier stages' outputs included (stopped before any work)."""
    import rayalign.pipeline as pipeline

    class Prepared(Exception):
        pass

    def stop(*args, **kwargs):
        raise Prepared

    monkeypatch.setattr(pipeline, "check_training_memory", stop)  # called right after the last prepare
    cfg = load_config(REPO / "recipes" / "configs" / recipe, [f"output_dir={tmp_path / 'run'}"])
    with pytest.raises(Prepared):
        pipeline.run_pipeline(cfg)
