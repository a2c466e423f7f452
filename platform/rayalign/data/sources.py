"""Where a stage's named input comes from: a key under ``data:``, a dataset path, or an earlier stage's dataset.

Stages that take a dataset by name (``curate`` sources, ``distill`` questions, ``evaluate_model``
held-out data) accept all three. Keys and files load in ``prepare`` (bad data fails before any
work); an earlier stage's dataset exists only once that stage ran, so it loads in ``run``.
"""

from __future__ import annotations

from rayalign.data.datasets import load_records
from rayalign.errors import ConfigError


def data_keys(run) -> list[str]:
    """The dataset keys under ``data:`` (every ``str | None`` field of the run's data config).

    Read off the config class, so a plugin's extra ``data:`` field is a dataset key as soon as it exists.
    """
    return [k for k, v in type(run.data).model_fields.items() if v.annotation == (str | None)]


def dataset_path(run, key: str, where: str) -> str | None:
    """The file configured under ``data.<key>`` (None: use synthetic data)."""
    keys = data_keys(run)
    if key not in keys:
        raise ConfigError(where, f"no dataset {key!r} under data: (known: {', '.join(keys)})")
    return getattr(run.data, key)


def looks_like_file(name: str) -> bool:
    """A path (or hub id ``owner/name``) rather than a ``data:`` key or an earlier stage's dataset."""
    return name.startswith("synthetic:") or "/" in name or name.endswith((".jsonl", ".parquet"))


def load_now(run, formats, name: str, kind: str):
    """The records of a ``data:`` key (null: synthetic) or a file; None for an earlier stage's dataset."""
    if name in data_keys(run):
        return load_records(getattr(run.data, name), kind, formats, run.seed)[0]
    if looks_like_file(name):
        return load_records(name, kind, formats, run.seed)[0]
    return None


def load_produced(ctx, formats, name: str, kind: str, where: str):
    """The records of the dataset an earlier stage of this run produced under ``name``."""
    if name not in ctx.artifacts.datasets:
        produced = ", ".join(sorted(ctx.artifacts.datasets)) or "none"
        raise ConfigError(where, f"{name!r} is no key under data:, no file and no earlier stage's dataset "
                          f"(produced: {produced})")
    return load_records(ctx.artifacts.datasets[name], kind, formats, ctx.run.seed)[0]
