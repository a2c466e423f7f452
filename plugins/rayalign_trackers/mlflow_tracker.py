"""MLflow: one MLflow run per pipeline, resumed by the run id saved in the output directory."""

from __future__ import annotations

import time
from typing import Any

from pydantic import Field

from rayalign.tracking import Tracker, TrackerRun
from rayalign_trackers.common import NamedRunConfig


class MlflowConfig(NamedRunConfig):
    tracking_uri: str | None = Field(
        None, description="e.g. http://mlflow:5000 or sqlite:///mlflow.db; null: MLFLOW_TRACKING_URI or MLflow's default")
    experiment: str = Field("rayalign", description="MLflow experiment, created when missing")


class MlflowTracker(Tracker):
    """Logs to an MLflow tracking server or local store."""

    name = "mlflow"
    Config = MlflowConfig
    requires = "mlflow"
    install = "pip install 'rayalign[mlflow]'"

    def start(self, run: TrackerRun) -> None:
        from mlflow.tracking import MlflowClient
        from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME

        cfg: MlflowConfig = self.config
        # A client of its own, not mlflow's process-wide active run, which a user's code may hold.
        self.client = MlflowClient(tracking_uri=cfg.tracking_uri)
        self.run_id = run.state.get("run_id")
        if self.run_id:
            self.client.update_run(self.run_id, status="RUNNING")
            return
        experiment = self.client.get_experiment_by_name(cfg.experiment)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(cfg.experiment)
        tags = {MLFLOW_RUN_NAME: cfg.run_name or run.name, **{tag: "" for tag in cfg.tags}}
        self.run_id = run.state["run_id"] = self.client.create_run(experiment_id, tags=tags).info.run_id
        self.client.log_dict(self.run_id, run.config, "config.json")

    def log_scalars(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        # MLflow metric names allow "/", so keys read the same as in the other trackers.
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def log_table(self, key: str, rows: list[dict[str, Any]], step: int) -> None:
        self.client.log_dict(self.run_id, {"step": step, "rows": rows}, f"tables/{key}.json")

    def finish(self, failed: bool) -> None:
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")
