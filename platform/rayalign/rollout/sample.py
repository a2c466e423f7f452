"""Moved to ``rayalign.sampling`` (driver-side code, not part of the engine adapter); kept importable
because plugins outside this repository import ``sample_completions`` from here."""

from rayalign.sampling import sample_completions  # noqa: F401
