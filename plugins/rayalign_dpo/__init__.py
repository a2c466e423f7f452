"""Built-in direct preference optimisation stage with sigmoid (DPO) and IPO losses, and unlikelihood."""

from rayalign.hookspecs import hookimpl

from rayalign_dpo.losses import IPOLoss, SigmoidDPOLoss, UnlikelihoodLoss
from rayalign_dpo.stage import DPOStage


@hookimpl
def register_stages(register):
    register(DPOStage)


@hookimpl
def register_losses(register):
    register(SigmoidDPOLoss)
    register(IPOLoss)
    register(UnlikelihoodLoss)
