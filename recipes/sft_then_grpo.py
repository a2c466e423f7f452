"""SFT, a reward model, then online RL (GRPO) with vLLM rollouts and weight sync: one Ray job.

    python recipes/sft_then_grpo.py                       # embedded default, local Ray
    ray job submit --working-dir . -- python recipes/sft_then_grpo.py \
        model=/models/qwen2.5-0.5b data.sft=/data/sft.jsonl data.preference=/data/pairs.jsonl data.prompts=/data/prompts.jsonl

Stages and hyperparameters live in configs/sft_then_grpo.yaml; any key can be overridden as
key=value (a stage's options by its name: grpo.steps=200).
"""

import sys
from pathlib import Path

from rayalign.cli import exits_cleanly, print_results, recipe_config
from rayalign.config import RunConfig
from rayalign.pipeline import run_pipeline, setup_logging

CONFIG = Path(__file__).parent / "configs" / "sft_then_grpo.yaml"


@exits_cleanly
def main(cfg: RunConfig) -> Path:
    setup_logging()
    out = run_pipeline(cfg, source=str(CONFIG))
    # What a user looks at first: did SFT learn, how good is the reward model, did RL raise the reward.
    print_results(out)
    return out


if __name__ == "__main__":
    main(exits_cleanly(recipe_config)(CONFIG, sys.argv[1:]))
