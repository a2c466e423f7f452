"""Built-in online RL: the PPO and GRPO/RLOO stages, their losses, advantage estimators, rule-based rewards
and the ``calculator`` multi-turn environment."""

from rayalign.hookspecs import hookimpl

from rayalign_rl.advantages import ESTIMATORS
from rayalign_rl.calculator import CalculatorEnvironment
from rayalign_rl.losses import POLICY_LOSSES, ClippedValueLoss
from rayalign_rl.rewards import RULE_REWARDS
from rayalign_rl.stage import GRPOStage, PPOStage


@hookimpl
def register_stages(register):
    register(PPOStage)
    register(GRPOStage)


@hookimpl
def register_losses(register):
    for loss in POLICY_LOSSES:
        register(loss)
    register(ClippedValueLoss)


@hookimpl
def register_rewards(register):
    for name, fn in RULE_REWARDS.items():
        register(name, fn)


@hookimpl
def register_advantage_estimators(register):
    for estimator in ESTIMATORS:
        register(estimator)


@hookimpl
def register_environments(register):
    register(CalculatorEnvironment)
