"""Security guards: no code runs from data, checkpoints or config files.

Cheap static checks over every source file we ship (what docs/reliability.md, "Security and
isolation", says was reviewed), and one behavioural check that a stage name can never import code.
"""

import ast
from pathlib import Path

import pytest

from conftest import REPO
from rayalign.config import RunConfig, validate_stages
from rayalign.errors import RayalignError
from rayalign.plugins import get_plugin_manager

SHIPPED = [p for d in ("platform", "plugins", "recipes", "benchmarks", "deploy") for p in (REPO / d).rglob("*.py")
           if ".egg-info" not in str(p) and "/tests/" not in str(p)]

# Calls that turn bytes into code or arbitrary objects. yaml.load is unsafe without SafeLoader.
FORBIDDEN = {
    ("pickle", "load"), ("pickle", "loads"), ("cloudpickle", "load"), ("cloudpickle", "loads"),
    ("dill", "load"), ("dill", "loads"), ("marshal", "loads"), ("yaml", "load"), ("yaml", "unsafe_load"),
    ("yaml", "full_load"), ("shelve", "open"), ("importlib", "import_module"), ("util", "spec_from_file_location"),
}
BUILTINS = {"eval", "exec", "__import__"}


def calls():
    for path in SHIPPED:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call):
                yield path.relative_to(REPO), node


def dotted(func) -> tuple[str, str] | None:
    if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
        return func.value.id, func.attr
    if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Attribute):
        return func.value.attr, func.attr
    return None


def test_the_scan_sees_our_sources():
    names = {str(p.relative_to(REPO)) for p in SHIPPED}
    assert "platform/rayalign/workers/trainer.py" in names and "plugins/rayalign_sft/stage.py" in names


def test_every_torch_load_is_weights_only():
    found, bad = 0, []
    for path, node in calls():
        if dotted(node.func) == ("torch", "load"):
            found += 1
            flag = next((k.value for k in node.keywords if k.arg == "weights_only"), None)
            if not (isinstance(flag, ast.Constant) and flag.value is True):
                bad.append(f"{path}:{node.lineno}")
    assert found >= 1  # the RNG states of a checkpoint
    assert not bad, f"torch.load without weights_only=True: {bad}"


def test_no_unpickling_eval_or_dynamic_imports():
    bad = []
    for path, node in calls():
        name = dotted(node.func)
        if name in FORBIDDEN or (isinstance(node.func, ast.Name) and node.func.id in BUILTINS):
            bad.append(f"{path}:{node.lineno}: {ast.unparse(node.func)}")
        if any(k.arg == "trust_remote_code" and not (isinstance(k.value, ast.Constant) and k.value.value is False)
               for k in node.keywords):
            bad.append(f"{path}:{node.lineno}: trust_remote_code")
    for path in SHIPPED:  # `from pickle import loads` would hide the call from the check above
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and any((node.module or "").split(".")[-1] == m and a.name == f
                                                        for m, f in FORBIDDEN | {("torch", "load")} for a in node.names):
                bad.append(f"{path.relative_to(REPO)}:{node.lineno}: from {node.module} import ...")
    assert not bad, "code or objects loaded from files/config:\n" + "\n".join(bad)


def test_plugins_come_only_from_installed_entry_points():
    """plugins.py imports nothing but ``importlib.metadata`` entry points (and Python objects tests pass)."""
    source = (REPO / "platform" / "rayalign" / "plugins.py").read_text()
    loaders = {"load", "import_module", "entry_points", "spec_from_file_location", "__import__", "exec_module"}
    loads = [ast.unparse(n.func) for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Call)
             and ast.unparse(n.func).split(".")[-1] in loaders]
    assert loads == ["importlib.metadata.entry_points", "ep.load"], loads


@pytest.mark.parametrize("name", ["{path}", "{module}", "{module}:register_stages", "os:system"])
def test_a_stage_named_in_a_config_never_imports_code(tmp_path, monkeypatch, name):
    marker = tmp_path / "imported"
    evil = tmp_path / "evil_plugin.py"
    evil.write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    monkeypatch.chdir(tmp_path)  # even from the data's own directory
    stage = name.format(path=evil, module="evil_plugin")
    with pytest.raises(RayalignError, match="no plugin provides stage"):
        validate_stages(RunConfig(stages=[{stage: {}}]), get_plugin_manager().stages)
    assert not marker.exists()
