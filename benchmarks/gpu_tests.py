"""Run the `gpu` tests and write what each one did into a result file: the record behind
docs/performance.md's "GPU tests, last passed".

    python3 benchmarks/gpu_tests.py --out $OUT                                  # pytest -m gpu tests/
    python3 benchmarks/gpu_tests.py --name memory --out $OUT -- tests/test_gpu_rl_memory.py -k 1.5b

The GPU machine allows ten minutes a call, so the suite runs over several calls: ``--name`` gives
each its own file (``<device>-<yyyymmdd>-gpu_tests-<name>.json``). Arguments after ``--`` go to
pytest as they are; ``-m gpu`` is always added, so only `gpu` tests run. The file holds each test's
outcome (passed, failed, error, skipped, or unfinished), its seconds, the first line of its failure or skip
reason, and what it recorded with pytest's ``record_property`` (the colocated GRPO tests' device
peak per phase). The outcomes are written by a pytest plugin (this module, ``-p gpu_tests``) as
each test finishes, so a run stopped at ``--timeout`` (its whole process group: SIGTERM, then
SIGKILL) still records the tests that finished, and says which one was running.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
REPORTS = "RAYALIGN_GPU_TEST_REPORTS"  # where the plugin in the pytest process appends its lines


# -- the plugin, in the pytest process ------------------------------------------------------------

def _reason(report) -> str:
    """The first line of a failure or skip: a skip's reason, or an exception's last line."""
    longrepr = report.longrepr
    if isinstance(longrepr, tuple):  # a skip: (file, line, "Skipped: reason")
        return str(longrepr[2]).removeprefix("Skipped: ")
    crash = getattr(longrepr, "reprcrash", None)
    text = crash.message if crash is not None else str(longrepr or "")
    return (text.strip().splitlines() or [""])[0][:300]


def pytest_runtest_logstart(nodeid, location):
    with open(os.environ[REPORTS], "a") as f:
        f.write(json.dumps({"nodeid": nodeid, "started": True}) + "\n")


def pytest_runtest_logreport(report):
    line = {"nodeid": report.nodeid, "when": report.when, "outcome": report.outcome,
            "seconds": report.duration, "properties": dict(report.user_properties)}
    if report.outcome != "passed":
        line["reason"] = _reason(report)
    with open(os.environ[REPORTS], "a") as f:
        f.write(json.dumps(line, default=str) + "\n")


# -- the runner ----------------------------------------------------------------------------------

def outcomes(lines: list[dict]) -> tuple[dict[str, dict], str | None]:
    """Each test's outcome from the plugin's lines (a test that fails in setup or teardown is an
    ``error``, one skipped in setup ``skipped``, one that started and never finished ``unfinished``),
    and the name of that last one."""
    tests, unfinished = {}, None
    for line in lines:
        nodeid = line["nodeid"]
        if line.get("started"):
            unfinished = nodeid
            continue
        test = tests.setdefault(nodeid, {"outcome": "passed", "seconds": 0.0, "properties": {}})
        test["seconds"] += line["seconds"]
        test["properties"].update(line["properties"])
        if line["outcome"] == "skipped" and test["outcome"] == "passed":
            test.update(outcome="skipped", reason=line.get("reason", ""))
        elif line["outcome"] == "failed" and test["outcome"] not in ("failed", "error"):
            test.update(outcome="failed" if line["when"] == "call" else "error", reason=line.get("reason", ""))
        if line["when"] == "teardown" and unfinished == nodeid:
            unfinished = None
    if unfinished is not None:  # stopped at the time limit, or pytest itself died (a crash in a kernel)
        tests.setdefault(unfinished, {"seconds": 0.0, "properties": {}}).update(
            outcome="unfinished", reason="still running when pytest stopped")
    return tests, unfinished


def run_tests(pytest_args: list[str], timeout_s: float | None) -> dict:
    """pytest ``-m gpu`` with ``pytest_args`` in its own process group; what each test did."""
    from processes import stop_process_group

    with tempfile.TemporaryDirectory(prefix="rayalign-gpu-tests-") as tmp:
        reports = Path(tmp) / "reports.jsonl"
        reports.touch()
        env = {**os.environ, REPORTS: str(reports),
               "PYTHONPATH": os.pathsep.join(p for p in (str(BENCH), os.environ.get("PYTHONPATH")) if p)}
        cmd = [sys.executable, "-m", "pytest", "-p", "gpu_tests", "-m", "gpu", "-ra", *pytest_args]
        print(f"running: {' '.join(cmd)}", flush=True)
        started = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True)
        try:
            exit_code, timed_out = proc.wait(timeout=timeout_s), False
        except subprocess.TimeoutExpired:
            stop_process_group(proc)
            exit_code, timed_out = proc.returncode, True
        seconds = time.monotonic() - started
        tests, unfinished = outcomes([json.loads(line) for line in reports.read_text().splitlines() if line])
    counts = dict(Counter(test["outcome"] for test in tests.values()))
    return {"pytest_exit_code": exit_code, "timed_out": timed_out, "unfinished": unfinished, "seconds": seconds,
            "counts": counts, "tests": tests}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", str(BENCH / "results")), help="directory for the result JSON")
    ap.add_argument("--name", help="this call's part of the suite: the file is gpu_tests-<name>")
    ap.add_argument("--timeout", type=float, help="stop pytest after this many seconds (the tests that finished "
                                                  "are recorded)")
    ap.add_argument("pytest_args", nargs="*", help="after --: test paths and pytest options (default: tests/)")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(BENCH))
    import common

    pytest_args = args.pytest_args or ["tests/"]
    run = run_tests(pytest_args, args.timeout)
    for nodeid, test in sorted(run["tests"].items()):
        print(f"{test['outcome']:>8} {test['seconds']:7.1f}s {nodeid} {test.get('reason', '')}", flush=True)
    if run["timed_out"]:
        print(f"stopped after {args.timeout:.0f}s while running {run['unfinished']}", flush=True)
    common.write_result(args.out, "gpu_tests" + (f"-{args.name}" if args.name else ""),
                        {"settings": {"pytest_args": pytest_args, "timeout_s": args.timeout},
                         **run})
    return 0 if run["pytest_exit_code"] == 0 and not run["timed_out"] else 1


if __name__ == "__main__":
    sys.exit(main())
