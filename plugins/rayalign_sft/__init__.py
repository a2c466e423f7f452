"""Built-in supervised fine-tuning stage and its cross-entropy loss."""

from rayalign.hookspecs import hookimpl

from rayalign_sft.loss import CrossEntropyLoss
from rayalign_sft.stage import SFTStage


@hookimpl
def register_stages(register):
    register(SFTStage)


@hookimpl
def register_losses(register):
    register(CrossEntropyLoss)
