"""Benchmark (f): rayalign SFT scaling 1 -> 2 -> 4 GPUs (DeepSpeed ZeRO-2), efficiency against linear.

    PYTHONPATH=platform:plugins python benchmarks/sft_scaling.py --shape 0.5b --out $OUT   # a 4-GPU host
    PYTHONPATH=platform:plugins python benchmarks/sft_scaling.py --dry-run --out /tmp/bench  # CPU, 1 and 2 ranks

Weak scaling: every rank keeps the per-GPU batch of ``sft_throughput.py`` (its packed rows and
gradient accumulation), so N GPUs train N times the tokens per optimizer step; each N runs the
``rayalign`` side of ``sft_throughput.py`` in its own process (the same code path, same data
generator). Efficiency at N = tokens/s(N) / (N x tokens/s(1)), on median step rates.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

NAME = "sft_scaling"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(common.SHAPES), default="0.5b")
    ap.add_argument("--gpus", default="1,2,4", help="comma-separated rank counts, in order")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--dry-run", action="store_true", help="tiny shape on CPU, 1 and 2 ranks")
    ap.add_argument("--out", default=common.os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--side-timeout", type=float, default=300, help="seconds one rank count may take")
    args = ap.parse_args(argv)
    counts = [int(n) for n in args.gpus.split(",")]
    if args.dry_run:
        args.shape, counts = "tiny", [n for n in counts if n <= 2] or [1, 2]
    have = common.torch_device_count()
    if not args.dry_run and have < max(counts):
        print(f"sft_scaling.py: --gpus {args.gpus} needs {max(counts)} GPUs, this machine has {have}", file=sys.stderr)
        return 2
    runs = {}
    for n in counts:
        argv_n = ["--shape", args.shape, "--gpus", str(n), "--warmup", str(args.warmup), "--steps", str(args.steps)]
        argv_n += ["--dry-run"] if args.dry_run else []
        runs[str(n)] = common.run_side("sft_throughput.py", "rayalign", argv_n, args.side_timeout)
    rate = {n: (r.get("tokens_per_s") or {}).get("per_step", {}).get("median") for n, r in runs.items()}
    base = rate.get("1")
    efficiency = {n: (r / (int(n) * base) if r and base else None) for n, r in rate.items()}
    top = str(max(counts))
    shape = common.SHAPES[args.shape]
    summary = {"tokens_per_s_median": rate, "efficiency_vs_linear": efficiency,
               "mfu_per_gpu": {n: common.mfu(shape, r / int(n)) if r else None for n, r in rate.items()},
               "peak_gib_per_rank": {n: r.get("peak_gib_per_rank") for n, r in runs.items()},
               "target": "efficiency >= 0.85 at 4 GPUs"}
    summary["target_met"] = None if args.dry_run or top != "4" else (efficiency.get("4") or 0) >= 0.85
    common.write_result(args.out, f"{NAME}-{args.shape}", {
        "benchmark": NAME, "dry_run": args.dry_run, "settings": {"gpus": counts, "warmup": args.warmup,
                                                                 "steps": args.steps, "weak_scaling": True},
        "sides": runs, "summary": summary})
    print(common.json.dumps(summary, indent=1, default=float))
    return 0 if all("error" not in r for r in runs.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
