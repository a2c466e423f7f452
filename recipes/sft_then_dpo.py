"""SFT, then sample answers with vLLM, then DPO, then sample again: one Ray job, four stages.

    python recipes/sft_then_dpo.py                       # embedded demo, local Ray
    ray job submit --working-dir . -- python recipes/sft_then_dpo.py \
        model=/models/qwen2.5-0.5b data.sft=/data/sft.jsonl data.preference=/data/pairs.jsonl \
        output_dir=/shared/runs/qwen-dpo

Stages and hyperparameters live in configs/sft_then_dpo.yaml; any key can be overridden as
key=value (a stage's options by its name: dpo.beta=0.2).
"""

import json
import sys
from pathlib import Path

from rayalign.cli import exits_cleanly, print_results, recipe_config
from rayalign.config import RunConfig
from rayalign.evaluation.text import declines
from rayalign.pipeline import run_pipeline, setup_logging

CONFIG = Path(__file__).parent / "configs" / "sft_then_dpo.yaml"


@exits_cleanly
def main(cfg: RunConfig) -> Path:
    setup_logging()
    out = run_pipeline(cfg, source=str(CONFIG))
    # What a user looks at first: did SFT learn, what does the model say, did DPO help.
    print_results(out)
    print_before_after(out)
    return out


def print_before_after(out: Path) -> None:
    """What DPO changed, in three lines: the answers sampled before and after it on the same
    held-out prompts, and how often the policy prefers the chosen answer of a held-out pair."""
    summary = json.loads((out / "summary.json").read_text())
    names = [s["stage"] for s in summary["stages"]]
    if "dpo" not in names:
        return
    i = names.index("dpo")
    if not (0 < i < len(names) - 1 and names[i - 1] == names[i + 1] == "generate"):
        return
    before, dpo, after = (summary["stages"][k]["metrics"] for k in (i - 1, i, i + 1))
    rows = [[json.loads(line) for line in open(Path(summary["lineage"][k]["dir"]) / "generations.jsonl")]
            for k in (i - 1, i + 1)]
    asked = [r for r in rows[0] if r["reference"] is not None and declines(r["reference"])]
    answerable = [r for r in rows[0] if r["reference"] is not None and not declines(r["reference"])]

    def share(value, n: int) -> str:
        return "-" if value is None or value != value else f"{round(value * n)}/{n}"

    print("\n=== before -> after DPO, held-out prompts ===")
    if asked and answerable:
        print(f"declines about people it was never told about: {share(before['decline_rate'], len(asked))} -> "
              f"{share(after['decline_rate'], len(asked))}; right answers about people it knows: "
              f"{share(before['answered_exact_match'], len(answerable))} -> "
              f"{share(after['answered_exact_match'], len(answerable))}")
    pairs = dpo.get("eval_pairs") or 0
    print(f"held-out pairs where the model prefers the chosen answer: {share(dpo.get('preference_accuracy_before'), pairs)}"
          f" -> {share(dpo.get('preference_accuracy'), pairs)}")
    changed = [(b, a) for b, a in zip(*rows) if b["completion"] != a["completion"]]
    if changed:
        b, a = next(((b, a) for b, a in changed if declines(a["completion"])), changed[0])
        print(f"e.g. {b['prompt'][-1]['content']!r}: {b['completion']!r} -> {a['completion']!r}")


if __name__ == "__main__":
    main(exits_cleanly(recipe_config)(CONFIG, sys.argv[1:]))
