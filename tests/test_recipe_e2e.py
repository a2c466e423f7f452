"""The whole spine as `make demo` runs it: a private Ray head (deploy/local_head.sh), then `ray job
submit` of the recipe, with another Ray already running on the machine.

One job for the module (a few minutes on 2 CPU cores); the tests then read what the job left: its
status and log, the stage outputs, the actors it named, and whether the other Ray survived.
"""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def free_port() -> int:
    """A free port outside the range Ray keeps for its workers (10002-19999)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if not 10002 <= port <= 19999:
            return port


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    # Token auth on, as `ray start` enables it: the CLI clients then send ~/.ray/auth_token.
    env = dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}", RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token")
    env.pop("RAY_ADDRESS", None)
    # Someone else's Ray on the same machine, started first: the demo must leave it running.
    # Its own short temp dir: Ray's socket paths must stay under 107 bytes, and pytest's (under xdist:
    # .../popen-gw0/e2e0/...) leave too little room.
    other = Path(tempfile.mkdtemp(prefix="ra-e2e-", dir="/tmp"))
    other_gcs = free_port()
    subprocess.run([BIN / "ray", "get-auth-token", "--generate"], env=env, check=True, capture_output=True)
    # In a session of its own, by which the test finds all of it again to stop it.
    starter_log = tmp / "other-ray.log"
    with starter_log.open("w") as log:
        starter = subprocess.Popen(
            [BIN / "ray", "start", "--head", f"--port={other_gcs}", f"--temp-dir={other}", "--num-cpus=1",
             "--include-dashboard=false", f"--dashboard-agent-listen-port={free_port()}",
             f"--ray-client-server-port={free_port()}", "--disable-usage-stats"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    out = tmp / "run"
    try:
        started = starter.wait(timeout=180) == 0
        assert started, f"the other Ray did not start: {starter_log.read_text()[-3000:]}"
        other_before = processes_under(other)
        # What `make demo` runs, plus the actor list taken before the head goes.
        script = (f'ray job submit --working-dir {REPO} --runtime-env-json \'{{"excludes": ["/runs/", "/.venv/"]}}\' '
                  f'-- python recipes/sft_then_dpo.py "output_dir={out}"; '
                  f'status=$?; ray list actors --format json --limit 1000 > {tmp / "actors.json"}; exit $status')
        proc = subprocess.run(["bash", REPO / "deploy" / "local_head.sh", "bash", "-c", script], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=1500)
        time.sleep(2)  # processes the script SIGKILLed may linger a moment before they are reaped
        other_after = processes_under(other)
        alive = subprocess.run([BIN / "ray", "status", f"--address=127.0.0.1:{other_gcs}"], env=env,
                               capture_output=True, text=True, timeout=120)
    finally:
        stop_session(starter.pid)
        shutil.rmtree(other, ignore_errors=True)
    actors = (tmp / "actors.json").read_text() if (tmp / "actors.json").exists() else "[]"
    yield proc, out, actors, (other_before, other_after, alive)


def processes_under(temp_dir: Path) -> set[int]:
    """Pids of the processes that name ``temp_dir`` on their command line (a Ray node's own)."""
    import psutil

    pids = set()
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(str(temp_dir) in arg for arg in p.info["cmdline"] or []):
                pids.add(p.info["pid"])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return pids


def in_session(sid: int) -> list[int]:
    import psutil

    return [pid for pid in psutil.pids() if _session(pid) == sid]


def _session(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except OSError:
        return None


def stop_session(sid: int) -> None:
    """Kill the processes of the Ray this test started, and only those: its session. (`ray stop`
    kills every Ray process on the machine, including the in-process cluster of this very pytest
    run, whose core worker then exits the test process when its raylet disappears.)"""
    import contextlib

    import psutil

    mine = []
    for pid in in_session(sid):
        with contextlib.suppress(psutil.NoSuchProcess):
            mine.append(psutil.Process(pid))
    for p in mine:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(mine, timeout=30)


def stage(out: Path, index: int, name: str) -> dict:
    return json.loads((out / f"{index:02d}-{name}" / "metrics.json").read_text())


def test_job_succeeds(job):
    proc, out, _, _ = job
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "succeeded" in proc.stdout + proc.stderr
    assert "=== results ===" in proc.stdout  # the recipe's summary reaches the job log
    assert [p.name for p in sorted(out.iterdir()) if p.is_dir()] == [
        "00-sft", "01-generate", "02-dpo", "03-generate"]


def test_sft_learns_and_progress_is_logged(job):
    proc, out, _, _ = job
    metrics = stage(out, 0, "sft")["metrics"]
    assert metrics["eval_loss"] < 0.5 * metrics["eval_loss_before"]
    assert "[sft] |####################|" in proc.stdout and "eta" in proc.stdout


def test_dpo_reward_and_preference_accuracy_rise(job):
    _, out, _, _ = job
    metrics = stage(out, 2, "dpo")["metrics"]
    assert metrics["reward_accuracy"] > 0.6
    assert metrics["reward_accuracy"] > metrics["reward_accuracy_before"]
    assert metrics["reward_margin"] > metrics["reward_margin_before"]
    # The policy's own preference on held-out pairs: SFT already prefers the true answers about
    # known people, not yet the declines about strangers; after DPO, (nearly) every chosen answer.
    assert 0 < metrics["preference_accuracy_before"] < metrics["preference_accuracy"]
    assert metrics["preference_accuracy"] >= 0.9
    assert (out / "02-dpo" / "reference_logps.pt").exists()


def test_dpo_visibly_changes_the_answers_to_held_out_questions(job):
    proc, out, _, _ = job
    before, after = stage(out, 1, "generate")["metrics"], stage(out, 3, "generate")["metrics"]
    # Questions about people the model was never told about: invented answers before, declines after.
    assert before["decline_rate"] <= 0.25 and after["decline_rate"] >= 0.75
    # ... while it still answers what it was told (one slip of eight allowed).
    assert after["answered_exact_match"] >= before["answered_exact_match"] - 0.125 >= 0.5
    rows = [[json.loads(line) for line in open(out / f"0{i}-generate" / "generations.jsonl")] for i in (1, 3)]
    assert [r["prompt"] for r in rows[0]] == [r["prompt"] for r in rows[1]]
    changed = [(b["completion"], a["completion"]) for b, a in zip(*rows) if b["completion"] != a["completion"]]
    assert len(changed) >= 6
    # The three lines a person reads at the end of the job log.
    summary = proc.stdout[proc.stdout.index("=== before -> after DPO, held-out prompts ==="):]
    assert re.search(r"declines about people it was never told about: [0-2]/8 -> [6-8]/8", summary), summary
    assert re.search(r"held-out pairs where the model prefers the chosen answer: \d+/\d+ -> \d+/\d+", summary)
    assert "I don't know who that is." in summary.splitlines()[3]


def test_vllm_samples_from_each_trained_model(job):
    proc, out, _, _ = job
    for index, source in ((1, "00-sft"), (3, "02-dpo")):
        record = stage(out, index, "generate")
        assert record["input_model"] == str(out / source / "model")  # vLLM loaded that stage's weights
        rows = [json.loads(line) for line in (out / f"0{index}-generate" / "generations.jsonl").open()]
        assert len(rows) == record["metrics"]["samples"] == 16
        assert all(r["num_tokens"] > 0 for r in rows)
    assert proc.stdout.count("    A: ") >= 6  # a few samples shown in the job log


def test_stage_models_load_with_transformers(job):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, out, _, _ = job
    for name in ("00-sft", "02-dpo"):
        model = AutoModelForCausalLM.from_pretrained(out / name / "model")
        tok = AutoTokenizer.from_pretrained(out / name / "model")
        ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
        assert model(input_ids=ids).logits.shape[-1] == len(tok)


def test_actors_are_named_by_stage_role_and_rank(job):
    _, _, actors, _ = job
    names = {a.get("name") for a in json.loads(actors)}
    assert {"sft/trainer/0", "generate/rollout/0", "dpo/trainer/0", "dpo/reference/0"} <= names


def test_summary_records_lineage(job):
    _, out, _, _ = job
    summary = json.loads((out / "summary.json").read_text())
    lineage = summary["lineage"]
    assert [s["stage"] for s in lineage] == ["sft", "generate", "dpo", "generate"]
    assert lineage[2]["input_model"] == str(out / "00-sft" / "model")


def test_the_demo_stops_its_own_head_and_leaves_another_ray_running(job):
    proc, _, _, (other_before, other_after, alive) = job
    assert alive.returncode == 0, alive.stdout + alive.stderr  # the other cluster still answers
    assert other_before and other_before <= other_after  # none of its processes was killed
    pid, head = re.search(r"\(pid (\d+), temp dir (\S+)/ray\)", proc.stdout).groups()
    # Nothing of the demo's own head is left running: no process of its session, none naming its
    # temp dir; and the temp dir is gone (kept only when something failed).
    assert not in_session(int(pid))
    assert not processes_under(Path(head))
    assert not Path(head).exists()
