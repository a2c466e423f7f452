"""The embedded RL task: multi-digit multiplication worked step by step, with a verifiable answer.

Every answer splits both factors into place values, multiplies the parts, adds them up and ends
with ``最终结果是<number>`` ("so, the final result is"), the line the exact-match reward reads::

    Q: 计算 47*6
    A: 把 47 拆成 40+7,6 拆成 6。40*6=240,7*6=42。逐位相加:240+42=282。所以,最终结果是282

The generator is seeded: ``ArithmeticTask(seed).records(part)`` always returns the same problems.
Parts (``synthetic:arithmetic/<part>`` in a config):

* ``sft``: chat examples with the worked answer;
* ``preference``: the worked answer (chosen) against the same work ending in a wrong number
  (rejected), for the reward model (the SFT questions);
* ``prompts``: questions with the reference number, for RL (``reference`` is what the exact-match
  reward compares to): questions SFT never showed, so RL has to generalise, not recall;
* ``eval``: held-out questions no other part contains.

Run ``python -m rayalign.data.arithmetic`` to print a few.
"""

from __future__ import annotations

import random
import re

from rayalign.data.synthetic import named_part

SCHEME = "synthetic:arithmetic/"
PARTS = ("sft", "preference", "prompts", "eval")
FINAL = "最终结果是"
_FINAL_NUMBER = re.compile(FINAL + r"\s*(-?\d+)")


def place_values(n: int) -> list[int]:
    """47 -> [40, 7]; 305 -> [300, 5]; 0 -> [0]."""
    digits = str(n)
    parts = [int(d) * 10 ** (len(digits) - i - 1) for i, d in enumerate(digits) if d != "0"]
    return parts or [0]


def worked_answer(a: int, b: int, final: int | None = None) -> str:
    """The step-by-step answer to ``a*b``; ``final`` replaces the true result (wrong answers)."""
    pa, pb = place_values(a), place_values(b)
    products = [x * y for x in pa for y in pb]
    steps = ",".join(f"{x}*{y}={x * y}" for x in pa for y in pb)
    total = "+".join(map(str, products)) + f"={sum(products)}"
    result = a * b if final is None else final
    return (f"把 {a} 拆成 {'+'.join(map(str, pa))},{b} 拆成 {'+'.join(map(str, pb))}。{steps}。"
            f"逐位相加:{total}。所以,{FINAL}{result}")


def question(a: int, b: int) -> str:
    return f"计算 {a}*{b}"


def final_number(text: str) -> str | None:
    """The number after the last ``最终结果是``, or None when the answer never states one."""
    found = _FINAL_NUMBER.findall(text)
    return found[-1] if found else None


class ArithmeticTask:
    """Seeded multiplication problems: ``digits`` gives the factors' digit counts."""

    def __init__(self, seed: int = 0, digits: tuple[int, int] = (2, 1), num_sft: int = 320, num_eval: int = 64):
        rng = random.Random(f"arithmetic-{seed}")
        lo = lambda d: 10 ** (d - 1) if d > 1 else 2  # noqa: E731  (no *0 or *1 problems)
        pool = [(a, b) for a in range(lo(digits[0]), 10 ** digits[0]) for b in range(lo(digits[1]), 10 ** digits[1])]
        rng.shuffle(pool)
        if len(pool) < num_sft + num_eval + 1:
            raise ValueError(f"only {len(pool)} problems with digits {digits}")
        self.eval_problems = pool[:num_eval]
        self.train_problems = pool[num_eval : num_eval + num_sft]
        self.rl_problems = pool[num_eval + num_sft :]

    def records(self, part: str) -> list[dict]:
        if part == "sft":
            return [{"messages": [{"role": "user", "content": question(a, b)},
                                  {"role": "assistant", "content": worked_answer(a, b)}]}
                    for a, b in self.train_problems]
        if part == "preference":
            rng = random.Random(len(self.train_problems))
            return [{"prompt": question(a, b), "chosen": worked_answer(a, b),
                     "rejected": worked_answer(a, b, final=_near_miss(a * b, rng))}
                    for a, b in self.train_problems]
        if part in ("prompts", "eval"):
            problems = self.rl_problems if part == "prompts" else self.eval_problems
            return [{"prompt": question(a, b), "reference": str(a * b)} for a, b in problems]
        raise KeyError(part)

    def corpus(self) -> list[str]:
        """Text the embedded tokenizer is trained on (every template word and digit appears)."""
        problems = self.train_problems + self.rl_problems + self.eval_problems
        texts = [f"{question(a, b)} {worked_answer(a, b)}" for a, b in problems]
        return texts + ["0123456789"]


def _near_miss(value: int, rng: random.Random) -> int:
    """A wrong result a model might plausibly write: one digit off, or off by a partial product."""
    digits = list(str(value))
    i = rng.randrange(len(digits))
    digits[i] = str((int(digits[i]) + rng.randrange(1, 10)) % 10)
    wrong = int("".join(digits))
    return wrong if wrong != value else value + 10


def synthetic_records(spec: str, seed: int = 0) -> list[dict]:
    """The records named ``synthetic:arithmetic/<part>``."""
    return ArithmeticTask(seed).records(named_part(spec, SCHEME, PARTS))


if __name__ == "__main__":
    task = ArithmeticTask(0)
    for record in task.records("sft")[:3]:
        print("Q:", record["messages"][0]["content"])
        print("A:", record["messages"][1]["content"])
    print({part: len(task.records(part)) for part in PARTS})
