"""Experiment trackers: what W&B (offline), TensorBoard and MLflow (local store) hold after a real
run, read back with their own readers and checked against the run's metrics.json; a third-party
tracker through the hook; a tracker that fails mid-run; an absent package; resume.

One shared run (module fixture): a tiny SFT stage on the CPU, then two cheap in-test ``samples``
stages that write a ``generations.jsonl`` each, so two stages of one kind must not share a series.
"""

import glob
import json
import logging
import shutil
import struct
import types
from pathlib import Path

import pytest

from rayalign import tracking
from rayalign.config import RunConfig
from rayalign.errors import ConfigError
from rayalign.hookspecs import hookimpl
from rayalign.pipeline import run_pipeline
from rayalign.plugins import PluginManager
from rayalign.stage import Stage, StageConfig, StageResult
from rayalign.tracking import Tracker, TrackerRun

# -- an in-test plugin: a recording tracker, a tracker whose network goes down, a cheap stage ---


class Recording(Tracker):
    """Keeps every call, so a test sees exactly what a third-party tracker was given."""

    name = "recording"
    calls: list[tuple] = []

    def start(self, run: TrackerRun) -> None:
        run.state.setdefault("run_id", "rec-1")
        self.calls.append(("start", dict(run.state), run.resumed, run.config["trackers"]))

    def log_scalars(self, metrics, step):
        self.calls.append(("scalars", dict(metrics), step))

    def log_table(self, key, rows, step):
        self.calls.append(("table", key, rows, step))

    def finish(self, failed):
        self.calls.append(("finish", failed))


class Flaky(Tracker):
    """Its dashboard goes away after the first step."""

    name = "flaky"
    calls = 0

    def log_scalars(self, metrics, step):
        type(self).calls += 1
        if type(self).calls >= 2:
            raise ConnectionError("dashboard unreachable\n  (network down)")


class SamplesConfig(StageConfig):
    score: float = 0.5


class SamplesStage(Stage):
    """Writes three generations and a score; trains nothing and starts no worker."""

    name = "samples"
    Config = SamplesConfig
    needs_model = False

    def run(self, ctx):
        rows = [{"prompt": [{"role": "user", "content": f"q{i}"}], "completion": f"a{i}", "num_tokens": i}
                for i in range(3)]
        (ctx.work_dir / "generations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return StageResult(metrics={"score": self.config.score, "samples": 3, "per_sample": [1, 2, 3]},
                           datasets={"generations": "generations.jsonl"})


plugin = types.ModuleType("tracker_test_plugin")


@hookimpl
def register_trackers(register):
    register(Recording)
    register(Flaky)


@hookimpl
def register_stages(register):
    register(SamplesStage)


plugin.register_trackers, plugin.register_stages = register_trackers, register_stages


def plugins() -> PluginManager:
    return PluginManager(extra_plugins=(plugin,))


def run_config(out: Path, trackers: list[str], **extra) -> RunConfig:
    options = {"wandb": {"mode": "offline", "project": "tests", "tags": ["ci"]},
               "mlflow": {"tracking_uri": (out.parent / "mlruns").as_uri(), "experiment": "tests", "tags": ["ci"]}}
    return RunConfig(
        output_dir=str(out), trackers=trackers, tracker_options={k: v for k, v in options.items() if k in trackers},
        stages=[{"sft": {"epochs": 1, "lr": 1e-3, "max_tokens_per_micro_batch": 128, "warmup_ratio": 0.0}},
                {"samples": {"score": 0.25}}, {"samples": {"score": 0.75}}],
        **extra,
    )


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The shared run, with every tracker at once, and the warnings it logged."""
    import ray

    ray.init(num_cpus=4, include_dashboard=False, namespace="rayalign-trackers", log_to_driver=False)
    out = tmp_path_factory.mktemp("trackers") / "run"
    warnings: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger("rayalign").addHandler(handler)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow-skinny has no sqlite store; a test needs no server
        mp.setenv("WANDB_SILENT", "true")
        try:
            run_pipeline(run_config(out, ["wandb", "tensorboard", "mlflow", "recording", "flaky"]), plugins())
        finally:
            logging.getLogger("rayalign").removeHandler(handler)
    yield out, warnings
    ray.shutdown()


def expected(out: Path) -> dict[str, dict[int, float]]:
    """Key -> {global step: value}, from the stages' metrics.json alone (the documented layout)."""
    series: dict[str, dict[int, float]] = {}
    step = 0
    for stage_dir in sorted(out.glob("0*-*")):
        record = json.loads((stage_dir / "metrics.json").read_text())
        for row in record["metrics"].get("history", []):
            step += 1
            for key, value in row.items():
                # The loop adds repeated_micro_batches to the last row once training is over.
                if isinstance(value, (int, float)) and key != "repeated_micro_batches":
                    series.setdefault(f"{stage_dir.name}/{key}", {})[step] = float(value)
        step += 1
        for key, value in {"seconds": record["seconds"], **record["metrics"]}.items():
            if isinstance(value, (int, float)):
                series.setdefault(f"{stage_dir.name}/summary/{key}", {})[step] = float(value)
    return series


