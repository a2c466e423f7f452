"""What a stage is: a typed config, a preflight that loads and checks its inputs, and a run.

The pipeline calls ``prepare`` for every stage before it creates an output directory or starts
a worker, so bad data or a missing model fails the run before any work. ``run`` then writes
into a private temporary directory that the pipeline renames into place only on success.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from rayalign.cluster.runtime import Cluster
    from rayalign.config import RunConfig
    from rayalign.plugins import PluginManager


class StageConfig(BaseModel):
    """Base of every stage's config schema: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


@dataclass
class Artifacts:
    """What earlier stages produced, handed to later ones (latest wins)."""

    model: str | None = None  # Hugging Face directory
    datasets: dict[str, str] = field(default_factory=dict)  # name -> JSONL path
    # Models that serve later stages without becoming the policy (e.g. "reward_model").
    models: dict[str, str] = field(default_factory=dict)  # name -> Hugging Face directory
    lineage: list[dict[str, Any]] = field(default_factory=list)  # (stage, output dir) in order


@dataclass
class StageContext:
    run: "RunConfig"
    plugins: "PluginManager"
    cluster: "Cluster"
    index: int
    name: str
    work_dir: Path  # temporary; becomes the stage's output directory on success
    artifacts: Artifacts
    log: logging.Logger
    checkpoint_dir: Path  # mid-stage checkpoints; kept across restarts, removed on success

    @property
    def actor_prefix(self) -> str:
        return self.name  # actor names read "sft/trainer/0" on the dashboard


@dataclass
class StageResult:
    metrics: dict[str, Any] = field(default_factory=dict)
    model: str | None = None  # relative to the stage dir, when the stage trained a model
    datasets: dict[str, str] = field(default_factory=dict)  # name -> path relative to the stage dir
    models: dict[str, str] = field(default_factory=dict)  # name -> model dir relative to the stage dir


class Stage:
    """Base class for pipeline stages registered with ``register_stages``."""

    name: ClassVar[str]
    Config: ClassVar[type[StageConfig]] = StageConfig
    # Which model the stage needs when it is first in the chain (False: it needs none).
    needs_model: ClassVar[bool] = True

    def __init__(self, config: StageConfig):
        self.config = config

    def prepare(self, run: "RunConfig", plugins: "PluginManager", artifacts: Artifacts, index: int) -> None:
        """Load and validate inputs (data files, prompt sets). Raise ``RayalignError`` on bad input."""

    def run(self, ctx: StageContext) -> StageResult:
        raise NotImplementedError
