"""Built-in preference optimisation: the dpo stage with the sigmoid (DPO), IPO, SimPO and ORPO losses
and unlikelihood, and the kto stage with the KTO loss on unpaired examples."""

from rayalign.hookspecs import hookimpl

from rayalign_dpo.kto import KTOLoss
from rayalign_dpo.kto_stage import KTOStage
from rayalign_dpo.losses import IPOLoss, SigmoidDPOLoss, UnlikelihoodLoss
from rayalign_dpo.orpo import ORPOLoss
from rayalign_dpo.simpo import SimPOLoss
from rayalign_dpo.stage import DPOStage


@hookimpl
def register_stages(register):
    register(DPOStage)
    register(KTOStage)


@hookimpl
def register_losses(register):
    register(SigmoidDPOLoss)
    register(IPOLoss)
    register(SimPOLoss)
    register(ORPOLoss)
    register(KTOLoss)
    register(UnlikelihoodLoss)
