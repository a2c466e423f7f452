"""Experiment trackers: W&B, TensorBoard, MLflow or a plugin's dashboard, fed by the driver.

A run names its trackers at the top level of its config (``trackers: [wandb, tensorboard]``,
options in ``tracker_options.<name>``). They are resolved and their options validated with the
stages, before the output directory exists or Ray starts; a tracker whose package is absent stops
the run there with the ``pip install`` line that fixes it.

One tracker run per pipeline. What each tracker receives, all from the driver (workers never
touch a tracker):

- ``start``: the run's config once, and the state it saved in the output directory on an earlier
  attempt (a run id), so ``resume: true`` continues the same tracker run;
- ``log_scalars``: every optimizer step's numeric metrics (loss, lr, grad_norm, reward, kl, ...)
  as ``NN-<stage>/<metric>``, with the stage's own step as ``NN-<stage>/step`` and the trainers'
  throughput as ``NN-<stage>/throughput_per_s``; then each stage's scalar metrics (its
  ``metrics.json``) as ``NN-<stage>/summary/<metric>``;
- ``log_table``: sample tables (``generations.jsonl``, ``evaluation.jsonl`` of a stage) as
  ``NN-<stage>/<file stem>``, rows of flat dicts.

The stage index in every key keeps two stages of one kind (two ``generate`` stages) apart. Steps
are one global counter per tracker run that every logged step and every stage summary advances,
so they only increase, also across restarts from a checkpoint (a redone stage step gets a new
global step; its stage step says which it was). The counter is saved in ``trackers.json`` in the
output directory, so a resumed run goes on from where the last attempt stopped, and a finished
stage that a resume skips logs nothing again.

Losing a dashboard never loses a training run: a tracker that raises is reported once, in one
warning line naming it, and muted for the rest of the run.
"""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Iterator

from pydantic import BaseModel, ConfigDict

from rayalign.errors import ConfigError
from rayalign.data.jsonl import iter_jsonl

if TYPE_CHECKING:
    from rayalign.config import RunConfig
    from rayalign.plugins import PluginManager

log = logging.getLogger("rayalign")

STATE_FILE = "trackers.json"  # the global step and each tracker's saved state (run ids), for resume
SAMPLE_FILES = ("generations.jsonl", "evaluation.jsonl")  # stage outputs logged as sample tables
MAX_TABLE_ROWS = 100  # a table is a look at the samples, not a copy of the dataset


class TrackerConfig(BaseModel):
    """Base of tracker options (``tracker_options.<name>``); unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


@dataclass
class TrackerRun:
    """What a tracker is told when the run starts."""

    output_dir: Path
    name: str  # the output directory's name: a default display name for the tracker run
    config: dict[str, Any]  # the run's config, as written to config.yaml
    state: dict[str, Any]  # this tracker's saved state: {} on a new run; write run ids into it
    resumed: bool  # an earlier attempt of this run logged to this tracker


class Tracker:
    """Base class of trackers registered with ``register_trackers``.

    Only ``log_scalars`` is required. Every method runs on the driver; one that raises mutes its
    tracker for the rest of the run (with one warning) and never fails the run.
    """

    name: ClassVar[str]
    Config: ClassVar[type[TrackerConfig]] = TrackerConfig
    # The module the tracker imports, checked before any work, and the line that installs it.
    requires: ClassVar[str | None] = None
    install: ClassVar[str | None] = None

    def __init__(self, config: TrackerConfig | None = None):
        self.config = config if config is not None else self.Config()

    def start(self, run: TrackerRun) -> None:
        """Open (or, when ``run.state`` holds a run id, reopen) the tracker run; log the config."""

    def log_scalars(self, metrics: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def log_table(self, key: str, rows: list[dict[str, Any]], step: int) -> None:
        """Rows of flat dicts (str, int, float, bool or None values), all with the same keys."""

    def finish(self, failed: bool) -> None:
        """Flush and close the tracker run; ``failed`` when a stage failed or the run was stopped."""


@dataclass
class LoadedTracker:
    name: str
    plugin: str
    tracker: Tracker


def module_available(module: str) -> bool:
    """Whether ``module`` can be imported (tests replace this to simulate an absent package)."""
    return importlib.util.find_spec(module) is not None


def build_trackers(plugins: "PluginManager", cfg: "RunConfig", source: str = "") -> list[LoadedTracker]:
    """Look the run's trackers up by name, check their packages and validate their options."""
    from pydantic import ValidationError

    from rayalign.config import raise_validation_error

    names = cfg.trackers
    for name in cfg.tracker_options:
        if name not in names:
            raise ConfigError(f"tracker_options.{name}", f"tracker {name!r} is not in trackers: {names}")
    out = []
    for i, name in enumerate(names):
        if name in names[:i]:
            raise ConfigError(f"trackers[{i}]", f"tracker {name!r} is named twice")
        cls = plugins.trackers.get(name, where=f"trackers[{i}]")
        if cls.requires and not module_available(cls.requires):
            fix = cls.install or f"pip install {cls.requires}"
            raise ConfigError(f"trackers[{i}]", f"tracker {name!r} needs the {cls.requires} package, "
                              f"which is not installed: {fix}")
        try:
            config = cls.Config.model_validate(cfg.tracker_options.get(name) or {})
        except ValidationError as exc:
            raise_validation_error(exc, f"tracker_options.{name}", source)
        out.append(LoadedTracker(name, plugins.trackers.owner[name], cls(config)))
    return out


