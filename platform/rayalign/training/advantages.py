"""Advantage estimators: the contract of what ``register_advantage_estimators`` registers.

An RL stage turns each sampled answer's reward into a per-token learning signal with the
estimator its ``advantage:`` key names. Built in (``plugins/rayalign_rl``): ``gae`` (with a
critic), ``grpo`` and ``rloo`` (group baselines). An estimator declares:

* ``name``: what ``advantage:`` names;
* ``needs_critic``: True when it reads the critic's values (``AdvantageBatch.values``) and returns
  value targets (``Advantages.returns``); the stage starts a critic only for such an estimator;
* ``min_group_size``: the answers per prompt it needs (``num_generations``), checked before any work;
* ``Config``: its options. A stage setting the estimator declares reaches it (``scale_rewards``,
  ``gamma``, ``lam``, ``whiten_advantages``); ``advantage_options`` carries its own;
* ``estimate(batch) -> Advantages``.

``GroupEstimator`` is the base of estimators that compare the answers to one prompt: they
implement ``group_advantages`` on a [prompts, answers] array of sequence rewards.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from rayalign.errors import ConfigError
from rayalign.options import PluginConfig, validate_options


class AdvantageConfig(PluginConfig):
    """Base of an estimator's options; unknown keys are errors."""


@dataclass
class AdvantageBatch:
    """One step's answers, prompt-major: ``group_size`` answers of the first prompt, then the next."""

    rewards: list[float]  # per answer, the weighted sum of its reward terms
    kl: list[np.ndarray]  # per answer and token, log pi_old - log pi_ref (zeros without a reference)
    kl_coef: float  # weight of the KL as a reward penalty; 0 when the KL is a term of the loss
    group_size: int  # answers per prompt (num_generations)
    values: list[np.ndarray] | None = None  # per answer and token, the critic's values (needs_critic)

    def token_rewards(self) -> list[np.ndarray]:
        """Per token: the KL penalty, plus the answer's reward on its last token (an empty answer
        has no token to carry it)."""
        out = []
        for reward, kl in zip(self.rewards, self.kl):
            token = -self.kl_coef * kl
            if token.size:
                token[-1] += reward
            out.append(token)
        return out

    def sequence_rewards(self) -> np.ndarray:
        """Per answer: its reward minus the KL penalty summed over its tokens."""
        return np.array([reward - self.kl_coef * kl.sum() for reward, kl in zip(self.rewards, self.kl)])


@dataclass
class Advantages:
    advantages: list[np.ndarray]  # per answer, one value per token
    returns: list[np.ndarray] | None = None  # per answer and token, the critic's targets (needs_critic)


class AdvantageEstimator:
    """Base of the estimators registered with ``register_advantage_estimators``."""

    name: ClassVar[str]
    needs_critic: ClassVar[bool] = False
    min_group_size: ClassVar[int] = 1
    Config: ClassVar[type[AdvantageConfig]] = AdvantageConfig

    def __init__(self, config: AdvantageConfig | None = None):
        self.config = config if config is not None else self.Config()

    def estimate(self, batch: AdvantageBatch) -> Advantages:
        raise NotImplementedError


class GroupEstimator(AdvantageEstimator):
    """An estimator that compares each answer with the other answers to its prompt; no critic."""

    min_group_size = 2

    def group_advantages(self, rewards: np.ndarray) -> np.ndarray:
        """Advantages shaped like ``rewards``: [prompts, answers per prompt]."""
        raise NotImplementedError

    def estimate(self, batch: AdvantageBatch) -> Advantages:
        scalar = self.group_advantages(batch.sequence_rewards().reshape(-1, batch.group_size)).reshape(-1)
        return Advantages([np.full(len(kl), a, dtype=np.float32) for kl, a in zip(batch.kl, scalar)])


def build_estimator(registry: Any, name: str, options: dict[str, Any], where: str, options_key: str,
                    stage_options: dict[str, Any] | None = None) -> AdvantageEstimator:
    """The registered estimator ``name`` with its options checked. ``stage_options`` are stage
    settings, each passed only to an estimator that declares it; ``options`` must all be its own."""
    cls = registry.get(name, where=where)
    if not (isinstance(cls, type) and issubclass(cls, AdvantageEstimator)):
        raise ConfigError(where, f"{name!r} is not an advantage estimator (a subclass of "
                          "rayalign.training.advantages.AdvantageEstimator)")
    given = {k: v for k, v in (stage_options or {}).items() if k in cls.Config.model_fields}
    given.update(options)
    return cls(validate_options(cls.Config, given, options_key, "advantage estimator", name))
