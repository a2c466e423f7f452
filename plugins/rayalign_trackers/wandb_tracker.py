"""Weights & Biases: one W&B run per pipeline, resumed by the id saved in the output directory."""

from __future__ import annotations

import uuid
from typing import Any, Literal

from pydantic import Field

from rayalign.tracking import Tracker, TrackerRun
from rayalign_trackers.common import NamedRunConfig


class WandbConfig(NamedRunConfig):
    project: str = Field("rayalign", description="W&B project")
    entity: str | None = Field(None, description="W&B team or user; null: your default")
    mode: Literal["online", "offline", "disabled"] = Field(
        "online", description="offline writes to dir only (upload later with `wandb sync`)")
    dir: str | None = Field(None, description="where the wandb/ folder goes; null: the run's output directory")


class WandbTracker(Tracker):
    """Logs to Weights & Biases (online, or offline for a later `wandb sync`)."""

    name = "wandb"
    Config = WandbConfig
    requires = "wandb"
    install = "pip install 'rayalign[wandb]'"

    def start(self, run: TrackerRun) -> None:
        import wandb

        cfg: WandbConfig = self.config
        # A saved id resumes the same W&B run; "allow" also starts it anew if the server lost it.
        run_id = run.state.setdefault("run_id", uuid.uuid4().hex[:12])
        self.run = wandb.init(
            project=cfg.project, entity=cfg.entity, mode=cfg.mode, dir=cfg.dir or str(run.output_dir),
            id=run_id, resume="allow", name=cfg.run_name or run.name, tags=cfg.tags or None,
            config=run.config, reinit="create_new",
            # The driver's console already goes to run.log; wandb's own capture would double it.
            settings=wandb.Settings(console="off", silent=True),
        )

    def log_scalars(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def log_table(self, key: str, rows: list[dict[str, Any]], step: int) -> None:
        import wandb

        columns = list(rows[0]) if rows else []
        self.run.log({key: wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in rows])}, step=step)

    def finish(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)
