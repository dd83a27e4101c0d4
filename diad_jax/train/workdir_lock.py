"""One run per workdir: an advisory lock held for the life of a `Trainer`.

Two trainings started into the same --workdir would both write checkpoints/ and collide inside
orbax. Each process of a run takes `<workdir>/.lock/process-<i>` with `fcntl.flock` (released by
the kernel when the process dies, even by kill -9, so a lock is never stale while the file says
who held it last): a second run's process i finds it taken and stops with a `WorkdirLockedError`
naming the holder (host, pid, start time). A lock file left by a dead holder is taken over with a
note. On several hosts sharing the workdir, every process of the second run collides with its
counterpart, so each of them stops on its own, with no collective needed.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path

from diad_jax.errors import UserError

log = logging.getLogger(__name__)


class WorkdirLockedError(UserError):
    """Another run holds the workdir."""


class WorkdirLock:
    def __init__(self, workdir: str | os.PathLike, process_index: int):
        self.path = Path(workdir) / ".lock" / f"process-{process_index}"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(os.pread(self._fd, 4096, 0))
            os.close(self._fd)
            raise WorkdirLockedError(f"{Path(workdir)} is in use by another training run ({holder}; lock "
                                     f"{self.path}); wait for it to end, stop it, or use another {{0}}",
                                     fields=["workdir"]) from None
        previous = os.pread(self._fd, 4096, 0)
        if previous:
            log.info("%s: taking over the lock of a run that is no longer running (%s)", workdir, _describe(previous))
        me = json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                         "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}).encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, me, 0)

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)  # an empty file: released cleanly, nothing to take over
            os.close(self._fd)  # closing releases the flock
            self._fd = None


def _describe(raw: bytes) -> str:
    try:
        d = json.loads(raw)
        return f"pid {d['pid']} on {d['host']}, since {d['since']}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown"
