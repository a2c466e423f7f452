"""SFT, then fix repetition, then fix hallucination, with negative samples; then a before/after table.

    python recipes/sft_then_fix.py                       # embedded knowledge task, local Ray, CPU
    ray job submit --working-dir . -- python recipes/sft_then_fix.py \
        model=/models/qwen2.5-0.5b data.sft=/data/sft.jsonl \
        stages.1.mine.prompts=/data/mine.jsonl stages.1.mine.knowledge=/data/kb.jsonl ...

Each fix is mine (sample N answers per prompt with vLLM) -> detect (detector plugins) ->
negatives (preference pairs with provenance) -> dpo (on those pairs, optionally with an
unlikelihood term on looping answers). Stages and hyperparameters live in configs/sft_then_fix.yaml;
stages that appear twice are overridden by position (stages.4.dpo.lr=1e-5).
"""

import sys
from pathlib import Path

from rayalign.cli import exits_cleanly, recipe_config
from rayalign.config import RunConfig
from rayalign.pipeline import run_pipeline, setup_logging

CONFIG = Path(__file__).parent / "configs" / "sft_then_fix.yaml"


@exits_cleanly
def main(cfg: RunConfig) -> Path:
    setup_logging()
    out = run_pipeline(cfg, source=str(CONFIG))
    reports = sorted(out.glob("*-evaluate/report.md"))
    if reports:  # the before/after table, last thing in the job log
        print("\n=== before/after ===")
        print(reports[-1].read_text())
    print(f"outputs: {out}")
    return out


if __name__ == "__main__":
    main(exits_cleanly(recipe_config)(CONFIG, sys.argv[1:]))
