"""Options of registered things (losses, rewards, metrics, advantage estimators): one mechanism.

Each registrable kind declares its options as a pydantic model with unknown keys forbidden: a
``Config`` (or, for losses, ``Options``) class, or one derived from a callable's typed keyword
parameters when the plugin declares none (``signature_schema``). ``validate_options`` checks what
a config gives against that model and turns the first problem into one line that names the key
(``stages[2].grpo.rewards[0].options.patern: unknown option of reward 'exact_match' (its options:
pattern)``).

A stage config names registered things inside its own fields (an RL stage's ``rewards[k]``, the
generate stage's ``metrics``). Such a config model, or any model nested in it, defines
``check_plugins(plugins, where)``; ``check_registered`` calls every one of them with its key path
right after the stage configs are validated, so a misspelt name or option stops the run before
any output directory or Ray worker exists.
"""

from __future__ import annotations

import inspect
import typing
from typing import Any, Callable, Iterable

from pydantic import BaseModel, ConfigDict, ValidationError, create_model

from rayalign.errors import ConfigError


class PluginConfig(BaseModel):
    """Base of a registered thing's declared options; unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


def signature_schema(fn: Callable, model_name: str, skip: Iterable[str] = ()) -> type[BaseModel]:
    """A pydantic model of ``fn``'s keyword parameters, their annotations and defaults.

    ``skip`` names the parameters the caller fills itself (``self``, a reward's ``prompt``...).
    A ``**kwargs`` catch-all adds nothing: an option must be a named parameter, so a misspelt one
    is an error rather than an argument the function never reads.
    """
    skip = set(skip) | {"self"}
    try:
        hints = typing.get_type_hints(fn, include_extras=True)  # Annotated[float, Field(gt=0)] keeps its bound
    except Exception:  # an annotation that does not resolve: the parameter takes any value
        hints = {}
    fields = {}
    for param in inspect.signature(fn).parameters.values():
        if param.name in skip or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD, param.POSITIONAL_ONLY):
            continue
        default = ... if param.default is param.empty else param.default
        fields[param.name] = (hints.get(param.name, Any), default)
    return create_model(model_name, __config__=ConfigDict(extra="forbid"), **fields)


def validate_options(schema: type[BaseModel], given: dict[str, Any], where: str, kind: str, name: str) -> BaseModel:
    """``given`` validated against ``schema``; the first problem is a ConfigError naming ``where.<key>``."""
    try:
        return schema.model_validate(given)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        message = "unknown option" if err["type"] == "extra_forbidden" else err["msg"]
        known = ", ".join(schema.model_fields) or "none"
        raise ConfigError(f"{where}.{key}" if key else where,
                          f"{message} of {kind} {name!r} (its options: {known})") from None


def check_registered(model: Any, plugins: Any, where: str) -> None:
    """Call ``check_plugins(plugins, where)`` on ``model`` and every pydantic model nested in it."""
    check = getattr(model, "check_plugins", None)
    if callable(check):
        check(plugins, where)
    if not isinstance(model, BaseModel):
        return
    for key in type(model).model_fields:
        value = getattr(model, key)
        if isinstance(value, BaseModel):
            check_registered(value, plugins, f"{where}.{key}")
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                if isinstance(item, BaseModel):
                    check_registered(item, plugins, f"{where}.{key}[{i}]")
        elif isinstance(value, dict):
            for k, item in value.items():
                if isinstance(item, BaseModel):
                    check_registered(item, plugins, f"{where}.{key}.{k}")
