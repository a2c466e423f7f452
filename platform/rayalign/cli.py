"""``rayalign`` command line, and the argument handling every recipe shares.

    rayalign plugins                 loaded plugins with package, version and hooks
    rayalign plugins show NAME       a stage's config schema with defaults and help
    rayalign run CONFIG [key=value]  run a recipe config's stages as one job
    rayalign report RUN_DIR          (re)write a run's report.html from its outputs
    rayalign estimate-memory ...     per-GPU memory of a training plan, by part, and whether it fits
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path
from typing import Callable

from rayalign.config import RunConfig, load_config
from rayalign.errors import RayalignError


def exits_cleanly(fn: Callable) -> Callable:
    """User errors become one line on stderr and exit status 2, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except RayalignError as exc:
            print(f"rayalign: {exc}", file=sys.stderr)
            sys.exit(exc.exit_code)

    return wrapper


def recipe_config(default_config: Path, argv: list[str]) -> RunConfig:
    """A recipe's config: its YAML (or ``--config FILE``) plus ``key=value`` overrides."""
    parser = argparse.ArgumentParser(description=f"run {default_config.stem}")
    parser.add_argument("--config", default=str(default_config), help="YAML config (default: %(default)s)")
    parser.add_argument("overrides", nargs="*", help="key=value, e.g. model=/models/x dpo.beta=0.2")
    args = parser.parse_args(argv)
    return load_config(args.config, args.overrides)


