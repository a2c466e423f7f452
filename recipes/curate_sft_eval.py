"""Curate the data, fine-tune on it, evaluate before and after: one Ray job, three stages.

    python recipes/curate_sft_eval.py                       # embedded default, local Ray
    ray job submit --working-dir . -- python recipes/curate_sft_eval.py model=/models/qwen2.5-0.5b ...

Stages and options live in configs/curate_sft_eval.yaml; any key can be overridden as key=value.
What to look at: the curation report in the log (and 00-curate/report.json), then the comparison
table (comparison.md in the run folder) and the sample sheet (02-evaluate_model/samples.md).
"""

import sys
from pathlib import Path

from rayalign.cli import exits_cleanly, recipe_config
from rayalign.config import RunConfig
from rayalign.pipeline import run_pipeline, setup_logging

CONFIG = Path(__file__).parent / "configs" / "curate_sft_eval.yaml"


@exits_cleanly
def main(cfg: RunConfig) -> Path:
    setup_logging()
    out = run_pipeline(cfg, source=str(CONFIG))
    print((out / "comparison.md").read_text())
    return out


if __name__ == "__main__":
    main(exits_cleanly(recipe_config)(CONFIG, sys.argv[1:]))
