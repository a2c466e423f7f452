"""A generation metric: how often the model shouts."""

from __future__ import annotations

from rayalign.metrics import Metric


class ExclamationRate(Metric):
    """Share of completions that contain an exclamation mark."""

    name = "exclamation_rate"

    def compute(self, prompts, completions, references):
        return sum("!" in c for c in completions) / max(1, len(completions))
