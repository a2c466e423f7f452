"""What a detector is, the sample it judges, and the runner that names a detector that fails.

Detectors are plugins (``register_detectors``): the built-in repetition and hallucination checks
live in ``plugins/rayalign_fixes``; a package adds an LLM judge or a retrieval check the same way::

    class JudgeDetector(Detector):
        name = "llm_judge"
        kind = "hallucination"

        class Config(DetectorConfig):
            model: str = "/models/judge"

        def setup(self, ctx, knowledge):       # optional: start workers on ctx.cluster
            ...

        def detect(self, samples, knowledge):  # one Finding (flagged) or None per sample
            return [Finding(rule="judge: contradicts the reference") if ... else None for s in samples]
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict

from rayalign.errors import PluginError

if TYPE_CHECKING:
    from rayalign.evaluation.references import KnowledgeBase
    from rayalign.stage import StageContext

Kind = Literal["repetition", "hallucination"]


@dataclass
class Sample:
    """One sampled answer to a reference prompt, with what is known about the right answer."""

    id: str  # the prompt's id
    prompt: list[dict]
    completion: str
    reference: str
    unanswerable: bool = False
    entity: str | None = None
    attribute: str | None = None
    facts: list[str] = field(default_factory=list)
    sample: int = 0  # which of the N samples of this prompt
    finish_reason: str = "stop"  # "length": cut at the token limit
    num_tokens: int = 0
    model: str = ""  # the model that wrote the completion

    @property
    def key(self) -> str:
        return f"{self.id}#{self.sample}"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> "Sample":
        return cls(**{k: record[k] for k in cls.__dataclass_fields__ if k in record})


@dataclass
class Finding:
    """Why a detector flagged a sample: the rule that fired, in words, and its numbers."""

    rule: str
    details: dict[str, Any] = field(default_factory=dict)


class DetectorConfig(BaseModel):
    """Base of detector options (``detector_options.<name>`` in a stage); unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


class Detector:
    """Base class of detectors registered with ``register_detectors``."""

    name: ClassVar[str]
    kind: ClassVar[Kind]  # what a flag means: the repetition fix and the hallucination fix pick by kind
    Config: ClassVar[type[DetectorConfig]] = DetectorConfig

    def __init__(self, config: DetectorConfig | None = None):
        self.config = config if config is not None else self.Config()

    def setup(self, ctx: "StageContext | None", knowledge: "KnowledgeBase | None") -> None:
        """Load a judge model or an index before ``detect``; ``ctx`` is None outside a stage."""

    def detect(self, samples: list[Sample], knowledge: "KnowledgeBase | None") -> list[Finding | None]:
        raise NotImplementedError


@dataclass
class LoadedDetector:
    name: str
    plugin: str
    detector: Detector

    @property
    def kind(self) -> str:
        return self.detector.kind


def build_detectors(plugins, names: list[str], options: dict[str, dict], where: str) -> list[LoadedDetector]:
    """Look detectors up by name and validate their options (``where`` prefixes config errors)."""
    from pydantic import ValidationError

    from rayalign.config import raise_validation_error
    from rayalign.errors import ConfigError

    registry = plugins.detectors
    for name in options:
        if name not in names:
            raise ConfigError(f"{where}.detector_options.{name}", f"detector {name!r} is not in detectors: {names}")
    out = []
    for i, name in enumerate(names):
        cls = registry.get(name, where=f"{where}.detectors[{i}]")
        try:
            config = cls.Config.model_validate(options.get(name) or {})
        except ValidationError as exc:
            raise_validation_error(exc, f"{where}.detector_options.{name}", "")
        out.append(LoadedDetector(name, registry.owner[name], cls(config)))
    return out


def run_detectors(detectors: list[LoadedDetector], samples: list[Sample], knowledge,
                  ctx=None) -> list[dict[str, Finding]]:
    """Per sample, the findings of every detector that flagged it (detector name -> Finding).

    A detector that raises, or answers with the wrong number of results, stops the run with an
    error naming it and its plugin; nothing is written, since stages write only on success.
    """
    findings: list[dict[str, Finding]] = [{} for _ in samples]
    for d in detectors:
        try:
            d.detector.setup(ctx, knowledge)
            results = list(d.detector.detect(samples, knowledge))
        except Exception as exc:
            raise PluginError(d.plugin, f"detector {d.name!r} raised {exc!r}") from exc
        if len(results) != len(samples):
            raise PluginError(d.plugin, f"detector {d.name!r} returned {len(results)} results for {len(samples)} samples")
        for out, result in zip(findings, results):
            if result is not None:
                if not isinstance(result, Finding):
                    raise PluginError(d.plugin, f"detector {d.name!r} returned {type(result).__name__}, not a Finding")
                out[d.name] = result
    return findings
