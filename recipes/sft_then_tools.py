"""SFT, then online RL (GRPO) whose episodes call a calculator tool: one Ray job.

    python recipes/sft_then_tools.py                      # embedded default, local Ray, CPU minutes
    ray job submit --working-dir . -- python recipes/sft_then_tools.py \
        model=/models/qwen2.5-0.5b-instruct data.sft=/data/tool_sft.jsonl data.prompts=/data/prompts.jsonl

SFT teaches the model to call ``<calc>a*b</calc>`` on some questions; GRPO, with the ``calculator``
environment answering each call and an exact-match reward on the final answer, should raise how
often it calls the tool and how often the answer is right. The recipe prints both, on held-out
questions, before RL (the RL stage's step-0 evaluation) and after it.
Stages and hyperparameters live in configs/sft_then_tools.yaml; any key can be overridden as
key=value (a stage's options by its name: grpo.steps=20).
"""

import json
import sys
from pathlib import Path

from rayalign.cli import exits_cleanly, print_results, recipe_config
from rayalign.config import RunConfig
from rayalign.pipeline import run_pipeline, setup_logging

CONFIG = Path(__file__).parent / "configs" / "sft_then_tools.yaml"
TOOL_USE = "env/multi_turn_rate"  # with the calculator, an episode goes on past its first turn only after a call


def tool_use_report(out: Path) -> dict[str, tuple[float, float]]:
    """Held-out tool-use rate and exact match of the RL stage: (before RL, after it)."""
    stages = json.loads((out / "summary.json").read_text())["stages"]
    evals = next(s for s in stages if s["stage"] in ("grpo", "ppo"))["metrics"]["evals"]
    return {name: (evals[0][key], evals[-1][key]) for name, key in (("tool_use_rate", TOOL_USE),
                                                                   ("exact_match", "exact_match"))}


@exits_cleanly
def main(cfg: RunConfig) -> Path:
    setup_logging()
    out = run_pipeline(cfg, source=str(CONFIG))
    print_results(out)
    print("\n=== tool use, held out: before RL -> after ===")
    for name, (before, after) in tool_use_report(out).items():
        print(f"{name:>14}: {before:.3f} -> {after:.3f}")
    return out


if __name__ == "__main__":
    main(exits_cleanly(recipe_config)(CONFIG, sys.argv[1:]))
