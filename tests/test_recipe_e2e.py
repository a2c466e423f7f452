"""The whole spine as a user runs it: `ray start --head`, then `ray job submit` of the recipe.

One real cluster and one job for the module (the job takes a few minutes on 2 CPU cores); the
tests then read what the job left: its status, the stage outputs, the actors it named.
"""

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    # Token auth on, as `ray start` enables it: the CLI clients then send ~/.ray/auth_token.
    env = dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}", RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token")
    env.pop("RAY_ADDRESS", None)
    gcs, dash = free_port(), free_port()
    temp_dir = tmp / "ray"
    # A fresh machine has no token yet: create one (kept if it exists), as `make demo` does.
    subprocess.run([BIN / "ray", "get-auth-token", "--generate"], env=env, check=True, capture_output=True)
    subprocess.run(
        [BIN / "ray", "start", "--head", f"--port={gcs}", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dash}", "--num-cpus=2", f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        env=env, check=True, capture_output=True, timeout=180,
    )
    out = tmp / "run"
    try:
        for _ in range(20):
            proc = subprocess.run(
                [BIN / "ray", "job", "submit", "--address", f"http://127.0.0.1:{dash}", "--working-dir", str(REPO),
                 "--", "python", "recipes/sft_then_dpo.py", f"output_dir={out}"],
                env=env, capture_output=True, text=True, timeout=1500,
            )
            # A loaded machine can take a while to register the dashboard agent after `ray start`;
            # until then the job is refused, never started, so submitting again is safe.
            if "No available agent to submit job" not in proc.stdout + proc.stderr:
                break
            time.sleep(3)
        actors = subprocess.run(
            [BIN / "ray", "list", "actors", "--address", f"127.0.0.1:{gcs}", "--format", "json", "--limit", "1000"],
            env=env, capture_output=True, text=True, timeout=120,
        )
    finally:
        stop_cluster(temp_dir)
    yield proc, out, actors.stdout


def stop_cluster(temp_dir: Path) -> None:
    """Kill the processes of the cluster this test started, and only those. (`ray stop` kills every
    Ray process on the machine, including the in-process cluster of this very pytest run, whose
    core worker then exits the test process when its raylet disappears.)"""
    import psutil

    mine = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(str(temp_dir) in arg for arg in p.info["cmdline"] or []):
                mine.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    for p in mine:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(mine, timeout=30)


def stage(out: Path, index: int, name: str) -> dict:
    return json.loads((out / f"{index:02d}-{name}" / "metrics.json").read_text())


def test_job_succeeds(job):
    proc, out, _ = job
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "succeeded" in proc.stdout + proc.stderr
    assert "=== results ===" in proc.stdout  # the recipe's summary reaches the job log
    assert [p.name for p in sorted(out.iterdir()) if p.is_dir()] == [
        "00-sft", "01-generate", "02-dpo", "03-generate"]


def test_sft_learns_and_progress_is_logged(job):
    proc, out, _ = job
    metrics = stage(out, 0, "sft")["metrics"]
    assert metrics["eval_loss"] < 0.5 * metrics["eval_loss_before"]
    assert "[sft] |####################|" in proc.stdout and "eta" in proc.stdout


def test_dpo_reward_accuracy_rises_above_0_6(job):
    _, out, _ = job
    metrics = stage(out, 2, "dpo")["metrics"]
    assert metrics["reward_accuracy"] > 0.6
    assert metrics["reward_accuracy"] > metrics["reward_accuracy_before"]
    assert metrics["reward_margin"] > metrics["reward_margin_before"]
    assert (out / "02-dpo" / "reference_logps.pt").exists()


def test_vllm_samples_from_each_trained_model(job):
    proc, out, _ = job
    for index, source in ((1, "00-sft"), (3, "02-dpo")):
        record = stage(out, index, "generate")
        assert record["input_model"] == str(out / source / "model")  # vLLM loaded that stage's weights
        rows = [json.loads(line) for line in (out / f"0{index}-generate" / "generations.jsonl").open()]
        assert len(rows) == record["metrics"]["samples"] == 8
        assert all(r["num_tokens"] > 0 for r in rows)
    assert proc.stdout.count("    A: ") >= 6  # a few samples shown in the job log


def test_stage_models_load_with_transformers(job):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, out, _ = job
    for name in ("00-sft", "02-dpo"):
        model = AutoModelForCausalLM.from_pretrained(out / name / "model")
        tok = AutoTokenizer.from_pretrained(out / name / "model")
        ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
        assert model(input_ids=ids).logits.shape[-1] == len(tok)


def test_actors_are_named_by_stage_role_and_rank(job):
    _, _, actors = job
    names = {a.get("name") for a in json.loads(actors)}
    assert {"sft/trainer/0", "generate/rollout/0", "dpo/trainer/0", "dpo/reference/0"} <= names


def test_summary_records_lineage(job):
    _, out, _ = job
    summary = json.loads((out / "summary.json").read_text())
    lineage = summary["lineage"]
    assert [s["stage"] for s in lineage] == ["sft", "generate", "dpo", "generate"]
    assert lineage[2]["input_model"] == str(out / "00-sft" / "model")
