"""rayalign-example: the hooks rayalign finds through this package's entry point."""

from rayalign.hookspecs import hookimpl

from rayalign_example.metrics import ExclamationRate
from rayalign_example.rewards import mentions_reference
from rayalign_example.stage import RewardEvalStage

# The hookspec versions this plugin was written against; rayalign refuses a mismatch clearly.
RAYALIGN_HOOKSPEC = ">=1.0,<2"


@hookimpl
def register_stages(register):
    register(RewardEvalStage)


@hookimpl
def register_rewards(register):
    register("mentions_reference", mentions_reference)


@hookimpl
def register_metrics(register):
    register(ExclamationRate)
