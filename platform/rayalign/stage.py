"""What a stage is: a typed config, a preflight that loads and checks its inputs, and a run.

The pipeline calls ``prepare`` for every stage before it creates an output directory or starts
a worker, so bad data or a missing model fails the run before any work. ``run`` then writes
into a private temporary directory that the pipeline renames into place only on success.

Datasets and models pass between stages by name. Because every ``prepare`` runs before any
``run``, a stage declares the names it will produce (``produces``); the pipeline gathers what the
stages before each one declare into ``Artifacts.will_produce``, so a consumer's ``prepare`` can
refuse a misspelt name (``expect_dataset``, ``expect_model``) before any stage runs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Iterable

from pydantic import BaseModel, ConfigDict

from rayalign.errors import ConfigError

if TYPE_CHECKING:
    from rayalign.cluster.runtime import Cluster
    from rayalign.config import RunConfig
    from rayalign.plugins import PluginManager


class StageConfig(BaseModel):
    """Base of every stage's config schema: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class Produces:
    """The named datasets and models a stage declares it returns, known before any stage runs."""

    datasets: tuple[str, ...] = ()
    models: tuple[str, ...] = ()

    def __post_init__(self) -> None:  # accept any iterable of names; keep the first of repeats
        object.__setattr__(self, "datasets", tuple(dict.fromkeys(self.datasets)))
        object.__setattr__(self, "models", tuple(dict.fromkeys(self.models)))

    def __add__(self, other: "Produces") -> "Produces":
        return Produces(self.datasets + other.datasets, self.models + other.models)

    def undeclared(self, result: "StageResult") -> list[str]:
        """What ``result`` returns by name that this declaration lacks, e.g. ``["dataset 'x'"]``."""
        return ([f"dataset {n!r}" for n in result.datasets if n not in self.datasets]
                + [f"model {n!r}" for n in result.models if n not in self.models])


@dataclass
class Artifacts:
    """What earlier stages produced, handed to later ones (latest wins)."""

    model: str | None = None  # Hugging Face directory
    datasets: dict[str, str] = field(default_factory=dict)  # name -> JSONL path
    # Models that serve later stages without becoming the policy (e.g. "reward_model").
    models: dict[str, str] = field(default_factory=dict)  # name -> Hugging Face directory
    lineage: list[dict[str, Any]] = field(default_factory=list)  # (stage, output dir) in order
    # While stage i prepares: what stages 0..i-1 declare they produce (``Stage.produces``). The
    # datasets and models themselves exist only once those stages ran.
    will_produce: Produces = field(default_factory=Produces)

    def expect_dataset(self, name: str, where: str, tried: str = "no key under data:, no file") -> None:
        """In ``prepare``: refuse ``name`` unless an earlier stage declares a dataset of that name.

        ``tried`` says what else the consumer accepted and ``name`` is not, for the one-line error.
        """
        _expect(name, where, tried, "dataset", self.will_produce.datasets)

    def expect_model(self, name: str, where: str, tried: str = "no model directory") -> None:
        """In ``prepare``: refuse ``name`` unless an earlier stage declares a model of that name."""
        _expect(name, where, tried, "model", self.will_produce.models)


def _expect(name: str, where: str, tried: str, kind: str, declared: Iterable[str]) -> None:
    declared = list(declared)
    if name not in declared:
        raise ConfigError(where, f"{name!r} is {tried} and no {kind} an earlier stage produces "
                          f"(earlier stages produce: {', '.join(declared) or 'none'})")


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
        """Load and validate inputs (data files, prompt sets). Raise ``RayalignError`` on bad input.

        A name that only an earlier stage's output can satisfy is checked here with
        ``artifacts.expect_dataset`` / ``expect_model`` against what earlier stages declare.
        """

    def produces(self) -> Produces:
        """The names of the datasets and models ``run`` will return in ``StageResult.datasets`` /
        ``models`` (none by default). Called once, after this stage's ``prepare``; later stages'
        names are checked against it before any stage runs, and the pipeline warns when ``run``
        returns a name not declared here. The unnamed policy model (``StageResult.model``) needs
        no declaration."""
        return Produces()

    def run(self, ctx: StageContext) -> StageResult:
        raise NotImplementedError
