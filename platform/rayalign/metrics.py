"""Generation metrics: a name and a function of prompts, completions and references."""

from __future__ import annotations

from typing import ClassVar, Sequence


class Metric:
    """Base of metrics registered with ``register_metrics``; one float per set of generations."""

    name: ClassVar[str]

    def compute(self, prompts: Sequence[str], completions: Sequence[str], references: Sequence[str | None]) -> float:
        raise NotImplementedError
