"""One writer per teacher or cache path.

Two ``e2kd teacher``/``cache``/``sweep`` processes that would write the same teacher directory or
cache folder could each leave half of a card or manifest behind the other's weights or shards. A
local path gets an exclusive, non-blocking ``flock`` on a sibling file (``.<name>.e2kd-lock``):
the second writer is refused at once with one line naming the path and the holder's pid, and the
lock goes away with the process that held it (even when it is killed). A store URI (``s3://…``)
cannot be locked this way; there every object is written whole and the card / manifest last, so
a reader sees one writer's result or none, and the last writer wins.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Iterator


class BusyError(RuntimeError):
    """Another process is writing the same path."""


def lock_path(path: str) -> str:
    p = os.path.abspath(path.rstrip("/"))
    return os.path.join(os.path.dirname(p), f".{os.path.basename(p)}.e2kd-lock")


@contextlib.contextmanager
def writer_lock(field: str, path: str) -> Iterator[None]:
    """Hold the write lock of ``path`` (a teacher directory or a cache folder) while the body runs;
    store URIs are not locked (see the module docstring)."""
    if "://" in path and not path.startswith("file://"):
        yield
        return
    if path.startswith("file://"):
        path = path[len("file://"):]
    lp = lock_path(path)
    os.makedirs(os.path.dirname(lp), exist_ok=True)
    fd = os.open(lp, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise BusyError(f"{field}: {path} is being written by another e2kd process (pid {holder}); "
                            "wait for it to finish, or use another path") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                os.unlink(lp)  # still holding it: a waiter that opened it gets the lock of a gone file
    finally:
        os.close(fd)
