"""DeepSpeed's JIT-compiled CPU op, built so that a build killed halfway cannot hang later runs.

On CPU, ``deepspeed.init_distributed`` compiles ``deepspeed_shm_comm`` (shared-memory collectives)
with gcc on first use, through ``torch.utils.cpp_extension.load``. Torch guards that build with a
bare ``lock`` file in the op's build directory (``FileBaton``:
``$TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions/py311_cpu/deepspeed_shm_comm/lock``),
which records no owner, and every later build waits for that file to vanish. A process killed
mid-build (Ctrl-C, ``timeout``, a lost worker) leaves it behind, and every later run waits
forever.

``build_deepspeed_ops`` runs the same build first, holding a kernel lock (``flock``, released
when its holder dies, however it dies) beside torch's file. Whoever holds the kernel lock is the
only rayalign process building, so a torch lock found then belongs to a dead build unless some
live process on this host still has it open (another program's build): the dead one's is removed
with one log line, a live one is waited for, and said so. DeepSpeed's own load afterwards finds
the op built and loaded.

Torch runs whichever ``ninja`` is first on ``PATH``. The build runs the one installed beside the
interpreter (the ``ninja`` wheel) instead: a system ninja older than 1.12 hashes build commands
differently from the wheel's (the build log's format changed), so the two read each other's log
as a changed command line and compile the op again from scratch. ``make install`` (the user's
``PATH``) and the trainers (``PATH`` with the virtual environment first) took turns doing that.

    python -m rayalign.workers.deepspeed_ops     build it now (what ``make install`` can run)
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger("rayalign")

# Next to torch's ``lock``; holding it means no other rayalign process is inside the build.
KERNEL_LOCK = "build.flock"


def lock_holders(path: Path) -> list[int]:
    """Processes of this host (that we may inspect) with ``path`` open. Torch's lock owner keeps
    the file open for the whole build and its compiler children do not inherit it, so an empty list
    means the build that created the file is gone."""
    target = os.path.realpath(path)
    holders = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") == target for fd in fds):
                holders.append(int(pid))
        except OSError:  # gone meanwhile, or another user's process
            continue
    return holders


def shm_comm_builder():
    """The builder ``deepspeed.comm`` loads at ``init_distributed`` (None where it builds nothing:
    on GPU accelerators, off Linux, or where the op is not compatible)."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return None
    return builder


def build_directory(name: str) -> Path:
    """Where torch builds extension ``name``: the directory of its ``lock`` (created if absent)."""
    from torch.utils.cpp_extension import _get_build_directory

    return Path(_get_build_directory(name, verbose=False))


def clear_stale_lock(build_dir: Path) -> None:
    """Remove torch's lock in ``build_dir`` if no live process holds it. Call with the kernel lock held."""
    lock = build_dir / "lock"
    if not lock.exists():
        return
    holders = lock_holders(lock)
    if holders:
        log.warning("waiting for process %s, which is building this DeepSpeed op (lock %s)",
                    ", ".join(map(str, holders)), lock)
        return
    lock.unlink(missing_ok=True)
    log.warning("removed %s: a DeepSpeed op build was interrupted there and no process holds its lock", lock)


@contextlib.contextmanager
def ninja_of_this_interpreter():
    """``PATH`` with the interpreter's own directory first, if a ``ninja`` lies there (module docstring)."""
    here = os.path.dirname(sys.executable)
    if not os.access(os.path.join(here, "ninja"), os.X_OK):
        yield
        return
    before = os.environ.get("PATH")
    os.environ["PATH"] = os.pathsep.join([here, before] if before else [here])
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("PATH", None)
        else:
            os.environ["PATH"] = before


def build_deepspeed_ops() -> str | None:
    """Build (or load) the op DeepSpeed will JIT-compile at ``init_distributed``; its name, if any."""
    builder = shm_comm_builder()
    if builder is None:
        return None
    build_dir = build_directory(builder.name)
    with open(build_dir / KERNEL_LOCK, "a") as kernel_lock:
        try:
            fcntl.flock(kernel_lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning("waiting for another process building %s in %s", builder.name, build_dir)
            fcntl.flock(kernel_lock, fcntl.LOCK_EX)
        try:
            clear_stale_lock(build_dir)
            with ninja_of_this_interpreter():
                builder.load(verbose=False)  # DeepSpeed's own load then returns this module
        finally:
            fcntl.flock(kernel_lock, fcntl.LOCK_UN)
    return builder.name


if __name__ == "__main__":
    logging.basicConfig(format="%(message)s")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # the op the CPU trainers need, also on a GPU host
    name = build_deepspeed_ops()
    print(f"built {name}" if name else "no DeepSpeed op to build here")
