"""A plugin the run uses but a node of the cluster cannot import stops the run before any work,
with one line naming the node, the plugin and how to ship it; shipped with the job's runtime
environment, the same run goes through. Real local Ray: the plugin is on the driver's sys.path
only, which Ray's worker processes do not inherit."""

from __future__ import annotations

import ray
import pytest

from rayalign.cluster.plugin_check import PluginModule, check_nodes_import, modules_in_use
from rayalign.config import RunConfig
from rayalign.errors import PluginError
from rayalign.pipeline import run_pipeline
from rayalign.plugins import PluginManager
from test_plugin_kit import fake_distribution

NODELESS = """
from pathlib import Path

from rayalign.hookspecs import hookimpl
from rayalign.stage import Stage, StageConfig, StageResult

class MarkConfig(StageConfig):
    marker: str

class Mark(Stage):
    '''Leaves a marker file: proof that it ran.'''
    name = "mark_nodeless"
    Config = MarkConfig
    needs_model = False

    def run(self, ctx):
        Path(self.config.marker).write_text("ran")
        return StageResult(metrics={"ran": 1})

@hookimpl
def register_stages(register):
    register(Mark)
"""


@pytest.fixture
def site(tmp_path, monkeypatch):
    root = tmp_path / "site"
    root.mkdir()
    fake_distribution(root, "nodeless", NODELESS)
    monkeypatch.syspath_prepend(str(root))  # the driver's only: Ray workers start without it
    yield root
    ray.shutdown()


def _run(tmp_path, model):
    marker = tmp_path / "marker"
    cfg = RunConfig(model=model, output_dir=str(tmp_path / "run"), stages=[{"mark_nodeless": {"marker": str(marker)}}])
    return run_pipeline(cfg, PluginManager()), marker


def test_a_plugin_missing_on_a_node_stops_the_run_in_one_line_before_any_work(site, tmp_path, tiny_model_path):
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, namespace="rayalign-testing")
    with pytest.raises(PluginError) as exc:
        _run(tmp_path, tiny_model_path)
    text = str(exc.value)
    node = ray.nodes()[0]
    assert text.startswith(f"plugin error: nodeless (nodeless): node {node['NodeManagerAddress']} "
                           f"({node['NodeID'][:8]}) cannot import nodeless: ModuleNotFoundError: No module named "
                           "'nodeless'; every node needs the plugins a run uses: ship it with the job (ray job "
                           "submit --runtime-env-json '{\"py_modules\": [\"<path to nodeless>\"]}'"), text
    assert "\n" not in text
    assert not (tmp_path / "marker").exists()  # the stage never ran
    assert not any(p.name[0].isdigit() for p in (tmp_path / "run").iterdir())  # no stage output either


def test_shipped_with_the_runtime_env_the_run_goes_through(site, tmp_path, tiny_model_path):
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, namespace="rayalign-testing",
             runtime_env={"env_vars": {"PYTHONPATH": str(site)}})
    out, marker = _run(tmp_path, tiny_model_path)
    assert marker.read_text() == "ran" and (out / "00-mark_nodeless" / "metrics.json").exists()


def test_the_check_covers_what_the_run_looks_up_and_not_driver_only_kinds(site):
    pm = PluginManager()
    with pm.recording_use() as used:
        pm.stages.get("mark_nodeless", where="stages[0]")
        pm.losses.get("sigmoid", where="stages[1].dpo.loss")
        pm.trackers.get("tensorboard", where="trackers[0]")  # runs on the driver only
    assert used == {"nodeless", "dpo"}
    assert modules_in_use(pm, used) == [PluginModule("dpo", "rayalign", "rayalign_dpo", full_import=False),
                                        PluginModule("nodeless", "nodeless", "nodeless", full_import=True)]
    with pm.recording_use() as later:  # each run records its own
        pass
    assert later == set()


def test_a_built_in_plugin_missing_names_the_image(tmp_path):
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, namespace="rayalign-testing")
    try:
        with pytest.raises(PluginError, match=r"plugin error: rl \(rayalign\): node .* cannot import "
                                              r"rayalign_not_there: ModuleNotFoundError.*install rayalign on every "
                                              r"node \(the image"):
            check_nodes_import([PluginModule("rl", "rayalign", "rayalign_not_there", full_import=False)], 120)
        check_nodes_import([PluginModule("rl", "rayalign", "rayalign_rl", full_import=False)], 120)
    finally:
        ray.shutdown()
