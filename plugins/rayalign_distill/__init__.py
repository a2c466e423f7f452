"""Distillation: the ``distill`` stage writes an SFT dataset of a teacher model's answers.

    distill   questions + few-shot example pairs -> teacher (vLLM rollout workers) -> `distilled`
              chat dataset with provenance per row; then `sft: {dataset: distilled}` trains the student
"""

from rayalign.hookspecs import hookimpl

from rayalign_distill.stage import DistillStage


@hookimpl
def register_stages(register):
    register(DistillStage)
