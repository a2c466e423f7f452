"""Runs a chain of stages as one job, handing each stage's artifacts to the next.

Order of work, so that bad input costs nothing:
1. validate every stage's config against its plugin's schema;
2. resolve the base model and let every stage load and check its data (``prepare``);
3. only then create the output directory, connect to Ray and run the stages.
Each stage writes into a hidden temporary directory renamed to ``NN-<stage>`` on success, so an
output directory never holds half a stage. With ``resume: true`` finished stages are skipped.
A run ends by writing ``summary.json`` and ``report.html``, also when a stage fails after an
earlier one finished (the failed stage is recorded with its error).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import yaml

from rayalign import telemetry
from rayalign.config import RunConfig, validate_stages
from rayalign.data.validation import DataChecks, Policy, data_checks
from rayalign.errors import ConfigError
from rayalign.memory import check_training_memory
from rayalign.plugins import PluginManager, get_plugin_manager
from rayalign.report import write_report
from rayalign.stage import Artifacts, StageContext

log = logging.getLogger("rayalign")


def setup_logging() -> None:
    if not log.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def resolve_model(cfg: RunConfig) -> str:
    """A local directory, a hub id, or (null, ``embedded:<task>``) the embedded tiny model built on first use."""
    if cfg.model is None or cfg.model.startswith("embedded:"):
        from rayalign.embedded import EMBEDDED_TASKS, embedded_model_path

        task = "knowledge" if cfg.model is None else cfg.model.split(":", 1)[1]
        if task not in EMBEDDED_TASKS:
            raise ConfigError("model", f"{cfg.model!r}: no such embedded model (known: "
                              f"{', '.join('embedded:' + t for t in EMBEDDED_TASKS)})")
        return str(embedded_model_path(cfg.seed, task))
    path = Path(cfg.model).expanduser()
    looks_local = cfg.model.startswith(("/", ".", "~")) or path.exists()
    if looks_local:
        if not path.exists():
            raise ConfigError("model", f"path {cfg.model!r} does not exist")
        if not (path / "config.json").exists():
            raise ConfigError("model", f"{cfg.model!r} is not a Hugging Face model directory (no config.json)")
        return str(path.resolve())
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(cfg.model)
    except Exception as exc:
        raise ConfigError("model", f"cannot load {cfg.model!r} from the hub or cache ({type(exc).__name__})") from None
    return cfg.model


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def run_pipeline(cfg: RunConfig, plugins: PluginManager | None = None, source: str = "") -> Path:
    """Run every stage of ``cfg``; return the output directory."""
    setup_logging()
    plugins = plugins or get_plugin_manager()
    entries = validate_stages(cfg, plugins.stages, source)
    stages = [plugins.stages.get(e.name, where=f"stages[{i}]")(e.config) for i, e in enumerate(entries)]
    artifacts = Artifacts(model=resolve_model(cfg))
    # Each stage's datasets follow data.bad_records; what they skipped lands in its metrics.
    checks = [DataChecks(Policy.of(cfg.data)) for _ in stages]
    for i, stage in enumerate(stages):
        with data_checks(checks[i]):
            stage.prepare(cfg, plugins, artifacts, i)

    check_training_memory(cfg, entries, artifacts.model, log)  # a GPU plan that cannot fit stops here
    out = Path(cfg.output_dir).resolve()
    created = not out.exists()
    if not created and not cfg.resume and any(out.iterdir()):
        raise ConfigError("output_dir", f"{out} already holds a run; set resume=true or choose another output_dir")
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))

    from rayalign.cluster.runtime import Cluster, connect

    connect()
    cluster = Cluster(cfg.resources)
    summary: dict = {"stages": []}
    current, started = "", time.time()
    try:
        for i, (entry, stage) in enumerate(zip(entries, stages)):
            current, started = entry.name, time.time()
            record = _run_stage(cfg, plugins, cluster, out, i, entry.name, stage, artifacts, checks[i])
            summary["stages"].append(record)
    except BaseException as exc:
        if created and not any(p.name[0].isdigit() or p.name == "checkpoints" for p in out.iterdir()):
            shutil.rmtree(out, ignore_errors=True)  # nothing finished or resumable: leave no trace
        else:
            summary["stages"].append({"stage": current, "status": "failed", "seconds": round(time.time() - started, 2),
                                      "error": f"{type(exc).__name__}: {exc}"})
            _finish(out, summary, artifacts)
        raise
    _finish(out, summary, artifacts)
    log.info("run finished: %s", out)
    return out


def _finish(out: Path, summary: dict, artifacts: Artifacts) -> None:
    summary["lineage"] = artifacts.lineage
    _write_json(out / "summary.json", summary)
    try:
        log.info("report: %s", write_report(out))
    except Exception as exc:  # the report is a view of the run; it never fails one
        log.warning("report.html not written: %s: %s", type(exc).__name__, exc)


def _run_with_restarts(stage, ctx: StageContext, max_restarts: int):
    """Run the stage; when a worker dies or hangs, start it again (from its last checkpoint)."""
    from rayalign.errors import WorkerError

    restarts = 0
    while True:
        try:
            result = stage.run(ctx)
            result.metrics["restarts"] = restarts
            return result
        except WorkerError as exc:
            if not exc.retryable:
                raise
            if restarts >= max_restarts:
                raise WorkerError(exc.actor_name, f"{exc.detail}; gave up after {restarts} restart(s) "
                                  f"(reliability.max_restarts={max_restarts})") from exc
            restarts += 1
            log.warning("[%s] %s; restarting the stage from its last checkpoint (restart %d of %d)",
                        ctx.name, exc, restarts, max_restarts)


def _run_stage(cfg, plugins, cluster, out: Path, index: int, name: str, stage, artifacts: Artifacts,
               checks: DataChecks) -> dict:
    final = out / f"{index:02d}-{name}"
    if (final / "metrics.json").exists():
        record = json.loads((final / "metrics.json").read_text())
        log.info("[%s] already finished in %s; skipped (resume)", name, final)
    else:
        work = out / f".{final.name}.tmp"
        shutil.rmtree(work, ignore_errors=True)  # a previous attempt's leftovers
        work.mkdir()
        checkpoints = out / "checkpoints" / final.name  # survive restarts and resumes of this stage
        ctx = StageContext(cfg, plugins, cluster, index, name, work, artifacts, log, checkpoints)
        log.info("[%s] stage %d/%d starting on model %s", name, index + 1, len(cfg.stages), artifacts.model)
        telemetry.stage_started(name)
        started = time.time()
        try:
            with data_checks(checks):
                result = _run_with_restarts(stage, ctx, cfg.reliability.max_restarts)
            result.metrics.update(checks.metrics())
            record = {
                "stage": name,
                "seconds": round(time.time() - started, 2),
                "input_model": artifacts.model,
                "model": str(final / result.model) if result.model else None,
                "datasets": {k: str(final / v) for k, v in result.datasets.items()},
                "models": {k: str(final / v) for k, v in result.models.items()},
                "metrics": result.metrics,
            }
            _write_json(work / "metrics.json", record)
            os.replace(work, final)
            shutil.rmtree(checkpoints, ignore_errors=True)  # the stage's output is its final checkpoint
            if checkpoints.parent.exists() and not any(checkpoints.parent.iterdir()):
                checkpoints.parent.rmdir()
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            telemetry.stage_finished(name, time.time() - started, failed=True)
            raise
        telemetry.stage_finished(name, record["seconds"])
        telemetry.record_stage_metrics(name, result.metrics)
        summary = {k: v for k, v in result.metrics.items() if not isinstance(v, (list, dict))}
        log.info("[%s] done in %.1fs: %s", name, record["seconds"], json.dumps(summary, default=str))
    if record.get("model"):
        artifacts.model = record["model"]
    artifacts.datasets.update(record.get("datasets", {}))
    artifacts.models.update(record.get("models", {}))
    artifacts.lineage.append({"stage": name, "dir": str(final), "input_model": record.get("input_model")})
    return record
