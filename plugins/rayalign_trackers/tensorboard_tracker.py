"""TensorBoard: event files in one log directory per pipeline, which a resume appends to."""

from __future__ import annotations

import json
from typing import Any

from pydantic import Field

from rayalign.tracking import Tracker, TrackerRun
from rayalign_trackers.common import NamedRunConfig


class TensorBoardConfig(NamedRunConfig):
    log_dir: str | None = Field(None, description="event file directory; null: <output_dir>/tensorboard")


class TensorBoardTracker(Tracker):
    """Writes TensorBoard event files (`tensorboard --logdir <output_dir>/tensorboard`)."""

    name = "tensorboard"
    Config = TensorBoardConfig
    requires = "tensorboard"
    install = "pip install 'rayalign[tensorboard]'"

    def start(self, run: TrackerRun) -> None:
        from torch.utils.tensorboard import SummaryWriter

        cfg: TensorBoardConfig = self.config
        # The same directory on resume: TensorBoard reads every event file in it as one run.
        self.writer = SummaryWriter(log_dir=cfg.log_dir or str(run.output_dir / "tensorboard"))
        if not run.resumed:
            header = {"run_name": cfg.run_name or run.name, "tags": cfg.tags}
            self.writer.add_text("run", "```\n" + json.dumps(header, indent=2) + "\n```", 0)
            self.writer.add_text("config", "```\n" + json.dumps(run.config, indent=2, default=str) + "\n```", 0)

    def log_scalars(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def log_table(self, key: str, rows: list[dict[str, Any]], step: int) -> None:
        # TensorBoard has no table type; its text plugin renders a Markdown table.
        columns = list(rows[0]) if rows else []
        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(_md(r[c]) for c in columns) + " |" for r in rows]
        self.writer.add_text(key, "\n".join(lines), step)

    def finish(self, failed: bool) -> None:
        self.writer.close()


def _md(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")
