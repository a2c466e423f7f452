"""Shared fixtures: the tiny local model, its tokenizer, and a scratch cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# A built-in stage that returns a dataset or model its ``produces`` does not declare fails the test
# (users get a warning): later stages' names are checked against that declaration. Set at import,
# so recipe subprocesses inherit it too.
os.environ.setdefault("RAYALIGN_STRICT_OUTPUTS", "1")
# Every ray.init without an address starts a cluster of its own. Unset, Ray would attach to a cluster
# that `ray start` left on the machine: one the multi-node or job tests start, in the other test
# process (`make test` runs two).
os.environ.setdefault("RAY_ADDRESS", "local")


# The modules that take longest (CI's --durations: whole-recipe fixtures, the benchmarks' dry runs),
# longest first. `make test` hands modules to its two processes in collection order; these going
# first leaves short modules for the end, so neither process sits idle while the other finishes a
# long one.
LONGEST_MODULES = ("test_benchmarks.py", "test_fixes_recipe.py", "test_rl_recipe.py", "test_training.py",
                   "test_recipe_e2e.py", "test_reliability.py", "test_tools_recipe.py", "test_async_rl.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return LONGEST_MODULES.index(name) if name in LONGEST_MODULES else len(LONGEST_MODULES)

    items.sort(key=rank)  # stable: every module's tests keep their order


def run_recipe(script: str, out: Path, timeout: float) -> tuple[Path, dict[str, dict], str]:
    """``recipes/<script>`` as the README runs it (its default config) into ``out``: the output
    directory, each stage's summary record by stage name, and the recipe's stdout."""
    import json
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, str(REPO / "recipes" / script), f"output_dir={out}"],
                          capture_output=True, text=True, timeout=timeout, env={**os.environ, "RAY_ADDRESS": "local"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    return out, {s["stage"]: s for s in summary["stages"]}, proc.stdout


@pytest.fixture(scope="session")
def tiny_model_path() -> str:
    from rayalign.embedded import embedded_model_path

    return str(embedded_model_path(seed=0))


@pytest.fixture(scope="session")
def tokenizer(tiny_model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_path)


@pytest.fixture
def recipe_env(tmp_path) -> dict[str, str]:
    """Environment for running a recipe as a subprocess."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.fixture(autouse=True)
def _capture_rayalign_log(caplog):
    """The pipeline's logger does not propagate to the root (no duplicate lines under Ray), so
    hand caplog's handler to it directly."""
    import logging

    logger = logging.getLogger("rayalign")
    logger.addHandler(caplog.handler)
    yield
    logger.removeHandler(caplog.handler)


@pytest.fixture(scope="module", autouse=True)
def _ray_does_not_outlive_its_module():
    """A test module starts the Ray it needs (``ray.init`` or ``rayalign.testing``); one left running
    would make the next module's ``ray.init`` fail or hand it a cluster sized for other tests."""
    yield
    import ray

    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture(scope="module", autouse=True)
def _environment_does_not_outlive_its_module():
    """vLLM run in the test process writes os.environ (LD_PRELOAD of torch's libgomp, its multiproc
    method, ...). Processes started later inherit it, e.g. the next module's Ray workers, which a
    user's driver never hands them: each module gets the environment it started with."""
    import os

    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="session", autouse=True)
def _token_cache_in_a_scratch_dir(tmp_path_factory):
    """Stages cache tokenizations (``rayalign.data.token_cache``); tests keep them out of the home cache."""
    if not os.environ.get("RAYALIGN_CACHE_DIR"):
        os.environ["RAYALIGN_CACHE_DIR"] = str(tmp_path_factory.mktemp("token-cache"))
    yield
