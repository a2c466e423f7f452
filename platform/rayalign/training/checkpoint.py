"""Atomic, checksummed training checkpoints, kept under ``<run>/checkpoints/<NN-stage>/``.

A checkpoint is written into a hidden temporary directory by every trainer rank (DeepSpeed's
model, optimizer and scheduler shards, plus each rank's RNG states), then the driver adds
``state.json`` (data position, metrics so far, LR back-off) and ``manifest.json`` (sha256 of every
file) and renames the directory to ``step-NNNNNNNN``. A directory without a manifest, or whose
files do not match it, was interrupted or damaged: it is skipped with a message, never loaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

MANIFEST = "manifest.json"
STATE = "state.json"


@dataclass
class TrainingState:
    """Where the driver's step loop stands: resuming from it repeats and skips no data.

    The data position is ``step`` alone: the epoch and the micro-batches of every step follow
    from it and the seed (see ``TrainerSession``).
    """

    step: int = 0  # optimizer steps done
    lr_scale: float = 1.0  # product of the back-offs applied after loss explosions
    rollbacks: int = 0
    skipped: int = 0  # optimizer steps skipped for non-finite gradients, rolled-back ones included
    history: list[dict] = field(default_factory=list)  # per-step metrics so far
    events: list[dict] = field(default_factory=list)  # rollbacks and restarts, for the summary
    extra: dict = field(default_factory=dict)  # a stage's own resumable state (RL: weights version, evals)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class CheckpointStore:
    def __init__(self, root: Path, keep: int, log: logging.Logger):
        self.root, self.keep, self.log = Path(root), keep, log

    def begin(self, step: int) -> Path:
        """A fresh temporary directory for the trainers to write step ``step`` into."""
        tmp = self.root / f".step-{step:08d}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        return tmp

    def commit(self, tmp: Path, state: TrainingState) -> Path:
        (tmp / STATE).write_text(json.dumps(asdict(state)))
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        manifest = {str(p.relative_to(tmp)): _sha256(p) for p in files}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        final = self.root / f"step-{state.step:08d}"
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in self.complete()[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def complete(self) -> list[Path]:
        """Committed checkpoint directories, oldest first."""
        return sorted(p for p in self.root.glob("step-*") if p.is_dir()) if self.root.exists() else []

    def problem(self, path: Path) -> str | None:
        """Why ``path`` cannot be trusted, or None if every file matches its manifest."""
        if not (path / MANIFEST).exists():
            return "no manifest (interrupted while writing)"
        manifest = json.loads((path / MANIFEST).read_text())
        for name, digest in manifest.items():
            file = path / name
            if not file.exists():
                return f"{name} is missing"
            if _sha256(file) != digest:
                return f"{name} does not match its checksum"
        return None

    def latest(self) -> tuple[Path, TrainingState] | None:
        """The newest checkpoint that passes its manifest; damaged ones are reported and skipped."""
        for path in reversed(self.complete()):
            problem = self.problem(path)
            if problem:
                self.log.warning("checkpoint %s is unusable: %s; skipped", path, problem)
                continue
            return path, TrainingState(**json.loads((path / STATE).read_text()))
        return None

    def clear(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
