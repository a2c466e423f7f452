"""Every result file under benchmarks/results/ says how it was made, as the scripts write it.

``benchmarks/common.py``'s ``write_result`` writes the command as run (``command``, each argument
``shlex``-quoted, and ``command_argv``), the git commit and whether the tree differed from it
(``dirty``), the package versions and the device, then the script's settings and raw figures. A
file edited by hand, trimmed, or written by a script that records less cannot pass, so no figure
is published without the run behind it.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
FILES = sorted(RESULTS.rglob("*.json"))
UNEXPANDED = re.compile(r"\$\{?[A-Za-z_][A-Za-z0-9_]*")  # $OUT, ${OUT}: a variable nobody expanded


def _commits_are_checkable() -> bool:
    """A full clone can tell whether a commit exists; a shallow one (or no git at all) cannot."""
    try:
        shallow = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--is-shallow-repository"],
                                 capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return shallow.returncode == 0 and shallow.stdout.strip() == "false"


def _numbers(value) -> list[list[float]]:
    """Every list of numbers anywhere in ``value``: the raw figures (samples, losses, step times)."""
    if isinstance(value, dict):
        return [found for v in value.values() for found in _numbers(v)]
    if isinstance(value, list):
        if value and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            return [value]
        return [found for v in value for found in _numbers(v)]
    return []


def provenance_problems(result: dict, commit_exists=None) -> list[str]:
    """What ``result`` lacks to be traceable to the run that wrote it (empty: nothing)."""
    problems = []
    argv, command = result.get("command_argv"), result.get("command")
    if argv is None and command is None:
        problems.append("no command or command_argv")
    if argv is not None:
        if not (isinstance(argv, list) and argv and all(isinstance(a, str) for a in argv)):
            problems.append("command_argv is not a list of strings")
        else:
            if any(UNEXPANDED.search(a) for a in argv):
                problems.append(f"command_argv holds an unexpanded variable: {argv}")
            if command is not None and command != shlex.join([Path(argv[0]).name, *argv[1:]]):
                problems.append(f"command {command!r} is not command_argv as the writer joins it")
    if command is not None:
        if not isinstance(command, str) or not command.strip():
            problems.append("command is empty")
        else:
            if UNEXPANDED.search(command):
                problems.append(f"command holds an unexpanded variable: {command!r}")
            try:
                requoted = shlex.join(shlex.split(command))
            except ValueError:  # an unbalanced quote
                requoted = None
            if requoted != command:
                problems.append(f"command {command!r} is not quoted as the writer quotes it (edited by hand?)")
    commit = result.get("git_commit")
    if not (isinstance(commit, str) and re.fullmatch(r"[0-9a-f]{7,40}", commit)):
        problems.append(f"git_commit is not a commit id: {commit!r}")
    elif commit_exists is not None and not commit_exists(commit):
        problems.append(f"git_commit {commit} is not a commit of this repository")
    if not isinstance(result.get("dirty"), bool):
        problems.append(f"dirty is not true or false: {result.get('dirty')!r}")
    versions = result.get("versions")
    if not (isinstance(versions, dict) and isinstance(versions.get("torch"), str)):
        problems.append("versions lacks torch's")
    if not (isinstance(result.get("device"), str) and result["device"].strip()):
        problems.append("no device")
    if not (isinstance(result.get("settings"), dict) and result["settings"]):
        problems.append("no settings (what the script was asked to run)")
    if result.get("dry_run") is True:
        problems.append("a dry run (tiny shapes on CPU): not a measurement")
    # benchmarks/gpu_tests.py records each test's own outcome and seconds: a record per test is raw.
    per_test = isinstance(result.get("tests"), dict) and bool(result["tests"]) and all(
        isinstance(t, dict) and "outcome" in t and isinstance(t.get("seconds"), (int, float))
        for t in result["tests"].values())
    if not per_test and not _numbers({k: v for k, v in result.items() if k not in ("command_argv", "versions")}):
        problems.append("no raw figures (only summaries)")
    return problems


def _commit_exists(commit: str) -> bool:
    found = subprocess.run(["git", "-C", str(REPO), "cat-file", "-e", f"{commit}^{{commit}}"], capture_output=True)
    return found.returncode == 0


def test_there_are_result_files():
    assert FILES, f"no result files under {RESULTS}"


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(RESULTS)) for p in FILES])
def test_result_file_says_how_it_was_made(path):
    result = json.loads(path.read_text())
    assert isinstance(result, dict), f"{path}: not a JSON object"
    problems = provenance_problems(result, _commit_exists if _commits_are_checkable() else None)
    assert not problems, f"{path.relative_to(REPO)}: " + "; ".join(problems)


def test_the_writer_passes_its_own_check(tmp_path, monkeypatch):
    """What ``common.write_result`` writes passes, so the check asks no more than the scripts give."""
    import sys

    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    monkeypatch.setattr(sys, "argv", ["benchmarks/x.py", "--out", str(tmp_path), "--note", "two words"])
    import common

    path = common.write_result(tmp_path, "x", {"dry_run": False, "settings": {"steps": 2}, "step_seconds": [0.5, 0.4]})
    result = json.loads(path.read_text())
    assert provenance_problems(result) == []
    assert result["command"].endswith("--note 'two words'")


def test_a_run_that_crosses_midnight_keeps_one_file(tmp_path, monkeypatch):
    # Scripts rewrite their file after each side; the name must not follow the clock.
    import time

    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import common

    first = common.write_result(tmp_path, "x", {"settings": {"steps": 2}, "step_seconds": [0.5]})
    strftime = time.strftime
    monkeypatch.setattr(time, "strftime", lambda fmt, *t: "20991231" if fmt == "%Y%m%d" else strftime(fmt, *t))
    second = common.write_result(tmp_path, "x", {"settings": {"steps": 2}, "step_seconds": [0.5, 0.4]})
    assert second == first and [p.name for p in tmp_path.glob("*.json")] == [first.name]


@pytest.mark.parametrize("edit, problem", [
    (lambda r: r.update(command="python3 benchmarks/x.py --out $OUT", command_argv=None), "unexpanded variable"),
    (lambda r: r.update(command_argv=[*r["command_argv"][:-1], "${OUT}"]), "unexpanded variable"),
    (lambda r: r.update(command=r["command"] + " --steps 9"), "not command_argv as the writer joins it"),
    (lambda r: r.pop("command_argv") and r.update(command="CUDA_VISIBLE_DEVICES=1 python x.py '$a"), "quoted"),
    (lambda r: r.update(git_commit="8bda6a2+fixes"), "git_commit is not a commit id"),
    (lambda r: r.pop("dirty"), "dirty"),
    (lambda r: r.pop("device"), "no device"),
    (lambda r: r.pop("versions"), "versions"),
    (lambda r: r.pop("settings"), "no settings"),
    (lambda r: r.update(dry_run=True), "dry run"),
    (lambda r: r.pop("step_seconds"), "no raw figures"),
])
def test_each_missing_or_edited_field_is_named(edit, problem):
    argv = ["/usr/bin/python3", "benchmarks/x.py", "--out", "/root/out"]
    result = {"command": shlex.join(["python3", *argv[1:]]), "command_argv": argv, "git_commit": "0" * 40,
              "dirty": False, "versions": {"torch": "2.11.0"}, "device": "NVIDIA H200", "dry_run": False,
              "settings": {"steps": 2}, "step_seconds": [0.5, 0.4]}
    assert provenance_problems(dict(result)) == []
    edit(result)
    result = {k: v for k, v in result.items() if v is not None}
    assert any(problem in p for p in provenance_problems(result)), provenance_problems(result)
