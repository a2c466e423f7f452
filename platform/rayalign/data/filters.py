"""Quality filters for data curation: the base class plugins subclass, and a uniform record view.

A filter sees every record as an :class:`Example` (chat and preference records alike) and says
why it drops it, or ``None`` to keep it. Filters are plugins (hook ``register_filters``); the
``curate`` stage runs the ones its ``filters:`` list names, with ``filter_options.<name>``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError

from rayalign.errors import ConfigError


class FilterConfig(BaseModel):
    """Base of a filter's options; unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class Example:
    """One canonical record as filters and reports see it.

    ``messages`` is the conversation (for a preference pair: the prompt and the chosen answer);
    ``prompt`` joins the system and user turns, ``response`` the assistant turns.
    """

    messages: tuple[dict[str, str], ...]
    record: dict[str, Any]  # the canonical record itself
    source: str = ""

    @classmethod
    def of(cls, record: dict[str, Any], source: str = "") -> "Example":
        if "messages" in record:
            messages = record["messages"]
        else:  # preference: what a model trained on the pair learns to say
            messages = record["prompt"] + record["chosen"]
        return cls(tuple(messages), record, source)

    @property
    def prompt(self) -> str:
        return "\n".join(m["content"] for m in self.messages if m["role"] != "assistant")

    @property
    def response(self) -> str:
        return "\n".join(m["content"] for m in self.messages if m["role"] == "assistant")

    @property
    def rejected(self) -> str | None:
        rejected = self.record.get("rejected")
        return None if rejected is None else "\n".join(m["content"] for m in rejected)


class Filter:
    """Base of quality filters registered with ``register_filters``."""

    name: ClassVar[str]
    Config: ClassVar[type[FilterConfig]] = FilterConfig

    def __init__(self, config: FilterConfig | None = None):
        self.config = config if config is not None else self.Config()

    def reject(self, example: Example) -> str | None:
        """Why ``example`` is dropped (a short reason counted in the report), or None to keep it."""
        raise NotImplementedError


def build_filters(registry, names: list[str], options: dict[str, dict], where: str) -> list[Filter]:
    """Instantiate the named filters with their options; unknown names or options are config errors."""
    unused = set(options) - set(names)
    if unused:
        raise ConfigError(f"{where}.filter_options", f"options for filters not in `filters`: {', '.join(sorted(unused))}")
    out = []
    for name in names:
        cls = registry.get(name, where=f"{where}.filters")
        try:
            out.append(cls(cls.Config.model_validate(options.get(name, {}))))
        except ValidationError as exc:
            err = exc.errors()[0]
            key = ".".join(str(p) for p in err["loc"])
            raise ConfigError(f"{where}.filter_options.{name}.{key}", err["msg"]) from None
    return out
