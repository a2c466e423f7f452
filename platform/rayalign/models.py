"""Which model a run starts from: the ``model:`` setting resolved to something transformers and vLLM load.

Below the pipeline so stages (and plugins) that need the run's base model before the pipeline hands
it over, e.g. to load its tokenizer in ``prepare``, can resolve it the same way.
"""

from __future__ import annotations

from pathlib import Path

from rayalign.config import RunConfig
from rayalign.errors import ConfigError


def resolve_model(cfg: RunConfig) -> str:
    """A local directory, a hub id, or (null, ``embedded:<task>[/<shape>]``) an embedded model built on
    first use: random weights of ``shape`` (default ``tiny``) with a tokenizer trained on ``task``'s text."""
    if cfg.model is None or cfg.model.startswith("embedded:"):
        from rayalign.embedded import EMBEDDED_SHAPES, EMBEDDED_TASKS, embedded_model_path

        task, _, shape = ("knowledge" if cfg.model is None else cfg.model.split(":", 1)[1]).partition("/")
        if task not in EMBEDDED_TASKS:
            raise ConfigError("model", f"{cfg.model!r}: no such embedded model (known: "
                              f"{', '.join('embedded:' + t for t in EMBEDDED_TASKS)})")
        if shape and shape not in EMBEDDED_SHAPES:
            raise ConfigError("model", f"{cfg.model!r}: no such embedded shape (known: "
                              f"{', '.join(f'embedded:{task}/{s}' for s in EMBEDDED_SHAPES)})")
        return str(embedded_model_path(cfg.seed, task, shape or "tiny"))
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
