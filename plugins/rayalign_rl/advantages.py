"""Advantage estimators: how each sampled answer's reward becomes a per-token learning signal.

* ``gae``: PPO's generalised advantage estimation over the answer's tokens with a learned value
  function (Schulman et al. 2016); the per-token reward is the KL penalty to the reference plus the
  sequence reward on the last token.
* ``grpo``: group-relative, no critic: each answer's reward minus its prompt group's mean, divided
  by the group's standard deviation (Shao et al. 2024); TRL's ``scale_rewards="group"``.
* ``rloo``: leave-one-out baseline, no critic: reward minus the mean of the *other* answers to the
  same prompt (Ahmadian et al. 2024).

Group estimators take rewards shaped [prompts, answers per prompt]. Each is registered as an
estimator (``register_advantage_estimators``, ``rayalign.training.advantages``), the classes at
the end of this module, so a plugin's estimator is named in ``advantage:`` exactly like these.
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from rayalign.training.advantages import (AdvantageBatch, AdvantageConfig, AdvantageEstimator, Advantages,
                                          GroupEstimator, build_estimator)

STD_EPS = 1e-4  # TRL's, so an all-equal group gives zero advantages rather than 0/0


def grpo(rewards: np.ndarray, scale: bool = True) -> np.ndarray:
    mean = rewards.mean(axis=1, keepdims=True)
    adv = rewards - mean
    if scale:
        std = rewards.std(axis=1, ddof=1, keepdims=True) if rewards.shape[1] > 1 else np.zeros_like(mean)
        adv = adv / (std + STD_EPS)
    return adv


def rloo(rewards: np.ndarray) -> np.ndarray:
    k = rewards.shape[1]
    if k < 2:
        raise ValueError("rloo needs at least 2 answers per prompt (num_generations >= 2)")
    baseline = (rewards.sum(axis=1, keepdims=True) - rewards) / (k - 1)
    return rewards - baseline



def gae(token_rewards: np.ndarray, values: np.ndarray, gamma: float, lam: float) -> tuple[np.ndarray, np.ndarray]:
    """Advantages and returns of one answer; ``values[t]`` is V of the state before token t, and
    the state after the last token is terminal (value 0)."""
    adv = np.zeros_like(token_rewards)
    last = 0.0
    for t in reversed(range(len(token_rewards))):
        next_value = values[t + 1] if t + 1 < len(values) else 0.0
        delta = token_rewards[t] + gamma * next_value - values[t]
        last = delta + gamma * lam * last
        adv[t] = last
    return adv, adv + values


def whiten(arrays: list[np.ndarray], shift_mean: bool = True) -> list[np.ndarray]:
    """Normalise per-token advantages over the whole batch to unit variance (and zero mean)."""
    flat = np.concatenate(arrays) if arrays else np.zeros(0)
    if flat.size < 2:
        return arrays
    mean, var = flat.mean(), flat.var(ddof=1)
    out = [(a - mean) / np.sqrt(var + 1e-8) for a in arrays]
    return out if shift_mean else [a + mean for a in out]


class GAEConfig(AdvantageConfig):
    gamma: float = Field(1.0, ge=0, le=1, description="discount")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda")
    whiten_advantages: bool = Field(True, description="normalise advantages over the batch")


class GAE(AdvantageEstimator):
    """PPO's generalised advantage estimation over the answer's tokens, with a critic."""

    name = "gae"
    needs_critic = True
    Config = GAEConfig

    def estimate(self, batch: AdvantageBatch) -> Advantages:
        cfg = self.config
        pairs = [gae(r, v, cfg.gamma, cfg.lam) for r, v in zip(batch.token_rewards(), batch.values)]
        advantages, returns = [a for a, _ in pairs], [r for _, r in pairs]
        if cfg.whiten_advantages:
            advantages = whiten(advantages)
        return Advantages(advantages, returns)


class GRPOConfig(AdvantageConfig):
    scale_rewards: bool = Field(True, description="divide by the group's reward std")


class GRPO(GroupEstimator):
    """Group-relative: reward minus the group's mean, over the group's std; no critic."""

    name = "grpo"
    Config = GRPOConfig

    def group_advantages(self, rewards: np.ndarray) -> np.ndarray:
        return grpo(rewards, self.config.scale_rewards)


class RLOO(GroupEstimator):
    """Leave-one-out: reward minus the mean of the other answers to the prompt; no critic."""

    name = "rloo"

    def group_advantages(self, rewards: np.ndarray) -> np.ndarray:
        return rloo(rewards)


ESTIMATORS = (GAE, GRPO, RLOO)


def stage_estimator(plugins, cfg, where: str) -> AdvantageEstimator:
    """The estimator an RL stage's ``advantage:`` names, with the stage settings it declares
    (``scale_rewards``, ``gamma``, ``lam``, ``whiten_advantages``) and its ``advantage_options``."""
    return build_estimator(plugins.advantage_estimators, cfg.advantage, cfg.advantage_options, f"{where}.advantage",
                           f"{where}.advantage_options", stage_options={
                               "scale_rewards": cfg.scale_rewards, "gamma": cfg.gamma, "lam": cfg.lam,
                               "whiten_advantages": cfg.whiten_advantages})
