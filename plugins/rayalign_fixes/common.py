"""What the fix stages share: finding inputs among earlier stages' artifacts, detector options, JSONL."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field

from rayalign.data.jsonl import read_jsonl, write_jsonl  # noqa: F401  (the fixes stages import them from here)
from rayalign.errors import ConfigError, DataError
from rayalign.evaluation.detectors import Sample, build_detectors
from rayalign.evaluation.references import KnowledgeBase, load_knowledge
from rayalign.stage import Artifacts, StageConfig, StageContext

DEFAULT_DETECTORS = ["repetition", "contradiction", "unanswerable"]


class DetectorOptions(StageConfig):
    detectors: list[str] = Field(DEFAULT_DETECTORS, description="registered detectors to run")
    detector_options: dict[str, dict[str, Any]] = Field({}, description="per detector: its options")

    def load_detectors(self, plugins, where: str):
        return build_detectors(plugins, self.detectors, self.detector_options, where)


def looks_like_file(value: str) -> bool:
    return value.startswith("synthetic:") or "/" in value or value.endswith(".jsonl")


def expect_input(artifacts: Artifacts, value: str | None, where: str, optional_knowledge: bool = False) -> None:
    """In ``prepare``: a name that is no file must be a dataset an earlier stage declares.

    ``optional_knowledge``: the default ``knowledge`` may go unproduced (``knowledge_input`` then uses none).
    """
    if value is None or looks_like_file(value):
        return
    if optional_knowledge and value == "knowledge" and value not in artifacts.will_produce.datasets:
        return
    artifacts.expect_dataset(value, where, tried="no file")


def resolve_input(ctx: StageContext, value: str, where: str) -> str:
    """An earlier stage's dataset (by name), else a file path or ``synthetic:`` spec as given."""
    if value in ctx.artifacts.datasets:
        return ctx.artifacts.datasets[value]
    if looks_like_file(value):
        if not value.startswith("synthetic:") and not Path(value).exists():
            raise DataError(value, "file does not exist")
        return value
    produced = ", ".join(sorted(ctx.artifacts.datasets)) or "none"
    raise ConfigError(where, f"no earlier stage produced a dataset named {value!r} (produced: {produced})")


def knowledge_input(ctx: StageContext, value: str | None, where: str) -> KnowledgeBase | None:
    """The knowledge base named by ``value``; a default name no stage produced means none."""
    if value is None:
        return None
    if value == "knowledge" and value not in ctx.artifacts.datasets:
        return None  # the mine stage ran without a knowledge base
    return load_knowledge(resolve_input(ctx, value, where), ctx.run.seed)


def read_samples(path: str) -> list[tuple[Sample, dict]]:
    """Samples written by ``mine`` (or ``detect``): the sample and its whole row."""
    out = []
    for i, row in enumerate(read_jsonl(path), start=1):
        try:
            out.append((Sample.from_json(row), row))
        except TypeError as exc:
            raise DataError(f"{path}:{i}", f"not a sample record ({exc})") from None
    if not out:
        raise DataError(path, "no samples in the file")
    return out


def knowledge_rows(kb: KnowledgeBase) -> list[dict]:
    return [{"id": e.id, "name": e.name, "attributes": e.attributes} for e in kb.entities.values()]
