"""docs/writing-plugins.md's example plugin through `ray job submit`, against a private local Ray
head (deploy/local_head.sh): the job's driver finds the plugin by its entry point, the import
check passes on the head's node, and the stage's outputs land where the config says."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


@pytest.mark.timeout(900)
def test_the_example_plugin_runs_through_ray_job_submit(tmp_path, tiny_model_path):
    job_dir = tmp_path / "job"  # what --working-dir uploads: the recipe only
    job_dir.mkdir()
    out = tmp_path / "run"
    (job_dir / "my_recipe.yaml").write_text(
        f"model: {tiny_model_path}\noutput_dir: {out}\nstages:\n"
        "  - reward_eval: {num_prompts: 2, max_new_tokens: 4, rewards: {mentions_reference: 1.0}, "
        "metrics: [exclamation_rate]}\n")
    env = dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}", RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token")
    env.pop("RAY_ADDRESS", None)
    subprocess.run([BIN / "ray", "get-auth-token", "--generate"], env=env, check=True, capture_output=True)
    proc = subprocess.run(
        ["bash", REPO / "deploy" / "local_head.sh", "ray", "job", "submit", "--working-dir", str(job_dir), "--",
         "python", "-m", "rayalign", "run", "my_recipe.yaml"],
        cwd=job_dir, env=env, capture_output=True, text=True, timeout=840)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "succeeded" in proc.stdout + proc.stderr
    assert "plugins the run uses import on all 1 node(s): example (rayalign_example)" in proc.stdout + proc.stderr
    record = json.loads((out / "00-reward_eval" / "metrics.json").read_text())
    assert record["stage"] == "reward_eval"
    assert 0.0 <= record["metrics"]["exclamation_rate"] <= 1.0 and "mean_reward" in record["metrics"]
    rows = [json.loads(line) for line in (out / "00-reward_eval" / "scored.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and {"prompt", "completion", "reward"} <= set(rows[0])
