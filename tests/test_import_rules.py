"""Layers point down only: no module imports one of the layers above it.

Bottom to top: errors and config-free utilities -> data -> training -> workers / rollout / cluster
-> the driver (stage, sampling, pipeline) -> cli. Plugins sit above the platform and reach it
through its public modules, never through the pipeline or the command line. Every import counts,
lazy ones inside functions too: they load the same code, only later.
"""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

DRIVER = ("rayalign.stage", "rayalign.sampling", "rayalign.pipeline", "rayalign.cli")

# Who (a module or package of the platform, or "plugins")  ->  what it must never import.
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "rayalign.data":     ("rayalign.training", "rayalign.workers", "rayalign.rollout", "rayalign.cluster", *DRIVER),
    "rayalign.training": ("rayalign.workers", "rayalign.rollout", "rayalign.sampling", "rayalign.pipeline",
                          "rayalign.cli"),
    "rayalign.workers":  DRIVER,
    "rayalign.rollout":  ("rayalign.stage", "rayalign.pipeline", "rayalign.cli"),
    "rayalign.cluster":  DRIVER,
    "rayalign.config":   ("vllm", "rayalign.workers", "rayalign.rollout", "rayalign.cluster"),  # describes, builds nothing
    "rayalign.memory":   ("rayalign.workers",),  # the driver's checks, before any worker exists
    "plugins":           ("rayalign.pipeline", "rayalign.cli"),
}

# Known exceptions, each with why. The driver's side of training (``TrainerSession``, which starts
# the trainer workers) lives in training/loop.py, the home plugins are documented to import it from.
ALLOWED: dict[tuple[str, str], str] = {
    ("rayalign.training.loop", "rayalign.workers"): "the driver's training loop starts TrainerWorker groups",
}


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _modules():
    """(dotted name, layer key, path) of every platform module and plugin source file."""
    for path in sorted((REPO / "platform" / "rayalign").rglob("*.py")):
        name = ".".join(path.relative_to(REPO / "platform").with_suffix("").parts).removesuffix(".__init__")
        yield name, name, path
    for path in sorted((REPO / "plugins").rglob("*.py")):
        rel = path.relative_to(REPO / "plugins")
        if "tests" in rel.parts or any(p.endswith(".egg-info") for p in rel.parts):
            continue  # a plugin's own tests may drive whole runs
        yield "plugins/" + rel.as_posix(), "plugins", path


def _imports(path: Path) -> list[tuple[int, list[str]]]:
    """Per import statement: its line and the modules it may load."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, [alias.name]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from rayalign import pipeline` loads the module rayalign.pipeline
            out.append((node.lineno, [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]))
    return out


def upward_imports(modules=None) -> list[str]:
    bad = []
    for name, key, path in modules if modules is not None else _modules():
        rules = [(who, banned) for who, banned in FORBIDDEN.items() if _within(key, who)]
        where = path.relative_to(REPO) if path.is_relative_to(REPO) else path
        for lineno, loaded in _imports(path):
            for who, banned in rules:
                for target in banned:
                    hit = next((m for m in loaded if _within(m, target)), None)
                    if hit and not any(_within(name, m) and target == t for m, t in ALLOWED):
                        bad.append(f"{where}:{lineno}: {who} imports {hit} (a layer above it)")
    return bad


def test_no_module_imports_a_layer_above_it():
    assert upward_imports() == []


def test_the_check_sees_an_upward_import(tmp_path):
    sneaky = tmp_path / "sneaky.py"
    sneaky.write_text("def f():\n    from rayalign.training.losses import IGNORE_INDEX\n")
    plugin = tmp_path / "plugin.py"
    plugin.write_text("from rayalign import pipeline\n")
    found = upward_imports([("rayalign.data.sneaky", "rayalign.data.sneaky", sneaky), ("plugins/x.py", "plugins", plugin)])
    assert len(found) == 2 and "rayalign.data imports rayalign.training.losses" in found[0]
    assert "plugins imports rayalign.pipeline" in found[1]
