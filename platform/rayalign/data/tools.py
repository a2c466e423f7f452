"""The embedded tool-use task: the arithmetic task's multiplications, answered with a calculator.

A tool-using answer calls the ``calculator`` environment (``rayalign_rl.calculator``), reads its
result and states it on the line the exact-match reward reads (``最终结果是<number>``)::

    user:      计算 47*6
    assistant: <calc>47*6</calc>
    tool:      <result>282</result>
    assistant: 最终结果是282

The rest of the SFT answers state a number with no call: the model's own guess, right for the
questions it has seen. So SFT leaves a model that calls the calculator on some questions only, and
RL with an exact-match reward has something to raise: answers that call the tool are right.
Parts (``synthetic:tools/<part>`` in a config):

* ``sft``: chat examples, ``TOOL_SHARE`` of them calling the calculator, the rest answering directly;
* ``prompts``: questions SFT never showed, with the reference number, for RL;
* ``eval``: held-out questions no other part contains.

Run ``python -m rayalign.data.tools`` to print a few.
"""

from __future__ import annotations

import random

from rayalign.data.arithmetic import FINAL, ArithmeticTask, question
from rayalign.data.synthetic import named_part

SCHEME = "synthetic:tools/"
PARTS = ("sft", "prompts", "eval")
TOOL_SHARE = 0.5


def tool_conversation(a: int, b: int) -> list[dict]:
    """The question, a calculator call, the calculator's answer (as ``calculator`` renders it), the answer."""
    return [{"role": "user", "content": question(a, b)},
            {"role": "assistant", "content": f"<calc>{a}*{b}</calc>"},
            {"role": "tool", "content": f"<result>{a * b}</result>"},
            {"role": "assistant", "content": f"{FINAL}{a * b}"}]


def direct_conversation(a: int, b: int) -> list[dict]:
    return [{"role": "user", "content": question(a, b)}, {"role": "assistant", "content": f"{FINAL}{a * b}"}]


class ToolTask:
    """The arithmetic task's problems (same seed, same splits), answered with or without the calculator."""

    def __init__(self, seed: int = 0, tool_share: float = TOOL_SHARE):
        self.arithmetic = ArithmeticTask(seed)
        self.train_problems = self.arithmetic.train_problems
        rng = random.Random(f"tools-{seed}")
        self.uses_tool = [rng.random() < tool_share for _ in self.train_problems]

    def records(self, part: str) -> list[dict]:
        if part == "sft":
            return [{"messages": (tool_conversation if tool else direct_conversation)(a, b)}
                    for (a, b), tool in zip(self.train_problems, self.uses_tool)]
        if part in ("prompts", "eval"):
            return self.arithmetic.records(part)
        raise KeyError(part)

    def corpus(self) -> list[str]:
        """Text the embedded tokenizer is trained on: the arithmetic corpus and every tool message's words."""
        problems = self.arithmetic.train_problems + self.arithmetic.rl_problems + self.arithmetic.eval_problems
        calls = [" ".join(m["content"] for m in tool_conversation(a, b)) for a, b in problems]
        return self.arithmetic.corpus() + calls + ["<|tool|>"]


def synthetic_records(spec: str, seed: int = 0) -> list[dict]:
    """The records named ``synthetic:tools/<part>``."""
    return ToolTask(seed).records(named_part(spec, SCHEME, PARTS))


if __name__ == "__main__":
    task = ToolTask(0)
    for record in task.records("sft")[:4]:
        print(" | ".join(f"{m['role']}: {m['content']}" for m in record["messages"]))
    print({part: len(task.records(part)) for part in PARTS})
