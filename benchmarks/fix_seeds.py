"""The repetition and hallucination fix over several seeds: each seed's before/after table, and
the mean and standard deviation of each metric, with the fix's targets judged on the means.

Runs ``recipes/sft_then_fix.py`` once per seed (the whole recipe: SFT, both fixes, evaluation on
the test split), each in its own process and output directory, and reads each run's
``09-evaluate/metrics.json``. The targets are judged on the independent judges (seq-rep-4, the
fact-table error rate), not on the detectors the fix trains against; those are kept as rows.
One seed decides the SFT model, the mined samples and every split, so seeds say how much of a
single run's table is the method and how much is the draw; on a CPU the floating-point path of
the machine acts as one more seed.

    python benchmarks/fix_seeds.py                   # seeds 0 1 2, on CPU (about 5 min a seed on 2 cores)
    python benchmarks/fix_seeds.py --seeds 0 1 2 3 4 -- stages.4.dpo.epochs=3   # overrides for every run
    python benchmarks/fix_seeds.py --scale 100m --keep /tmp/fix100m   # one GPU: a 100M model from scratch

Scales (``SCALES``): ``tiny`` is the recipe as configured, the embedded 1.6M-parameter model on
CPU. ``100m`` trains a 102M-parameter Qwen2-shaped model from random weights on the same
synthetic world on one GPU (trainer, reference and engine colocated), with the fix stages'
hyperparameters unchanged: only SFT is set up for a larger model learning from scratch.

With ``--keep DIR`` a seed whose evaluation already finished in DIR is read back, not run again,
and an unfinished one resumes from its last finished stage: a run cut short (a time limit, a
lost machine) goes on where it stopped when started again with the same arguments.
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
sys.path.insert(0, str(BENCH))
from processes import stop_process_group  # noqa: E402
RECIPE = BENCH.parent / "recipes" / "sft_then_fix.py"
EVALUATE = "09-evaluate"
OUTCOME = "outcome.json"  # a finished seed's outcome, beside its run directory (--keep reads it back)

# scale -> overrides of the recipe's config for every seed, and where it runs.
SCALES: dict[str, dict] = {
    "tiny": {"device": "cpu", "parallel": 1, "overrides": []},
    # The seeds run side by side on the one GPU, each recipe with its own local Ray: a 100M model
    # leaves the device mostly idle, and one seed alone takes about ten minutes (most of it starting
    # workers and engines).
    "100m": {"device": "one GPU", "parallel": 3, "overrides": [
        "model=embedded:knowledge/qwen2-100m",
        # One GPU for everything: the roles share the trainer's GPU.
        "resources.trainer.num_gpus=1", "resources.colocate=true", "resources.rollout.dtype=bfloat16",
        # A fixed KV cache (a 100M model's 4 GiB holds ~700k tokens): vLLM's memory profiling would
        # read the other seeds' allocations as its own. The share only gates the engine's start.
        "resources.rollout.kv_cache_memory_gib=4", "resources.rollout.gpu_memory_utilization=0.1",
        # Four engines start per seed and each generates for seconds: graphs would cost more to
        # capture than they save.
        "resources.rollout.enforce_eager=true",
        # Every SFT chat is trained on: a fact held out of SFT is one no model can know, and the
        # fix is measured on what the model was taught.
        "data.eval_fraction=0",
        # From random weights: a GPT-2-small-like learning rate, and epochs enough to learn the world
        # (a first run of 40 epochs on an H200 had learned it long before the end).
        "stages.0.sft.lr=5.0e-4", "stages.0.sft.epochs=25", "stages.0.sft.max_tokens_per_micro_batch=512",
    ]},
}


# The fix's targets (README, "Fixing repetition and hallucination"), each on a judge the fix's own
# detectors do not define (rayalign.evaluation.judges): the change from before to after, relative
# or in points, and the bound it must stay at or below ("max") or above ("min").
TARGETS = {
    "seq_rep_4": ("relative", "max", -0.5),        # repetition: at least halved
    "fact_error_rate": ("relative", "max", -0.3),  # hallucination: at least -30%
    "accuracy": ("absolute", "min", -0.02),        # at most 2 points lost
    "general_loss": ("relative", "max", 0.05),     # at most +5%
}


def met(metric: str, before: float, after: float) -> bool:
    kind, side, bound = TARGETS[metric]
    if kind == "relative" and not before:
        return False  # nothing to reduce: the failure did not occur, so the fix shows nothing
    change = after - before if kind == "absolute" else (after - before) / before
    return change <= bound if side == "max" else change >= bound


def launch(seed: int, out: Path, overrides: list[str]) -> subprocess.Popen:
    """The recipe for one seed in its own process (and process group, so a time limit stops its Ray
    too); its output goes to files beside ``out`` (pipes of several processes read one after
    another could fill and stall the others). A run already begun in ``out`` resumes."""
    out.parent.mkdir(parents=True, exist_ok=True)
    resume = ["resume=true"] if out.exists() else []
    if resume:
        print(f"seed {seed}: resuming the run in {out}", flush=True)
    with open(f"{out}.stdout", "a") as stdout, open(f"{out}.stderr", "a") as stderr:
        return subprocess.Popen([sys.executable, str(RECIPE), f"output_dir={out}", f"seed={seed}", *overrides, *resume],
                                stdout=stdout, stderr=stderr, text=True, cwd=RECIPE.parent.parent,
                                start_new_session=True)


def finished(seed: int, out: Path) -> dict | None:
    """The outcome of a seed that finished in an earlier invocation (``--keep``), else None."""
    path = Path(f"{out}.{OUTCOME}")
    if not path.exists():
        return None
    return {**json.loads(path.read_text()), "reused": True}


def outcome(seed: int, out: Path, returncode: int, seconds: float) -> dict:
    if returncode != 0:
        last = (Path(f"{out}.stderr").read_text().strip().splitlines() or ["no output"])[-1]
        return {"seed": seed, "error": last, "seconds": seconds}
    metrics = json.loads((out / EVALUATE / "metrics.json").read_text())["metrics"]
    scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    sft = json.loads(next(out.glob("*-sft/metrics.json")).read_text())["metrics"]
    result = {"seed": seed, "seconds": seconds, "prompts": metrics.get("prompts"), "tuned_on": metrics.get("tuned_on"),
              "metrics": scalars, "sft": {k: v for k, v in sft.items() if isinstance(v, (int, float))}}
    Path(f"{out}.{OUTCOME}").write_text(json.dumps(result))
    return result


def run_seeds(seeds: list[int], root: Path, overrides: list[str], parallel: int = 1,
              timeout: float | None = None) -> list[dict]:
    """Each seed's outcome, in ``root/seed<N>``; up to ``parallel`` recipes at a time; a recipe still
    running ``timeout`` seconds after this started is killed and reported as an error."""
    done = {s: r for s in seeds if (r := finished(s, root / f"seed{s}")) is not None}
    pending, running = [s for s in seeds if s not in done], {}
    deadline = time.perf_counter() + timeout if timeout else None
    while pending or running:
        if deadline is not None and time.perf_counter() > deadline:
            for seed, (proc, started) in running.items():
                stop_process_group(proc)
                done[seed] = {"seed": seed, "error": f"timed out after {timeout:.0f}s",
                              "seconds": time.perf_counter() - started}
            for seed in pending:
                done[seed] = {"seed": seed, "error": "not started: timed out", "seconds": 0.0}
            break
        while pending and len(running) < parallel:
            seed = pending.pop(0)
            running[seed] = (launch(seed, root / f"seed{seed}", overrides), time.perf_counter())
        time.sleep(0.5)
        for seed, (proc, started) in list(running.items()):
            if proc.poll() is not None:
                done[seed] = outcome(seed, root / f"seed{seed}", proc.returncode, time.perf_counter() - started)
                del running[seed]
    return [done[s] for s in seeds]


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
            kind = TARGETS[metric][0]
            delta = after["mean"] - before["mean"]
            if kind == "relative":
                delta = delta / before["mean"] if before["mean"] else None
            targets[metric] = {"before_mean": before["mean"], "after_mean": after["mean"], "change_of_means": delta,
                               "met_on_means": met(metric, before["mean"], after["mean"]),
                               "met_per_seed": [met(metric, m[f"{metric}_before"], m[metric]) for m in done]}
    return {"seeds_finished": len(done), "stats": stats, "targets": targets}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default=os.environ.get("OUT", str(BENCH / "results")), help="directory for the result JSON")
    parser.add_argument("--parallel", type=int, help="recipes at a time (seconds then are not per seed); default: "
                                                     "the scale's")
    parser.add_argument("--scale", choices=list(SCALES), default="tiny", help="model and device (see SCALES)")
    parser.add_argument("--keep", help="keep the runs in this directory, and reuse or resume those already there "
                                       "(default: a temporary one, removed)")
    parser.add_argument("--timeout", type=float, help="stop seeds still running this many seconds after the start; "
                                                      "with --keep they resume when started again")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every run (after --)")
    args = parser.parse_args()
    import common

    overrides = SCALES[args.scale]["overrides"] + args.overrides
    args.parallel = args.parallel or SCALES[args.scale]["parallel"]
    if args.keep:
        runs = run_seeds(args.seeds, Path(args.keep), overrides, args.parallel, args.timeout)
    else:
        with tempfile.TemporaryDirectory(prefix="rayalign-fix-seeds-") as tmp:
            runs = run_seeds(args.seeds, Path(tmp), overrides, args.parallel, args.timeout)
    for run in runs:
        print(json.dumps(run), flush=True)
    summary = summarise(runs)
    for metric, t in summary["targets"].items():
        print(f"{metric}: {t['before_mean']:.4f} -> {t['after_mean']:.4f} (change {t['change_of_means']}) "
              f"{'met' if t['met_on_means'] else 'MISSED'} on the means", flush=True)
    common.write_result(args.out, "fix_seeds" if args.scale == "tiny" else f"fix_seeds-{args.scale}", {
        "settings": {"seeds": args.seeds, "scale": args.scale, "scale_device": SCALES[args.scale]["device"],
                     "overrides": overrides, "recipe": "recipes/sft_then_fix.py",
                     "parallel": args.parallel, "cpus": len(os.sched_getaffinity(0))},
        "targets": {k: {"change": kind, "side": side, "bound": bound} for k, (kind, side, bound) in TARGETS.items()},
        "runs": runs,
        "summary": summary,
    })


if __name__ == "__main__":
    main()
