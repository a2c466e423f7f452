"""A run killed while DeepSpeed compiles its CPU op must not hang the runs after it.

Torch leaves its build ``lock`` behind when the building process dies, and DeepSpeed's next
``init_distributed`` would wait on it forever. These tests use a scratch ``TORCH_EXTENSIONS_DIR``
so the op really compiles (gcc), and kill the real trainer set-up in the middle of it.
"""

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from rayalign.workers import deepspeed_ops
from rayalign.workers.deepspeed_ops import clear_stale_lock, lock_holders

# The trainer's own set-up, as a Ray actor runs it, in a process of its own (world size 1, gloo).
TRAINER_SETUP = """
import socket, sys
from rayalign.workers.trainer import TrainerWorker, TrainSpec
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
params = TrainerWorker(0, 1).setup(("127.0.0.1", port), TrainSpec(model_path=sys.argv[1], total_steps=1), None)
print(f"trainer ready: {params} parameters", flush=True)
"""


def kill_session(sid):
    """SIGKILL every process of session ``sid``, until none is left: the set-up, ninja, and the
    compilers ninja starts in process groups of their own."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        left = []
        for pid in map(int, filter(str.isdigit, os.listdir("/proc"))):
            try:
                dead = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z"
                if os.getsid(pid) == sid and not dead:  # a zombie has nothing left to write
                    os.kill(pid, signal.SIGKILL)
                    left.append(pid)
            except (OSError, IndexError):  # gone meanwhile
                continue
        if not left:
            return
        time.sleep(0.1)
    raise AssertionError(f"processes of session {sid} survived SIGKILL")


def hold_open(path):
    """A live process that holds ``path`` open the way torch's lock owner does while it builds."""
    code = (f"import os, time; fd = os.open({str(path)!r}, os.O_CREAT | os.O_EXCL); print('held', flush=True); "
            "time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_lock_is_removed_only_once_no_process_holds_it(tmp_path, caplog):
    lock = tmp_path / "lock"
    owner = hold_open(lock)
    try:
        assert lock_holders(lock) == [owner.pid]
        clear_stale_lock(tmp_path)
        assert lock.exists()  # a live build is waited for, never broken into
        assert f"waiting for process {owner.pid}, which is building this DeepSpeed op (lock {lock})" in caplog.text
    finally:
        owner.kill()
        owner.wait()
    assert lock.exists() and lock_holders(lock) == []
    clear_stale_lock(tmp_path)
    assert not lock.exists()
    assert f"removed {lock}: a DeepSpeed op build was interrupted there and no process holds its lock" in caplog.text


def test_the_op_is_built_by_the_ninja_installed_beside_the_interpreter(tmp_path, monkeypatch):
    # Whatever PATH the caller has (make install: the user's; the trainers: the venv's first), the
    # same ninja builds, so no caller reads the other's build log as a changed command and recompiles.
    ours = os.path.join(os.path.dirname(sys.executable), "ninja")
    assert os.access(ours, os.X_OK), "the ninja wheel torch builds with is installed beside the interpreter"
    seen = []

    class Builder:
        name = "deepspeed_shm_comm"

        def load(self, verbose):
            seen.append(shutil.which("ninja"))

    monkeypatch.setattr(deepspeed_ops, "shm_comm_builder", Builder)
    monkeypatch.setattr(deepspeed_ops, "build_directory", lambda name: tmp_path)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    assert deepspeed_ops.build_deepspeed_ops() == "deepspeed_shm_comm"
    assert seen == [ours]
    assert os.environ["PATH"] == "/usr/bin:/bin"  # the process's own PATH is left as it was


@pytest.mark.slow
def test_a_run_killed_mid_compile_does_not_hang_the_next(tmp_path, tiny_model_path):
    extensions = tmp_path / "torch_extensions"
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(extensions), "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}
    build_dir = extensions / "deepspeed_shm_comm"
    lock, ninja_file, op = build_dir / "lock", build_dir / "build.ninja", build_dir / "deepspeed_shm_comm.so"
    cmd = [sys.executable, "-c", TRAINER_SETUP, tiny_model_path]

    # Its own session, so that the kill can take every process of the build with it.
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
    deadline = time.monotonic() + 300
    while not (lock.exists() and ninja_file.exists()):  # torch writes build.ninja, then runs ninja
        assert first.poll() is None, f"the set-up ended before compiling:\n{first.stdout.read()[-3000:]}"
        assert time.monotonic() < deadline, "the set-up never started compiling the op"
        time.sleep(0.05)
    kill_session(first.pid)
    first.wait()
    assert lock.exists() and not op.exists()  # what hung every later run: DeepSpeed waits for this file

    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "trainer ready: " in second.stdout
    assert f"removed {lock}: a DeepSpeed op build was interrupted there and no process holds its lock" in second.stderr
    assert op.exists() and not lock.exists()