def assert_matches(logged: dict[str, dict[int, float]], out: Path) -> None:
    want = expected(out)
    assert "00-sft/loss" in want and len(want["00-sft/loss"]) >= 2  # a real run with several steps
    assert {"01-samples/summary/score", "02-samples/summary/score"} <= set(want)  # not one shared series
    for key, steps in want.items():
        assert logged.get(key) == pytest.approx(steps, rel=1e-6), key
    # What is logged beyond metrics.json: the trainers' throughput, at the same steps as the loss.
    assert set(logged["00-sft/throughput_per_s"]) == set(want["00-sft/loss"])
    assert set(logged) - set(want) == {"00-sft/throughput_per_s"}


# -- reading back what each tracker logged -------------------------------------------------


def wandb_records(path: str):
    """The records of a ``.wandb`` file: W&B's LevelDB-style log of 32 KiB blocks, each record
    a 7-byte header (crc32c, length, type: 1 full, 2 first, 3 middle, 4 last) and protobuf bytes."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B"
    pos, pending, block = 7, b"", 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def wandb_history(run_dirs: list[str]) -> tuple[dict[str, dict[int, float]], dict[str, dict], set[str]]:
    """Scalars (key -> {step: value}), tables (key -> their history entry) and run ids of W&B runs."""
    scalars: dict[str, dict[int, float]] = {}
    tables: dict[str, dict] = {}
    ids = set()
    for run_dir in run_dirs:
        for record in wandb_records(glob.glob(f"{run_dir}/*.wandb")[0]):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                ids.add(record.run.run_id)
            if kind != "history":
                continue
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            step = items["_step"]
            for key, value in items.items():
                if key.endswith("/_type") and value == "table-file":
                    tables[key.removesuffix("/_type")] = {"step": step, "nrows": items[key[:-5] + "nrows"]}
                elif not key.startswith("_") and isinstance(value, (int, float)) and not _table_field(key, items):
                    assert step not in scalars.get(key, {}), f"{key} logged twice at step {step}"
                    scalars.setdefault(key, {})[step] = float(value)
    return scalars, tables, ids


def _table_field(key: str, items: dict) -> bool:
    return items.get(key.rsplit("/", 1)[0] + "/_type") == "table-file"


def tensorboard_scalars(log_dir: Path) -> tuple[dict[str, dict[int, float]], list[str]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars: dict[str, dict[int, float]] = {}
    texts = []
    for events in sorted(log_dir.glob("events.out.tfevents.*")):  # a resume adds a file to the same dir
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0, "tensors": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            for event in acc.Scalars(tag):
                assert event.step not in scalars.get(tag, {}), f"{tag} logged twice at step {event.step}"
                scalars.setdefault(tag, {})[event.step] = event.value
        texts += acc.Tags()["tensors"]
    return scalars, texts


# -- the tests -------------------------------------------------------------------------------


def test_wandb_offline_run_holds_every_step_summary_and_table(run):
    out, _ = run
    run_dirs = glob.glob(str(out / "wandb" / "offline-run-*"))
    assert len(run_dirs) == 1
    scalars, tables, ids = wandb_history(run_dirs)
    assert_matches(scalars, out)
    assert ids == {json.loads((out / tracking.STATE_FILE).read_text())["trackers"]["wandb"]["run_id"]}
    summary_step = next(iter(expected(out)["01-samples/summary/score"]))
    assert tables == {"01-samples/generations": {"step": summary_step, "nrows": 3},
                      "02-samples/generations": {"step": summary_step + 1, "nrows": 3}}


def test_tensorboard_event_files_hold_every_step_and_summary(run):
    out, _ = run
    scalars, texts = tensorboard_scalars(out / "tensorboard")
    assert_matches(scalars, out)
    assert {"config", "01-samples/generations", "02-samples/generations"} <= {t.split("/text_summary")[0] for t in texts}


def test_mlflow_local_store_holds_every_step_and_summary(run, monkeypatch):
    from mlflow.tracking import MlflowClient

    out, _ = run
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=(out.parent / "mlruns").as_uri())
    run_id = json.loads((out / tracking.STATE_FILE).read_text())["trackers"]["mlflow"]["run_id"]
    info = client.get_run(run_id)
    assert info.info.status == "FINISHED" and info.info.run_name == "run" and "ci" in info.data.tags
    logged = {}
    for key in info.data.metrics:
        history = client.get_metric_history(run_id, key)
        assert len({m.step for m in history}) == len(history), f"{key} logged twice at one step"
        logged[key] = {m.step: m.value for m in history}
    assert_matches(logged, out)
    rows = json.loads(Path(client.download_artifacts(run_id, "tables/02-samples/generations.json")).read_text())["rows"]
    assert [r["completion"] for r in rows] == ["a0", "a1", "a2"]
    assert json.loads(rows[0]["prompt"]) == [{"role": "user", "content": "q0"}]  # nested values as JSON text


def test_a_third_party_tracker_gets_the_config_every_step_summaries_and_tables(run):
    out, _ = run
    calls = list(Recording.calls)
    assert calls[0] == ("start", {"run_id": "rec-1"}, False, ["wandb", "tensorboard", "mlflow", "recording", "flaky"])
    assert calls[-1] == ("finish", False)
    logged: dict[str, dict[int, float]] = {}
    for call in calls:
        if call[0] == "scalars":
            for key, value in call[1].items():
                logged.setdefault(key, {})[call[2]] = value
    assert_matches(logged, out)
    steps = [c[2] for c in calls if c[0] == "scalars"]
    assert steps == list(range(1, len(steps) + 1))  # one global step per event, only increasing
    tables = [c for c in calls if c[0] == "table"]
    assert [(c[1], len(c[2])) for c in tables] == [("01-samples/generations", 3), ("02-samples/generations", 3)]


def test_a_tracker_that_raises_is_reported_once_and_the_run_goes_on(run):
    out, warnings = run
    assert Flaky.calls == 2  # muted after the failure
    lines = [w for w in warnings if "tracker" in w]
    assert len(lines) == 1 and "\n" not in lines[0]
    assert "tracker 'flaky' (plugin tracker_test_plugin) failed in log_scalars" in lines[0]
    assert "ConnectionError: dashboard unreachable (network down)" in lines[0]
    record = json.loads((out / "00-sft" / "metrics.json").read_text())
    assert len(record["metrics"]["history"]) == record["metrics"]["steps"] >= 2
    assert all((out / d / "metrics.json").exists() for d in ("01-samples", "02-samples"))
    assert (out / "summary.json").exists()


def test_a_tracker_whose_package_is_absent_stops_before_any_work(tmp_path, monkeypatch):
    real = tracking.module_available
    monkeypatch.setattr(tracking, "module_available", lambda module: module != "wandb" and real(module))
    out = tmp_path / "never"
    with pytest.raises(ConfigError) as err:
        run_pipeline(run_config(out, ["tensorboard", "wandb"]), plugins())
    assert str(err.value) == ("config error: trackers[1]: tracker 'wandb' needs the wandb package, which is not "
                              "installed: pip install 'rayalign[wandb]'")
    assert not out.exists()


@pytest.mark.parametrize("trackers, options, where", [
    (["wandb"], {"wandb": {"mode": "sometimes"}}, "tracker_options.wandb.mode"),
    (["wandb"], {"wandb": {"projetc": "x"}}, "tracker_options.wandb.projetc: unknown key"),
    (["tensorboard"], {"mlflow": {}}, "tracker_options.mlflow: tracker 'mlflow' is not in trackers"),
    (["neptune"], {}, "trackers[0]: no plugin provides tracker 'neptune'"),
    (["wandb", "wandb"], {}, "trackers[1]: tracker 'wandb' is named twice"),
])
def test_bad_tracker_config_is_one_line_naming_the_key(tmp_path, trackers, options, where):
    cfg = RunConfig(output_dir=str(tmp_path / "never"), trackers=trackers, tracker_options=options,
                    stages=[{"samples": {}}])
    with pytest.raises(ConfigError) as err:
        run_pipeline(cfg, plugins())
    assert where in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "never").exists()


def test_trackers_are_listed_and_a_builtin_tracker_name_cannot_be_taken():
    from rayalign.errors import PluginError

    pm = plugins()
    assert {name: pm.trackers.owner[name] for name in pm.trackers} == {
        "wandb": "trackers", "tensorboard": "trackers", "mlflow": "trackers",
        "recording": "tracker_test_plugin", "flaky": "tracker_test_plugin"}
    clash = types.ModuleType("clash_tracker_plugin")
    clash.register_trackers = hookimpl(lambda register: register(type("Mine", (Recording,), {"name": "wandb"})))
    with pytest.raises(PluginError, match="tracker 'wandb' is already registered by plugin 'trackers'"):
        PluginManager(extra_plugins=(clash,)).trackers


def test_resume_continues_the_tracker_runs_without_logging_a_step_twice(run, tmp_path):
    """A copy of the run whose last stage did not finish: the resume skips the finished stages (they
    log nothing again) and goes on from the saved global step in the same tracker runs."""
    out = tmp_path / "run"
    shutil.copytree(run[0], out, ignore=shutil.ignore_patterns("mlruns"))
    shutil.rmtree(out / "02-samples")
    state = json.loads((out / tracking.STATE_FILE).read_text())
    Recording.calls.clear()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_SILENT", "true")
        run_pipeline(run_config(out, ["wandb", "tensorboard", "recording"], resume=True), plugins())

    assert Recording.calls[0] == ("start", {"run_id": "rec-1"}, True, ["wandb", "tensorboard", "recording"])
    scalars = [c for c in Recording.calls if c[0] == "scalars"]
    assert len(scalars) == 1 and scalars[0][2] == state["step"] + 1  # only the re-run stage's summary
    assert all(key.startswith("02-samples/summary/") for key in scalars[0][1])
    assert scalars[0][1]["02-samples/summary/score"] == 0.75
    assert json.loads((out / tracking.STATE_FILE).read_text())["step"] == state["step"] + 1

    tb, _ = tensorboard_scalars(out / "tensorboard")  # raises on a step logged twice for one key
    assert list(tb["02-samples/summary/score"]) == [state["step"], state["step"] + 1]
    assert len(tb["00-sft/loss"]) == len(expected(out)["00-sft/loss"])
    run_dirs = sorted(glob.glob(str(out / "wandb" / "offline-run-*")))
    assert len(run_dirs) == 2
    wb, _, ids = wandb_history(run_dirs)  # raises on a step logged twice for one key
    assert ids == {state["trackers"]["wandb"]["run_id"]}  # the same W&B run, resumed
    assert list(wb["02-samples/summary/score"]) == [state["step"], state["step"] + 1]
