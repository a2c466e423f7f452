"""Model evaluation: the ``evaluate_model`` stage.

Exact match with configurable answer extraction on a QA benchmark, multiple choice by
log-likelihood, held-out loss and perplexity, repetition and hallucination rates from the detector
plugins, a fixed sample sheet, and a comparison table across the stages of a run. (The ``evaluate``
stage of ``rayalign_fixes`` is the before/after table of the repetition/hallucination fix.)
"""

from rayalign.hookspecs import hookimpl

from rayalign_eval.stage import EvaluateModelStage


@hookimpl
def register_stages(register):
    register(EvaluateModelStage)
