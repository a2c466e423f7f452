"""Multi-turn environments: what answers the model's turns in an RL episode.

An environment is a class registered with ``register_environments``. The RL stages
(``environment: {name: ...}``) make one instance per episode: ``reset(prompt)`` once, then, after
each turn the model samples, ``step(conversation, last_turn_text, last_turn_token_ids)``, which
returns an ``Observation``: the next message (a tool result or a user message, as text to render
with the chat template, or as token ids to append as they are), a reward contribution, and
``done``. The episode runner (``rayalign_rl.multiturn``) keeps the tokens the engine sampled and
appends the observation's tokens after them: the conversation is never re-tokenized.

``stateful = True`` runs each episode's instance in a Ray actor of its own (``actor_options``
are its resources), so a sandbox or a client of an external service can sit behind one; a
stateless environment runs on the driver, in a thread pool.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from rayalign.options import PluginConfig


class EnvironmentConfig(PluginConfig):
    """Base of an environment's declared options (``environment.options`` in a stage); unknown keys
    are errors."""


@dataclass
class Observation:
    """What an environment answers to one model turn.

    ``text`` is rendered as one message of ``role`` with the chat template (the tokens of just that
    message, plus the template's generation prompt); ``token_ids``, when given, are appended as they
    are instead (then the environment owns the generation prompt too). ``reward`` adds to the
    episode's reward; ``done`` ends the episode (its observation is then not appended). ``info``'s
    numeric values are summed per episode and averaged per step as ``env/info/<key>`` metrics.
    """

    text: str | None = None
    token_ids: list[int] | None = None
    role: str = "tool"
    reward: float = 0.0
    done: bool = False
    info: dict[str, Any] = field(default_factory=dict)


class Environment:
    """Base of a multi-turn environment. One instance serves one episode.

    Subclasses set ``name`` (what ``environment.name`` says), may set ``Config`` (a subclass of
    ``EnvironmentConfig``, read as ``self.config``), ``stateful`` and ``actor_options``, and
    implement ``step``; ``reset`` is optional."""

    name: ClassVar[str] = ""
    Config: ClassVar[type[EnvironmentConfig]] = EnvironmentConfig
    stateful: ClassVar[bool] = False  # True: the instance runs in a Ray actor of its own
    actor_options: ClassVar[dict[str, Any]] = {"num_cpus": 0}

    def __init__(self, config: EnvironmentConfig | None = None):
        self.config = config if config is not None else self.Config()

    def reset(self, prompt: list[dict]) -> None:
        """Start an episode on ``prompt`` (its chat messages): set the episode's initial state."""

    def step(self, conversation: list[dict], last_turn_text: str, last_turn_token_ids: list[int]) -> Observation:
        """Answer the model's last turn. ``conversation`` is the episode so far as chat messages
        (prompt, then assistant turns and observations), the last turn included."""
        raise NotImplementedError