def print_results(out: Path) -> None:
    """Each stage's scalar metrics, one line per stage: what a user reads first in the job log."""
    import json

    print("\n=== results ===")
    for record in json.loads((out / "summary.json").read_text())["stages"]:
        metrics = {k: v for k, v in record["metrics"].items() if isinstance(v, (int, float, str)) or v is None}
        print(f"{record['stage']:>12}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                     for k, v in metrics.items()))
    print(f"outputs: {out}")



# What `rayalign plugins` lists after the plugins themselves, in this order.
LISTED_KINDS = ("stages", "losses", "metrics", "rewards", "advantage_estimators", "formats", "detectors", "filters",
                "trackers", "environments")


def cmd_plugins(args) -> None:
    from rayalign.plugins import get_plugin_manager

    pm = get_plugin_manager()
    if args.action == "show":
        print(describe(pm, args.name))
        return
    pm.stages  # runs every plugin's hooks first, so a plugin they set aside is listed as BROKEN
    for info in sorted(pm.info.values(), key=lambda i: i.name):
        status = f"BROKEN: {info.error}" if info.broken else f"hooks: {', '.join(info.hooks)}"
        print(f"{info.name:<24} {info.package} {info.version}  {status}")
    for kind in LISTED_KINDS:
        registry = getattr(pm, kind)
        print(f"{kind}: {', '.join(f'{n} ({registry.owner[n]})' for n in registry) or '-'}")


def describe(pm, name: str) -> str:
    """A stage's config schema (key, type, default, help), or what a loss/metric/reward/... is."""
    from rayalign.rewards import reward_schema

    found = []  # one name may be a stage and an estimator (grpo), a metric and a reward (exact_match)
    if name in pm.stages:
        stage = pm.stages.get(name, where=name)
        lines = [f"stage {name} (plugin {pm.stages.owner[name]}): {first_line(stage.__doc__)}", "", "options:"]
        lines += schema_lines(stage.Config)
        found.append("\n".join(lines))
    for kind, registry in (("loss", pm.losses), ("metric", pm.metrics), ("reward", pm.rewards),
                           ("data format", pm.formats), ("detector", pm.detectors),
                           ("filter", pm.filters), ("tracker", pm.trackers),
                           ("advantage estimator", pm.advantage_estimators),
                           ("environment", pm.environments)):
        if name in registry:
            item = registry.get(name, where=name)
            text = f"{kind} {name} (plugin {registry.owner[name]}): {first_line(item.__doc__)}"
            if kind == "loss":  # what a stage checks before taking it
                text += (f"\n  family: {getattr(item, 'family', 'none declared')}"
                         + (f", needs_reference: {item.needs_reference}, uses_mean_logps: {item.uses_mean_logps}"
                            if getattr(item, "family", None) == "preference" else ""))
            if kind == "advantage estimator":
                text += f"\n  needs_critic: {item.needs_critic}, min_group_size: {item.min_group_size}"
            if kind == "environment":
                text += f"\n  stateful: {item.stateful}"
            # losses: Options; a reward without a declared Config: its keyword parameters
            schema = reward_schema(item) if kind == "reward" else (getattr(item, "Config", None)
                                                                   or getattr(item, "Options", None))
            options = schema_lines(schema) if schema is not None else []
            found.append("\n".join([text, "", "options:"] + options) if options else text)
    if found:
        return "\n\n".join(found)
    pm.stages.get(name, where="plugins show")  # raises, listing the known stages
    raise AssertionError("unreachable")


def first_line(doc: str | None) -> str:
    return (doc or "").strip().splitlines()[0] if (doc or "").strip() else ""


def type_name(annotation) -> str:
    """``float``, ``list[str]``, ``Literal[2, 3]``, ``LoraOptions | None``: as a user would write it."""
    import re

    if isinstance(annotation, type) and not getattr(annotation, "__args__", None):
        return annotation.__name__
    return re.sub(r"\b[\w.]+\.(\w+)", r"\1", str(annotation))


def schema_lines(model, prefix: str = "  ") -> list[str]:
    from pydantic import BaseModel

    lines = []
    for key, field in model.model_fields.items():
        annotation = type_name(field.annotation)
        default = "required" if field.is_required() else f"default {field.default!r}"
        help_text = f"  {field.description}" if field.description else ""
        lines.append(f"{prefix}{key}: {annotation} ({default}){help_text}")
        nested = [a for a in getattr(field.annotation, "__args__", (field.annotation,))
                  if isinstance(a, type) and issubclass(a, BaseModel)]
        for sub in nested:
            lines += schema_lines(sub, prefix + "  " + key + ".")
    return lines


def cmd_run(args) -> None:
    from rayalign.pipeline import run_pipeline

    cfg = load_config(args.config, args.overrides)
    if args.resume:
        cfg.resume.enabled = True
    run_pipeline(cfg, source=args.config)


def cmd_report(args) -> None:
    from rayalign.report import write_report

    run_dir = Path(args.run_dir)
    if not (run_dir / "summary.json").exists() and not any(run_dir.glob("[0-9][0-9]-*/metrics.json")):
        raise RayalignError(f"report: {run_dir}: not a run directory (no summary.json and no finished stage)")
    print(write_report(run_dir))


def cmd_estimate_memory(args) -> None:
    from rayalign.memory import ModelShape, TrainingPlan, estimate, kv_cache_tokens

    plan = TrainingPlan(method=args.method, zero=args.zero, gpus=args.gpus, seq=args.seq, micro_batch=args.micro_batch,
                        grad_ckpt=args.grad_ckpt, lora_r=args.lora_r, gpu_memory_gib=args.gpu_memory,
                        vllm_fraction=args.vllm_colocated)
    est = estimate(ModelShape.from_dir(args.model), plan)
    print(est.table())
    if est.vllm:
        print(f"vLLM KV cache holds about {kv_cache_tokens(est)} tokens")
    if not est.fits:
        sys.exit(1)


@exits_cleanly
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="rayalign")
    sub = parser.add_subparsers(dest="command", required=True)
    plugins = sub.add_parser("plugins", help="list loaded plugins, or `plugins show NAME` for a stage's options")
    plugins.add_argument("action", nargs="?", choices=["list", "show"], default="list")
    plugins.add_argument("name", nargs="?")
    plugins.set_defaults(fn=cmd_plugins)
    run = sub.add_parser("run", help="run a config's stages")
    run.add_argument("config")
    run.add_argument("overrides", nargs="*")
    run.add_argument("--resume", action="store_true", help="skip stages already finished in output_dir")
    run.set_defaults(fn=cmd_run)
    report = sub.add_parser("report", help="(re)write RUN_DIR/report.html from the run's outputs")
    report.add_argument("run_dir")
    report.set_defaults(fn=cmd_report)
    mem = sub.add_parser("estimate-memory", help="per-GPU memory of a training plan, by part; exit 1 if it does not fit")
    mem.add_argument("--model", required=True, help="Hugging Face model directory (its config.json is read)")
    mem.add_argument("--method", choices=["full", "lora", "qlora"], default="full")
    mem.add_argument("--zero", type=int, choices=[0, 1, 2, 3], default=2, help="DeepSpeed ZeRO stage")
    mem.add_argument("--gpus", type=int, default=1, help="trainer GPUs (data parallel)")
    mem.add_argument("--seq", type=int, default=2048, help="tokens per sequence")
    mem.add_argument("--micro-batch", type=int, default=1, help="sequences per micro-batch per GPU")
    mem.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing")
    mem.add_argument("--lora-r", type=int, default=16, help="LoRA rank (lora, qlora)")
    mem.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU (default: %(default)s)")
    mem.add_argument("--vllm-colocated", type=float, default=0.0, metavar="FRACTION",
                     help="share of the GPU a colocated vLLM engine takes (its gpu_memory_utilization)")
    mem.set_defaults(fn=cmd_estimate_memory)
    args = parser.parse_args(argv)
    if args.command == "plugins" and args.action == "show" and not args.name:
        parser.error("plugins show needs a NAME")
    args.fn(args)


if __name__ == "__main__":
    main()
