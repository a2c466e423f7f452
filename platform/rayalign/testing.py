"""Helpers for plugin authors' tests: a tiny model, a local Ray, ``run_stage`` and assertions.

Use them from your plugin's tests (they are also pytest fixtures once rayalign is installed)::

    from rayalign.testing import run_stage, assert_model_dir

    def test_my_stage(tmp_path, rayalign_ray):
        run = run_stage("my_stage", {"threshold": 0.5}, tmp_path=tmp_path)
        assert run.metrics["my_metric"] > 0

Everything runs on CPU with the embedded tiny model and synthetic data unless you pass your own.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest

from rayalign.config import RunConfig
from rayalign.plugins import PluginManager
from rayalign.data.jsonl import read_jsonl


def tiny_model(seed: int = 0) -> str:
    """Path of the embedded tiny Llama (head_dim 64, chat template), built locally on first use."""
    from rayalign.embedded import embedded_model_path

    return str(embedded_model_path(seed))


def tiny_tokenizer(seed: int = 0):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model(seed))


def start_local_ray(num_cpus: int = 4) -> bool:
    """Start a small local Ray (logical CPUs, no dashboard) unless one is running; True if started."""
    import ray

    if ray.is_initialized():
        return False
    ray.init(num_cpus=num_cpus, include_dashboard=False, namespace="rayalign-testing", log_to_driver=False)
    return True


@dataclass
class StageRun:
    """What one stage left behind: its output directory, ``metrics.json`` record and model."""

    dir: Path
    record: dict[str, Any]

    @property
    def metrics(self) -> dict[str, Any]:
        return self.record["metrics"]

    @property
    def model(self) -> str | None:
        return self.record.get("model")


def run_stage(
    stage: str,
    options: dict[str, Any] | None = None,
    *,
    tmp_path: Path,
    model: str | None = None,
    data: dict[str, Any] | None = None,
    plugins: PluginManager | None = None,
    resources: dict[str, Any] | None = None,
) -> StageRun:
    """Run one stage through the real pipeline (validation, Ray workers, atomic output) and return it.

    ``model`` defaults to the tiny model; ``data`` to the synthetic data (``{"sft": path}`` etc.);
    ``plugins`` lets a test run a plugin module that is not installed:
    ``PluginManager(extra_plugins=(my_module,))``.
    """
    from rayalign.pipeline import run_pipeline

    cfg = RunConfig.model_validate(
        {
            "model": model,
            "output_dir": str(Path(tmp_path) / f"run-{stage}"),
            "data": data or {},
            "resources": resources or {},
            "stages": [{stage: options or {}}],
        }
    )
    start_local_ray()
    out = run_pipeline(cfg, plugins=plugins)
    stage_dir = out / f"00-{stage}"
    return StageRun(stage_dir, json.loads((stage_dir / "metrics.json").read_text()))


def assert_model_dir(path: str | Path) -> None:
    """A Hugging Face model directory that transformers loads, with weights and a tokenizer."""
    from transformers import AutoConfig, AutoTokenizer

    path = Path(path)
    assert (path / "config.json").exists(), f"{path}: no config.json"
    assert list(path.glob("*.safetensors")), f"{path}: no safetensors weights"
    AutoConfig.from_pretrained(path)
    AutoTokenizer.from_pretrained(path)


def assert_jsonl(path: str | Path, fields: list[str], min_rows: int = 1) -> list[dict]:
    """A JSONL artifact whose every row has ``fields``; returns the rows."""
    rows = read_jsonl(path)
    assert len(rows) >= min_rows, f"{path}: {len(rows)} rows, expected at least {min_rows}"
    for i, row in enumerate(rows):
        missing = [f for f in fields if f not in row]
        assert not missing, f"{path}:{i + 1}: missing {missing}"
    return rows


def assert_metrics(run: StageRun, *names: str) -> None:
    """Each named metric is present and a finite number."""
    import math

    for name in names:
        value = run.metrics.get(name)
        assert isinstance(value, (int, float)) and math.isfinite(value), f"metric {name!r} = {value!r}"


# -- pytest fixtures (registered through the `pytest11` entry point) -------------------------


@pytest.fixture(scope="session")
def rayalign_tiny_model() -> str:
    return tiny_model()


@pytest.fixture(scope="session")
def rayalign_ray() -> Iterator[None]:
    import ray

    started = start_local_ray()
    yield
    if started:
        ray.shutdown()
