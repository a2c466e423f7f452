"""Generation metrics: a name, declared options and a function of prompts, completions and references."""

from __future__ import annotations

from typing import Any, ClassVar, Sequence

from rayalign.errors import ConfigError
from rayalign.options import PluginConfig, validate_options


class MetricConfig(PluginConfig):
    """Base of a metric's options (a stage's ``metric_options.<name>``); unknown keys are errors."""


class Metric:
    """Base of metrics registered with ``register_metrics``; one float per set of generations.

    ``Config`` declares its options, checked with the rest of the config before any work; the
    metric reads them as ``self.config``.
    """

    name: ClassVar[str]
    Config: ClassVar[type[MetricConfig]] = MetricConfig

    def __init__(self, config: MetricConfig | None = None):
        self.config = config if config is not None else self.Config()

    def compute(self, prompts: Sequence[str], completions: Sequence[str], references: Sequence[str | None]) -> float:
        raise NotImplementedError


def build_metrics(plugins: Any, names: list[str], options: dict[str, dict], where: str) -> list[Metric]:
    """The named metrics with their options (``metric_options.<name>``) checked; ``where`` is the
    stage's key. A name or option that is wrong is a ConfigError naming its key."""
    for name in options:
        if name not in names:
            raise ConfigError(f"{where}.metric_options.{name}", f"metric {name!r} is not in metrics: {names}")
    out = []
    for i, name in enumerate(names):
        cls = plugins.metrics.get(name, where=f"{where}.metrics[{i}]")
        config = validate_options(cls.Config, options.get(name) or {}, f"{where}.metric_options.{name}",
                                  "metric", name)
        # A metric written before metrics had options may define __init__(self): it has nothing to take.
        out.append(cls(config) if cls.Config is not MetricConfig else cls())
    return out
