"""Atomic directory writes: build the output in a hidden sibling folder, then rename it into place.

A crash or an error midway leaves the destination untouched (or absent); readers never see half an output.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from sprintjax.errors import SprintjaxError


@contextlib.contextmanager
def atomic_dir(dst: str | os.PathLike, force: bool = False):
    """Yields a temporary folder next to `dst`; on success it replaces `dst` in one rename."""
    dst = Path(dst).absolute()
    if dst.exists() and not force:
        raise SprintjaxError(f"{dst} already exists; pass --force to overwrite it")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        yield tmp
        if dst.exists():  # force: move the old one aside first, so a failure still leaves one complete copy
            old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
            os.rename(dst, old / "x")
            os.rename(tmp, dst)
            shutil.rmtree(old)
        else:
            os.rename(tmp, dst)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Writes a file through a temporary sibling and os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
