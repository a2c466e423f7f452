"""The repetition and hallucination fix over several seeds: each seed's before/after table, and
the mean and standard deviation of each metric, with the fix's targets judged on the means.

Runs ``recipes/sft_then_fix.py`` once per seed (the whole recipe: SFT, both fixes, evaluation),
each in its own process and output directory, and reads each run's ``09-evaluate/metrics.json``.
One seed decides the SFT model, the mined samples and every split, so seeds say how much of a
single run's table is the method and how much is the draw; on a CPU the floating-point path of
the machine acts as one more seed.

    python benchmarks/fix_seeds.py                   # seeds 0 1 2, on CPU (about 6 min a seed on 2 cores)
    python benchmarks/fix_seeds.py --seeds 0 1 2 3 4 -- stages.4.dpo.epochs=3   # overrides for every run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
RECIPE = BENCH.parent / "recipes" / "sft_then_fix.py"
# The fix's targets (README, "Fixing repetition and hallucination"): the change from before to
# after, relative or in points, and the bound it must stay at or below ("max") or above ("min").
TARGETS = {
    "repetition_rate": ("relative", "max", -0.5),     # at least halved
    "hallucination_rate": ("relative", "max", -0.3),  # at least -30%
    "accuracy": ("absolute", "min", -0.02),           # at most 2 points lost
    "general_loss": ("relative", "max", 0.05),        # at most +5%
}


def met(metric: str, before: float, after: float) -> bool:
    kind, side, bound = TARGETS[metric]
    if kind == "relative" and not before:
        return False  # nothing to reduce: the failure did not occur, so the fix shows nothing
    change = after - before if kind == "absolute" else (after - before) / before
    return change <= bound if side == "max" else change >= bound


def run_seed(seed: int, out: Path, overrides: list[str]) -> dict:
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, str(RECIPE), f"output_dir={out}", f"seed={seed}", *overrides],
                          capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        return {"seed": seed, "error": (proc.stderr.strip().splitlines() or ["no output"])[-1], "seconds": seconds}
    metrics = json.loads((out / "09-evaluate" / "metrics.json").read_text())["metrics"]
    scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return {"seed": seed, "seconds": seconds, "metrics": scalars}


def summarise(runs: list[dict]) -> dict:
    """Mean and standard deviation of every metric over the seeds that finished; targets on the means."""
    done = [r["metrics"] for r in runs if "metrics" in r]
    keys = sorted({k for m in done for k in m if all(k in other for other in done)})
    stats = {k: {"mean": statistics.fmean(m[k] for m in done),
                 "std": statistics.stdev([m[k] for m in done]) if len(done) > 1 else 0.0} for k in keys}
    targets = {}
    for metric in TARGETS:
        before, after = stats.get(f"{metric}_before"), stats.get(metric)
        if before and after:
            targets[metric] = {"before_mean": before["mean"], "after_mean": after["mean"],
                               "met_on_means": met(metric, before["mean"], after["mean"]),
                               "met_per_seed": [met(metric, m[f"{metric}_before"], m[metric]) for m in done]}
    return {"seeds_finished": len(done), "stats": stats, "targets": targets}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default=os.environ.get("OUT", str(BENCH / "results")), help="directory for the result JSON")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every run (after --)")
    args = parser.parse_args()
    sys.path.insert(0, str(BENCH))
    import common

    runs = []
    with tempfile.TemporaryDirectory(prefix="rayalign-fix-seeds-") as tmp:
        for seed in args.seeds:
            run = run_seed(seed, Path(tmp) / f"seed{seed}", args.overrides)
            print(json.dumps(run), flush=True)
            runs.append(run)
    common.write_result(args.out, "fix_seeds", {
        "settings": {"seeds": args.seeds, "overrides": args.overrides, "recipe": "recipes/sft_then_fix.py",
                     "cpus": len(os.sched_getaffinity(0))},
        "targets": {k: {"change": kind, "side": side, "bound": bound} for k, (kind, side, bound) in TARGETS.items()},
        "runs": runs,
        "summary": summarise(runs),
    })


if __name__ == "__main__":
    main()
