"""Reward functions: what ``register_rewards`` registers, and how a reward's options are declared.

A reward is ``fn(prompt, completion, reference=None, **options) -> float``. Its options are a
pydantic model, like every registered kind's (``rayalign.options``):

* declared: ``fn.Config``, a subclass of ``RewardConfig`` (set it with ``@reward_config(...)``),
  whose fields' defaults and descriptions ``rayalign plugins show <reward>`` prints;
* otherwise taken from the function's named keyword parameters after ``reference``, with their
  annotations and defaults. A ``**kwargs`` catch-all takes no option: a key the function does not
  name is refused as misspelt instead of being passed to a function that never reads it.

A stage checks a reward's options with the rest of the config (``reward_options``) and calls the
function with every option of the model, defaults included.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

from pydantic import BaseModel

from rayalign.errors import PluginError
from rayalign.options import PluginConfig, signature_schema, validate_options

CALL_ARGUMENTS = ("prompt", "completion", "reference")  # what the stage passes; never options


class RewardConfig(PluginConfig):
    """Base of a reward's declared options; unknown keys are errors."""


def reward_config(config: type[RewardConfig]) -> Callable[[Callable], Callable]:
    """Declare a reward function's options: ``@reward_config(MyOptions)`` above ``def my_reward``."""
    def declare(fn: Callable) -> Callable:
        fn.Config = config
        return fn
    return declare


def reward_schema(fn: Callable) -> type[BaseModel]:
    """The reward's options model: its declared ``Config``, else its keyword parameters."""
    declared = getattr(fn, "Config", None)
    if declared is not None:
        return declared
    return signature_schema(fn, f"{getattr(fn, '__name__', 'reward')}_options", skip=CALL_ARGUMENTS)


def reward_options(plugins: Any, name: str, options: dict[str, Any], where: str) -> dict[str, Any]:
    """The options of reward ``name`` (``where`` is its config entry), checked against its schema;
    every option of the schema, defaults included, as the keyword arguments to call it with."""
    fn = plugins.rewards.get(name, where=f"{where}.name")
    schema = reward_schema(fn)
    validated = validate_options(schema, options, f"{where}.options", "reward", name)
    params = inspect.signature(fn).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        taken = [k for k in schema.model_fields if k not in params]
        if taken:
            raise PluginError(plugins.rewards.owner[name], f"reward {name!r} declares options its function does "
                              f"not take: {', '.join(taken)}")
    return validated.model_dump()
