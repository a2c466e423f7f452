"""benchmarks/gpu_tests.py: the `gpu` tests' outcomes, written into a result file by the script.

A planted test file stands in for the GPU suite: a pass that records a property, a failure, an
error in setup, a skip, an unmarked test (not run: the script runs `gpu` tests only) and, for the
time limit, a test that hangs.
"""

import json
import sys

from conftest import REPO
from test_result_provenance import provenance_problems

sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_tests  # noqa: E402

PLANTED = '''
import time
import pytest

pytestmark = pytest.mark.gpu

def test_passes(record_property):
    record_property("device_peak_gib_by_phase", {"generate": 41.5})

def test_fails():
    assert 1 + 1 == 3, "arithmetic broke"

@pytest.fixture
def engine():
    raise RuntimeError("CUDA error: out of memory")

def test_setup_error(engine):
    pass

def test_skipped():
    pytest.skip("needs two GPUs")

@pytest.mark.skipif(not __import__("os").environ.get("PLANTED_HAS_EIGHT_GPUS"), reason="needs eight GPUs")
def test_skipped_by_mark():
    pass

def test_hangs():
    if __import__("os").environ.get("HANG"):
        time.sleep(600)
'''

UNMARKED = '''
def test_not_a_gpu_test():
    pass
'''


def planted(tmp_path):
    tests = tmp_path / "suite"
    tests.mkdir()
    (tests / "test_planted.py").write_text(PLANTED)
    (tests / "test_unmarked.py").write_text(UNMARKED)
    return tests


def run(tmp_path, *args):
    out = tmp_path / "out"
    code = gpu_tests.main(["--out", str(out), *args, "--", "-p", "no:cacheprovider", "-q",
                           "--rootdir", str(tmp_path), str(planted(tmp_path))])
    (path,) = out.glob("*.json")
    return code, path, json.loads(path.read_text())


def test_each_outcome_and_recorded_property_lands_in_the_result_file(tmp_path):
    code, path, result = run(tmp_path, "--name", "planted")
    assert code == 1 and path.name.endswith("-gpu_tests-planted.json")
    tests = {nodeid.split("::")[-1]: t for nodeid, t in result["tests"].items()}
    assert {name: t["outcome"] for name, t in tests.items()} == {
        "test_passes": "passed", "test_fails": "failed", "test_setup_error": "error",
        "test_skipped": "skipped", "test_skipped_by_mark": "skipped", "test_hangs": "passed"}
    assert tests["test_passes"]["properties"] == {"device_peak_gib_by_phase": {"generate": 41.5}}
    assert "arithmetic broke" in tests["test_fails"]["reason"]
    assert "out of memory" in tests["test_setup_error"]["reason"]
    assert tests["test_skipped"]["reason"] == "needs two GPUs"
    assert tests["test_skipped_by_mark"]["reason"] == "needs eight GPUs"
    assert result["counts"] == {"passed": 2, "failed": 1, "error": 1, "skipped": 2}
    assert result["pytest_exit_code"] == 1 and not result["timed_out"] and result["unfinished"] is None
    # the provenance every committed result file must carry, by the same check
    assert result["command"].startswith("python") and provenance_problems(result) == []


def test_a_run_past_its_time_limit_keeps_the_tests_that_finished(tmp_path, monkeypatch):
    monkeypatch.setenv("HANG", "1")
    code, _, result = run(tmp_path, "--timeout", "40")  # room for pytest to start on a busy machine
    assert code == 1 and result["timed_out"]
    assert result["unfinished"].endswith("::test_hangs")
    tests = {nodeid.split("::")[-1]: t["outcome"] for nodeid, t in result["tests"].items()}
    assert tests == {"test_passes": "passed", "test_fails": "failed", "test_setup_error": "error",
                     "test_skipped": "skipped", "test_skipped_by_mark": "skipped", "test_hangs": "unfinished"}
