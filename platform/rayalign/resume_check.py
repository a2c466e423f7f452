"""What a resumed run must share with the run it continues, and the refusal when it does not.

A resume skips finished stages and restarts the current one from its checkpoint. That is only the
same run if what decides each step's data and arithmetic is unchanged: the model, the seed, the
stage list and every stage option (grad_accum, lr, ...), the number of ranks of each role (which
micro-batches each rank trains on) and the data files' contents. Stages appended after the last
one are new work, not a change. The first start writes these as
``fingerprint.json`` in the output directory; a resume compares and stops with one line naming
every difference, unless ``resume.allow_changes`` lists it. Allowed changes are recorded in
``resume_changes.jsonl`` beside it, so the run says what it was trained with.

Deadlines, reliability settings, trackers and the output directory itself may change freely:
they decide nothing about what is trained.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from rayalign.data.file_hash import content_hash, dataset_files
from rayalign.data.jsonl import write_jsonl
from rayalign.errors import ConfigError

FINGERPRINT = "fingerprint.json"
CHANGES = "resume_changes.jsonl"
_ROLES_RANKS = "num_workers"


def _flatten(value: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            _flatten(item, f"{prefix}.{key}" if prefix else str(key), out)
    elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        for i, item in enumerate(value):
            _flatten(item, f"{prefix}[{i}]", out)
    else:
        out[prefix] = value


def fingerprint(cfg) -> dict[str, Any]:
    """The settings of ``cfg`` that decide what is trained, as flat ``key path -> value``."""
    dumped = cfg.model_dump(mode="json")
    out: dict[str, Any] = {"model": dumped["model"], "seed": dumped["seed"]}
    _flatten(dumped["data"], "data", out)
    for role, resources in dumped["resources"].items():
        if isinstance(resources, dict) and _ROLES_RANKS in resources:
            out[f"resources.{role}.{_ROLES_RANKS}"] = resources[_ROLES_RANKS]
    _flatten(dumped["stages"], "stages", out)
    out["stages"] = [next(iter(entry)) for entry in dumped["stages"]]  # the list of stage names, in order
    for key, value in dumped["data"].items():
        if isinstance(value, str) and not value.startswith("synthetic:") and Path(value).expanduser().exists():
            out[f"data.{key} (contents)"] = content_hash(dataset_files(Path(value).expanduser()))
    return out


def _allowed(key: str, allow: list[str]) -> bool:
    """``lr`` allows every stage's ``lr``; ``stages[1].dpo.lr`` allows that one."""
    last = key.rsplit(".", 1)[-1]
    return any(a == key or a == last for a in allow)


def _appended(key: str, before: list[str], now: list[str]) -> bool:
    """Stages added after the first start's last one change nothing that was trained before them."""
    if now[: len(before)] != before:
        return False
    if key == "stages":
        return True
    return key.startswith("stages[") and int(key[len("stages["):key.index("]")]) >= len(before)


def _show(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:16] + "..." + text[-8:]


def check_resume(out: Path, cfg, allow: list[str], log) -> None:
    """Stop a resume of ``out`` whose settings differ from the first start's, except those in
    ``allow``; record the allowed ones. A run started before fingerprints were kept is not checked."""
    path = out / FINGERPRINT
    if not path.exists():
        log.warning("resume: %s has no %s (started by an older rayalign); its settings are not checked", out, FINGERPRINT)
        return
    before, now = json.loads(path.read_text()), fingerprint(cfg)
    changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
    refused = [k for k in changed if not (_allowed(k, allow) or _appended(k, before["stages"], now["stages"]))]
    if refused:
        shown = ", ".join(f"{k} {_show(before.get(k))} -> {_show(now.get(k))}" for k in refused[:6])
        more = f" and {len(refused) - 6} more" if len(refused) > 6 else ""
        raise ConfigError("resume", f"{out} was started with other settings: {shown}{more}; resume with the "
                          "original ones, or list the safe changes in resume.allow_changes")
    if changed:
        record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "changes": {k: [before.get(k), now.get(k)] for k in changed}}
        write_jsonl(out / CHANGES, [record], append=True)
        log.info("resume: allowed changes recorded in %s: %s", out / CHANGES, ", ".join(changed))


def write_fingerprint(out: Path, cfg) -> None:
    (out / FINGERPRINT).write_text(json.dumps(fingerprint(cfg), indent=1))
