"""Built-in generation stage (vLLM rollout workers) and generation metrics."""

from rayalign.hookspecs import hookimpl

from rayalign_generate.metrics import AnsweredExactMatch, DeclineRate, Distinct2, ExactMatch, ResponseWords
from rayalign_generate.stage import GenerateStage


@hookimpl
def register_stages(register):
    register(GenerateStage)


@hookimpl
def register_metrics(register):
    register(ResponseWords)
    register(Distinct2)
    register(ExactMatch)
    register(DeclineRate)
    register(AnsweredExactMatch)
