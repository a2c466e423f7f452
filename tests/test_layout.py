"""platform/ is a source root: a module named `platform` would shadow the standard library."""

import importlib
import subprocess
import sys

from conftest import REPO


def test_platform_dir_is_not_a_package():
    assert not (REPO / "platform" / "__init__.py").exists()


def test_stdlib_platform_still_resolves_with_repo_on_path():
    # Ray puts the working dir first on sys.path; the stdlib module must still win.
    code = "import platform, sys; assert hasattr(platform, 'python_version'), platform.__file__; print(platform.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert "site-packages" not in out.stdout and str(REPO / "platform") not in out.stdout


def test_rayalign_comes_from_platform_dir():
    rayalign = importlib.import_module("rayalign")
    assert rayalign.__file__.startswith(str(REPO / "platform" / "rayalign"))
