"""Inside a Ray job a relative ``output_dir`` is refused before any work; outside one it works as ever.

``ray job submit --working-dir .`` runs the driver with ``RAY_JOB_CONFIG_JSON_ENV_VAR`` set, in
the job's unpacked copy of the working directory under ``.../runtime_resources/working_dir_files/``,
which Ray deletes with its session. The tests give a driver that environment and that directory.
"""

import json
import os
import subprocess
import sys

import pytest
import yaml

from rayalign.config import check_output_dir
from rayalign.errors import ConfigError

# What Ray's job supervisor sets for the driver it starts (ray/dashboard/modules/job/job_supervisor.py).
JOB_VAR = "RAY_JOB_CONFIG_JSON_ENV_VAR"
JOB_CONFIG = json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg_0f1e.zip"},
                         "metadata": {"job_submission_id": "raysubmit_x"}})


@pytest.fixture
def job_dir(tmp_path):
    path = tmp_path / "session_1" / "runtime_resources" / "working_dir_files" / "_ray_pkg_0f1e"
    path.mkdir(parents=True)
    return path


def test_a_relative_output_dir_is_refused_in_a_job_naming_why_and_the_absolute_form(job_dir, monkeypatch):
    monkeypatch.chdir(job_dir)
    monkeypatch.setenv(JOB_VAR, JOB_CONFIG)
    with pytest.raises(ConfigError) as exc:
        check_output_dir("runs/sft_then_dpo/20261202-060000")
    assert str(exc.value) == (
        "config error: output_dir: 'runs/sft_then_dpo/20261202-060000' is relative, and this Ray job runs in "
        f"Ray's temporary copy of its working directory ({job_dir}), deleted with the session and unpacked "
        "separately on each node; give an absolute path on storage every node sees, e.g. "
        "output_dir=$PWD/runs/sft_then_dpo/20261202-060000 on the ray job submit line")
    for fine in (str(job_dir.parent / "persistent"), "~/runs/x"):  # absolute, or the user's home
        check_output_dir(fine)


def test_a_job_without_a_working_dir_is_refused_too(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(JOB_VAR, JOB_CONFIG)
    with pytest.raises(ConfigError, match=rf"'runs/x' is relative, and this Ray job runs in {tmp_path}, where Ray "
                       r"started its driver, not where it was submitted; .* e\.g\. output_dir=\$PWD/runs/x "):
        check_output_dir("runs/x")


def test_outside_a_job_relative_is_fine(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(JOB_VAR, raising=False)
    check_output_dir("runs/x")


def test_the_job_driver_stops_before_any_work(job_dir, tmp_path):
    """The real command in the job's directory: one line, exit 2, nothing created (no output, no model built)."""
    config = job_dir / "c.yaml"
    config.write_text(yaml.safe_dump({"output_dir": "runs/{time}", "stages": [{"sft": {}}]}))
    cache = tmp_path / "cache"  # an empty cache: any work would build the embedded model here
    env = {**os.environ, JOB_VAR: JOB_CONFIG, "RAYALIGN_CACHE": str(cache)}
    proc = subprocess.run([sys.executable, "-m", "rayalign", "run", "c.yaml"], capture_output=True, text=True,
                          cwd=job_dir, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("rayalign: config error: output_dir: 'runs/"), proc.stderr
    assert "is relative, and this Ray job runs in Ray's temporary copy" in lines[0]
    assert sorted(p.name for p in job_dir.iterdir()) == ["c.yaml"] and not cache.exists()
