"""The committed benchmark result files, found by benchmark, device and sides, newest first.

A file is ``<device>-<yyyymmdd>-<name>.json`` as ``common.write_result`` names it; ``name`` is the
benchmark with its shape (and a run name where the script took ``--name``). ``Results`` also keeps
which files a doc region has read, so the region can name its sources.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

RESULTS = Path(__file__).resolve().parent / "results"
FILE_NAME = re.compile(r"^(?P<device>[a-z0-9]+)-(?P<date>\d{8})-(?P<name>.+)\.json$")


class PublishError(Exception):
    """A region cannot be rendered (a result file is missing, a marker is broken); one line."""


@dataclass(frozen=True)
class ResultFile:
    path: Path  # as the docs cite it: benchmarks/results/...
    device: str  # the file name's tag: h200, h200x4, cpu
    name: str  # the file name after <device>-<yyyymmdd>-: the benchmark, its shape, a run name
    data: dict

    @property
    def when(self) -> str:
        return self.data.get("when", "")

    def side(self, side: str) -> dict:
        return self.data.get("sides", {}).get(side) or {}


@dataclass
class Results:
    """The committed result files, and the ones a region's rendering has read (its sources)."""

    files: list[ResultFile]
    root: Path = RESULTS
    read: list[ResultFile] = field(default_factory=list)
    names_read: set[str] = field(default_factory=set)  # by any region so far: the benchmarks published

    @classmethod
    def load(cls, root: Path = RESULTS) -> "Results":
        files = []
        for path in sorted(root.rglob("*.json")):
            match = FILE_NAME.match(path.name)
            if not match:
                raise PublishError(f"{path}: not named <device>-<yyyymmdd>-<name>.json as write_result names files")
            shown = Path("benchmarks/results") / path.relative_to(root)  # as the docs cite it, in any copy
            files.append(ResultFile(shown, match["device"], match["name"], json.loads(path.read_text())))
        return cls(files, root)

    def find(self, name: str, device: str | None = None, sides: tuple[str, ...] = (),
             where: Callable[[ResultFile], bool] | None = None) -> list[ResultFile]:
        """Every file of benchmark ``name`` (as the file names it) on ``device`` that ran all of
        ``sides`` and passes ``where``, newest first (by the time the file records)."""
        found = [f for f in self.files if f.name == name and (device is None or f.device == device)
                 and all(s in f.data.get("sides", {}) for s in sides) and (where is None or where(f))]
        return sorted(found, key=lambda f: (f.when, str(f.path)), reverse=True)

    def cite(self, files: list[ResultFile]) -> list[ResultFile]:
        """Count ``files`` among the region's sources."""
        self.read.extend(f for f in files if f not in self.read)
        self.names_read.update(f.name for f in files)
        return files

    def unpublished(self) -> list[str]:
        """Benchmarks (device and name) with result files that no region rendered so far reads."""
        return sorted({f"{f.device}-*-{f.name}" for f in self.files if f.name not in self.names_read})

    def runs(self, name: str, device: str | None = None, sides: tuple[str, ...] = (),
             where: Callable[[ResultFile], bool] | None = None) -> list[ResultFile]:
        """``find``, each file a source of the region."""
        return self.cite(self.find(name, device, sides, where))

    def newest(self, name: str, device: str | None = None, sides: tuple[str, ...] = (),
               where: Callable[[ResultFile], bool] | None = None) -> ResultFile:
        """The newest file of ``name`` (see ``find``); a missing one fails, naming what was looked for."""
        found = self.find(name, device, sides, where)
        if not found:
            wanted = f"{device or '<device>'}-<yyyymmdd>-{name}.json"
            with_sides = f" with sides {', '.join(sides)}" if sides else ""
            where_ = f" ({where.__doc__.strip()})" if where is not None and where.__doc__ else ""
            raise PublishError(f"no result file {wanted}{with_sides}{where_} under {self.root}")
        return self.cite(found[:1])[0]
