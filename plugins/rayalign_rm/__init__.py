"""Built-in reward-model stage: Bradley-Terry training on preference pairs."""

from rayalign.hookspecs import hookimpl

from rayalign_rm.loss import BradleyTerryLoss
from rayalign_rm.stage import RewardModelStage


@hookimpl
def register_stages(register):
    register(RewardModelStage)


@hookimpl
def register_losses(register):
    register(BradleyTerryLoss)
