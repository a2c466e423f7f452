"""Fix repetition and hallucination after SFT with negative samples.

Stages that chain after SFT, each usable on its own:

    mine       sample N answers per prompt of a reference prompt set (vLLM rollout workers)
    detect     run detector plugins over the samples; record which rule flagged what
    negatives  preference pairs: flagged samples and synthetic negatives as rejected, references
               (or clean samples) as chosen, with provenance per pair
    dpo        (rayalign_dpo) DPO on those pairs, ``dataset: pairs``; ``unlikelihood: 0.5`` adds an
               unlikelihood term on the repeated tokens of looping answers
    evaluate   before/after table on held-out prompts: repetition, hallucination, declines,
               accuracy, held-out general loss

Detectors are plugins too (``register_detectors``): ``repetition``, ``contradiction`` and
``unanswerable`` are built in.
"""

from rayalign.hookspecs import hookimpl

from rayalign_fixes.detect import DetectStage
from rayalign_fixes.detectors import ContradictionDetector, RepetitionDetector, UnanswerableDetector
from rayalign_fixes.evaluate import EvaluateStage
from rayalign_fixes.mine import MineStage
from rayalign_fixes.negatives import NegativesStage


@hookimpl
def register_stages(register):
    register(MineStage)
    register(DetectStage)
    register(NegativesStage)
    register(EvaluateStage)


@hookimpl
def register_detectors(register):
    register(RepetitionDetector)
    register(ContradictionDetector)
    register(UnanswerableDetector)