def _scalars(metrics: dict[str, Any], prefix: str) -> dict[str, float]:
    """The numeric values of ``metrics`` (booleans as 0/1) under ``prefix``; lists and text are left out."""
    return {prefix + k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}


def _cell(value: Any) -> Any:
    return value if value is None or isinstance(value, (str, int, float, bool)) else json.dumps(value, default=str)


def read_table(path: Path, limit: int = MAX_TABLE_ROWS) -> list[dict[str, Any]]:
    """The first ``limit`` rows of a JSONL file, nested values as JSON text, every row with every key."""
    rows = [{k: _cell(v) for k, v in row.items()} for row in itertools.islice(iter_jsonl(path), limit)]
    keys = list(dict.fromkeys(k for row in rows for k in row))
    return [{k: row.get(k) for k in keys} for row in rows]


class RunTrackers:
    """The trackers of one pipeline run: its global step, the current stage, muting of failures."""

    def __init__(self, loaded: list[LoadedTracker], out: Path, config: dict[str, Any]):
        self.active = list(loaded)
        self.out, self.config = out, config
        saved = json.loads((out / STATE_FILE).read_text()) if (out / STATE_FILE).exists() else {}
        self.step: int = saved.get("step", 0)
        self.states: dict[str, dict[str, Any]] = saved.get("trackers", {})
        self.prefix = ""

    def _call(self, t: LoadedTracker, method: str, *args: Any) -> None:
        try:
            getattr(t.tracker, method)(*args)
        except Exception as exc:
            text = " ".join(str(exc).split())
            log.warning("tracker %r (plugin %s) failed in %s and is muted for the rest of the run: %s%s",
                        t.name, t.plugin, method, type(exc).__name__, f": {text}" if text else "")
            self.active.remove(t)

    def _each(self, method: str, *args: Any) -> None:
        for t in list(self.active):
            self._call(t, method, *args)

    def _save(self) -> None:
        tmp = self.out / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps({"step": self.step, "trackers": self.states}, indent=2, default=str))
        os.replace(tmp, self.out / STATE_FILE)

    def start(self) -> None:
        for t in list(self.active):
            resumed = t.name in self.states
            state = self.states.setdefault(t.name, {})
            self._call(t, "start", TrackerRun(self.out, self.out.name, self.config, state, resumed))
        self._save()  # the run ids the trackers just chose

    def stage_started(self, index: int, name: str) -> None:
        self.prefix = f"{index:02d}-{name}"

    def train_step(self, step: int, metrics: dict[str, Any], items_per_s: float) -> None:
        scalars = _scalars(metrics, f"{self.prefix}/")
        scalars[f"{self.prefix}/step"] = float(step)
        scalars[f"{self.prefix}/throughput_per_s"] = items_per_s
        self.step += 1
        self._each("log_scalars", scalars, self.step)
        self._save()  # every step, so an attempt killed mid-stage never hands its steps out again

    def stage_finished(self, stage_dir: Path, record: dict[str, Any]) -> None:
        metrics = {"seconds": record.get("seconds"), **record.get("metrics", {})}
        summary = _scalars(metrics, f"{self.prefix}/summary/")
        self.step += 1
        self._each("log_scalars", summary, self.step)
        for filename in SAMPLE_FILES:
            path = stage_dir / filename
            if path.exists() and self.active:
                self._each("log_table", f"{self.prefix}/{path.stem}", read_table(path), self.step)
        self._save()

    def close(self, failed: bool) -> None:
        self._each("finish", failed)


_current: RunTrackers | None = None


@contextlib.contextmanager
def session(loaded: list[LoadedTracker], out: Path, config: dict[str, Any]) -> Iterator[None]:
    """Start the run's trackers, make them the ones the pipeline and training loops feed, and
    finish them on the way out (as failed when a stage raised), before anything else cleans up."""
    global _current
    if not loaded:
        yield
        return
    trackers = RunTrackers(loaded, out, config)
    trackers.start()
    _current = trackers
    failed = True
    try:
        yield
        failed = False
    finally:
        _current = None
        trackers.close(failed)


def stage_started(index: int, name: str) -> None:
    if _current is not None:
        _current.stage_started(index, name)


def record_train_step(step: int, metrics: dict[str, Any], items_per_s: float) -> None:
    """One optimizer step of the running stage (called by ``Progress.update``)."""
    if _current is not None:
        _current.train_step(step, metrics, items_per_s)


def stage_finished(stage_dir: Path, record: dict[str, Any]) -> None:
    """A stage wrote its ``metrics.json`` record into ``stage_dir``: its summary and sample tables."""
    if _current is not None:
        _current.stage_finished(stage_dir, record)
