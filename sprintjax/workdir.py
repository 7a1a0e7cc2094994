"""One writer per training workdir: a lock file taken before anything is written, and a refused run that
leaves no trace.

The lock is `WORKDIR/sprintjax.lock`: a JSON record of the holder (host, pid, start time) plus an
exclusive `flock` held by the process for as long as it lives. The kernel drops the flock when the process
dies, however it dies, so a lock left by a crashed run on this host is detected (the flock is free) and taken
over with a message; a live holder on this host keeps its flock and a second run is refused, naming it.
A record written by another host cannot be checked from here (flock is not trusted across machines): such a
lock is refused, and the message says how to clear it. In a multi-process job only process 0 takes the lock;
the job is one writer.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import socket
import time
from pathlib import Path

from sprintjax.errors import SprintjaxError

log = logging.getLogger("sprintjax")
LOCK_NAME = "sprintjax.lock"


class WorkdirBusy(SprintjaxError):
    """Another run holds the workdir."""


def _describe(holder: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    return f"pid {holder.get('pid')} on host {holder.get('host')} (since {started})"


def _read(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 1 << 16)
    try:
        return json.loads(raw) if raw.strip() else {}
    except json.JSONDecodeError:
        return {"host": "?", "pid": "?", "unreadable": raw[:200].decode(errors="replace")}


class WorkdirLock:
    """Exclusive ownership of a workdir by this process; `release()` (or process exit) gives it back."""

    def __init__(self, workdir: str | Path):
        self.path = Path(workdir) / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> WorkdirLock:
        me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read(fd)
                os.close(fd)
                raise WorkdirBusy(f"{self.path.parent} is in use by another run: {_describe(holder)}. One run "
                                  "writes a workdir at a time; wait for it, stop it, or use another --workdir") \
                    from None
            try:  # the holder may have released (unlinked) the file between our open and our flock: retry
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            holder = _read(fd)
            if holder and holder.get("host") != me["host"]:
                os.close(fd)
                raise WorkdirBusy(
                    f"{self.path.parent} is locked by {_describe(holder)}; this host cannot tell whether that "
                    f"run is still alive. If it is not, delete {self.path} and rerun")
            if holder:
                log.warning("took over the lock of %s: that process is gone (stale %s)", _describe(holder),
                            self.path)
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, json.dumps(me).encode())
            os.fsync(fd)
            self.fd = fd
            return self

    def release(self) -> None:
        """Removes the record, then drops the flock (a waiter that opened the old file sees it unlinked)."""
        if self.fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        os.close(self.fd)
        self.fd = None


@contextlib.contextmanager
def claimed(workdir: str | Path):
    """Creates (if needed) and locks `workdir` for the duration of the block: process 0 holds the lock for
    the whole job, and every process fails together when it is taken. A SprintjaxError raised inside before
    the block marks `started` removes a workdir this call created: a refused run leaves nothing behind (an
    existing workdir is never deleted, nor one whose lock another run holds)."""
    import jax

    workdir = Path(workdir).absolute()
    workdir.parent.mkdir(parents=True, exist_ok=True)
    try:
        workdir.mkdir()
        created = True
    except FileExistsError:
        created = False
    lock, refused = WorkdirLock(workdir), None
    if jax.process_index() == 0:
        try:
            lock.acquire()
        except WorkdirBusy as e:
            refused = e
    if jax.process_count() > 1:  # the other processes learn process 0's verdict (and wait for it)
        import numpy as np
        from jax.experimental import multihost_utils

        ok = multihost_utils.broadcast_one_to_all(np.int32(refused is None))
        if not ok and refused is None:
            refused = WorkdirBusy(f"process 0 could not lock {workdir} (its message says why)")
    if refused:
        raise refused
    state = {"started": False}
    try:
        yield state
    except SprintjaxError:
        if created and not state["started"] and jax.process_index() == 0:
            shutil.rmtree(workdir, ignore_errors=True)  # still holding the lock: nobody else is in it
        raise
    finally:
        lock.release()
