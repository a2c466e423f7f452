"""Options every built-in tracker shares: the tracker run's display name and tags."""

from __future__ import annotations

from pydantic import Field

from rayalign.tracking import TrackerConfig


class NamedRunConfig(TrackerConfig):
    run_name: str | None = Field(None, description="display name of the tracker run; null: the output directory's name")
    tags: list[str] = Field([], description="tags of the tracker run")
