"""Runs a chain of stages as one job, handing each stage's artifacts to the next.

Order of work, so that bad input costs nothing:
1. validate every stage's config against its plugin's schema, the names and options of the
   registered things it names (rewards, metrics, advantage estimators: ``rayalign.options``), and
   the trackers' options (a tracker whose package is absent stops here);
2. resolve the base model and let every stage load and check its data (``prepare``); each
   stage's ``prepare`` sees what the stages before it declare they produce (``Stage.produces``),
   so a misspelt name of an earlier stage's dataset or model fails here too;
3. only then create the output directory, connect to Ray, check that every node imports the
   plugins the run uses (``cluster.plugin_check``), and run the stages.
Each stage writes into a hidden temporary directory renamed to ``NN-<stage>`` on success, so an
output directory never holds half a stage. With ``resume: true`` finished stages are skipped.
The run's experiment trackers (``trackers:``, ``rayalign.tracking``) get every training step and
each stage's summary from this process; a resume skips what they already got. A run ends by
writing ``summary.json`` and ``report.html``, also when a stage fails after an earlier one
finished (the failed stage is recorded with its error).

Everything the run logs also goes to ``run.log`` in the output directory, appended across resumes.
A third-party plugin's stage that raises ends the run with one line naming the plugin and its
package (``plugin error: judge (rayalign-judge): stage 'judge_eval' raised ...``) while its
traceback goes only to ``run.log``: the one line says whose code failed, the log says where. A run
that fails before any stage finished leaves no output directory, except after such a plugin error:
then ``run.log`` alone stays, for its traceback.
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

from rayalign import telemetry, tracking
from rayalign.cluster.plugin_check import PluginModule, check_nodes_import, modules_in_use
from rayalign.config import RunConfig, check_output_dir, validate_stages
from rayalign.data.validation import DataChecks, Policy, data_checks
from rayalign.errors import ConfigError, PluginError, RayalignError
from rayalign.memory import check_training_memory
from rayalign.models import resolve_model  # plugins outside this repo import it from here too: keep it
from rayalign.options import check_registered
from rayalign.plugins import PluginManager, get_plugin_manager
from rayalign.report import write_report
from rayalign.resume_check import check_resume, write_fingerprint
from rayalign.stage import Artifacts, Produces, StageContext, StageResult

log = logging.getLogger("rayalign")
RUN_LOG = "run.log"
STRICT_OUTPUTS = "RAYALIGN_STRICT_OUTPUTS"  # set: a built-in stage returning an undeclared name raises


def setup_logging() -> None:
    if not log.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def run_pipeline(cfg: RunConfig, plugins: PluginManager | None = None, source: str = "") -> Path:
    """Run every stage of ``cfg``; return the output directory."""
    setup_logging()
    check_output_dir(cfg.output_dir)  # first: a refused output_dir costs no work
    plugins = plugins or get_plugin_manager()
    with plugins.recording_use() as used:  # every node must import these: checked once Ray is up
        entries = validate_stages(cfg, plugins.stages, source)
        for i, entry in enumerate(entries):
            check_registered(entry.config, plugins, f"stages[{i}].{entry.name}")
        trackers = tracking.build_trackers(plugins, cfg, source)
        stages = [plugins.stages.get(e.name, where=f"stages[{i}]")(e.config) for i, e in enumerate(entries)]
        artifacts = Artifacts(model=resolve_model(cfg))
        # Each stage's datasets follow data.bad_records; what they skipped lands in its metrics.
        checks = [DataChecks(Policy.of(cfg.data)) for _ in stages]
        declared = []  # per stage, what it declares it returns by name
        for i, stage in enumerate(stages):
            with data_checks(checks[i]):
                stage.prepare(cfg, plugins, artifacts, i)
            declared.append(stage.produces())
            artifacts.will_produce += declared[-1]

    check_training_memory(cfg, entries, artifacts.model, log)  # a GPU plan that cannot fit stops here
    out = Path(cfg.output_dir).expanduser().resolve()
    # A directory holding only an earlier failed attempt's log is as good as a new one.
    created = not out.exists() or all(p.name == RUN_LOG for p in out.iterdir())
    if not created and not cfg.resume:
        raise ConfigError("output_dir", f"{out} already holds a run; set resume=true or choose another output_dir")
    if created:
        out.mkdir(parents=True, exist_ok=True)
        write_fingerprint(out, cfg)
    else:  # a resume may change only what it is allowed to; the first start's fingerprint stays
        check_resume(out, cfg, cfg.resume.allow_changes, log)
    (out / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    run_log = logging.FileHandler(out / RUN_LOG)
    run_log.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(run_log)
    try:
        return _run_stages(cfg, plugins, out, created, entries, stages, artifacts, checks, trackers, declared,
                           modules_in_use(plugins, used))
    finally:
        log.removeHandler(run_log)
        run_log.close()


def _run_stages(cfg, plugins, out: Path, created: bool, entries, stages, artifacts: Artifacts, checks,
                trackers: list[tracking.LoadedTracker], declared: list[Produces], modules: list[PluginModule]) -> Path:
    from rayalign.cluster.runtime import Cluster, connect

    connect()
    cluster = Cluster(cfg.resources)
    summary: dict = {"stages": []}
    current, started = "", time.time()
    try:
        check_nodes_import(modules, cfg.timeouts.worker_start_s)  # a plugin missing on a node: one line, no work done
        # Trackers finish before the cleanup below, so none writes into a directory being removed.
        with tracking.session(trackers, out, cfg.model_dump(mode="json")):
            for i, (entry, stage) in enumerate(zip(entries, stages)):
                current, started = entry.name, time.time()
                record = _run_stage(cfg, plugins, cluster, out, i, entry.name, stage, artifacts, checks[i],
                                    declared[i])
                summary["stages"].append(record)
    except BaseException as exc:
        if created and not any(p.name[0].isdigit() or p.name == "checkpoints" for p in out.iterdir()):
            if isinstance(exc, PluginError):  # a plugin's traceback went only to run.log: keep that alone
                for path in out.iterdir():
                    if path.name != RUN_LOG:
                        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
            else:
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


def _third_party_failure(plugins: PluginManager, name: str, exc: Exception, out: Path) -> PluginError | None:
    """A third-party stage's own exception as one line naming its plugin, the traceback in run.log.

    A RayalignError is already a one-line user error, and a built-in stage's other exceptions are
    our bugs, shown in full; both pass through (None)."""
    owner = plugins.stages.owner.get(name)
    info = plugins.info.get(owner) if owner else None
    if isinstance(exc, RayalignError) or info is None or not info.third_party:
        return None
    text = " ".join(str(exc).split())  # one line, however the exception formats itself
    failure = PluginError(f"{owner} ({info.package})",
                          f"stage {name!r} raised {type(exc).__name__}" + (f": {text}" if text else ""))
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, "%s", (failure,), (type(exc), exc, exc.__traceback__))
    for handler in log.handlers:
        if isinstance(handler, logging.FileHandler):  # the traceback goes to the log file, not the console
            handler.handle(record)
    log.error("[%s] %s; traceback in %s", name, failure, out / RUN_LOG)
    return failure


def _check_declared(plugins: PluginManager, name: str, declared: Produces, result: StageResult) -> None:
    """Warn when a stage returns a name its ``produces`` lacks: later stages were checked against the
    declaration, so the two must agree. With ``RAYALIGN_STRICT_OUTPUTS`` set (the test suite) a
    built-in stage's mismatch raises, so a declaration cannot drift from its stage unnoticed."""
    undeclared = declared.undeclared(result)
    if not undeclared:
        return
    message = (f"stage {name!r} returned {', '.join(undeclared)} that its produces() does not declare "
               f"(declared: {', '.join(declared.datasets + declared.models) or 'none'})")
    owner = plugins.stages.owner.get(name)
    info = plugins.info.get(owner) if owner else None
    if os.environ.get(STRICT_OUTPUTS) and info is not None and info.builtin:
        raise RuntimeError(message)
    log.warning("[%s] %s; later stages cannot name it before it runs", name, message)


def _run_stage(cfg, plugins, cluster, out: Path, index: int, name: str, stage, artifacts: Artifacts,
               checks: DataChecks, declared: Produces) -> dict:
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
        tracking.stage_started(index, name)
        started = time.time()
        try:
            with data_checks(checks):
                try:
                    result = _run_with_restarts(stage, ctx, cfg.reliability.max_restarts)
                except Exception as exc:
                    failure = _third_party_failure(plugins, name, exc, out)
                    if failure is None:
                        raise
                    raise failure from exc
            _check_declared(plugins, name, declared, result)
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
        tracking.stage_finished(final, record)
        summary = {k: v for k, v in result.metrics.items() if not isinstance(v, (list, dict))}
        log.info("[%s] done in %.1fs: %s", name, record["seconds"], json.dumps(summary, default=str))
    if record.get("model"):
        artifacts.model = record["model"]
    artifacts.datasets.update(record.get("datasets", {}))
    artifacts.models.update(record.get("models", {}))
    artifacts.lineage.append({"stage": name, "dir": str(final), "input_model": record.get("input_model")})
    return record
