"""Stopping a benchmark's child process and everything it started."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess


def stop_process_group(proc: subprocess.Popen, grace_s: float = 20) -> None:
    """Stop ``proc``'s process group (start it with ``start_new_session=True``), politely first:
    SIGTERM, then SIGKILL after ``grace_s``. A local Ray or a vLLM engine core it started goes too."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, None)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue
