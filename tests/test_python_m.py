"""``python -m rayalign`` is the ``rayalign`` command: same output, same exit status."""

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(sys.executable).with_name("rayalign")  # the console script `pip install` puts beside python


def run(*cmd):
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=120)


def test_python_m_rayalign_plugins_lists_what_the_command_lists():
    module = run(sys.executable, "-m", "rayalign", "plugins")
    assert module.returncode == 0, module.stderr[-2000:]
    assert "stages: " in module.stdout and "sft (" in module.stdout
    assert SCRIPT.exists(), f"no rayalign script beside {sys.executable}: is rayalign installed?"
    command = run(str(SCRIPT), "plugins")
    assert command.returncode == 0 and module.stdout == command.stdout


def test_python_m_rayalign_fails_as_the_command_does(tmp_path):
    missing = tmp_path / "missing.yaml"
    proc = run(sys.executable, "-m", "rayalign", "run", str(missing))
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [f"rayalign: config error: {missing}: config file does not exist"]
    usage = run(sys.executable, "-m", "rayalign")
    assert usage.returncode == 2 and usage.stderr.startswith("usage: rayalign ")
