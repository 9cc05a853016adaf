"""One ``walled-garden run`` per state directory: an exclusive ``flock`` on ``<state_dir>/lock``.

Two daemons on one state directory would sync the same table, write the same SQLite, fight
over the webhook port and the control socket, and leave the first one unreachable when the
second stops. So ``run`` takes this lock before it touches the kernel, the state or any socket,
and holds it for the life of the process; a second ``run`` finds it taken and exits 1 naming
the holder's pid (written into the file for that message).

``flock`` rather than a pid file checked for liveness: the kernel drops the lock when the
holder dies, however it dies (SIGKILL, a watchdog abort), so a stale file never keeps a
restarted daemon out and no pid can be mistaken for a reused one. The descriptor is
non-inheritable (PEP 446): the webhook worker and the DNS forwarder do not hold it, so a
child left behind by a killed daemon does not lock the next one out.
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

#: The lock file's name in ``state_dir``.
LOCK_NAME = "lock"


class StateLocked(Exception):
    """Another process holds the state directory; ``str()`` is the one line ``run`` prints."""

    def __init__(self, state_dir: str, pid: int | None) -> None:
        self.state_dir, self.pid = state_dir, pid
        holder = f"pid {pid}" if pid is not None else "pid unknown"
        super().__init__(f"another walled-garden run ({holder}) holds {state_dir}; stop it first")


class StateLock:
    """The held lock; ``release()`` (or the end of the process) gives it up."""

    def __init__(self, path: str, fd: int) -> None:
        self.path, self._fd = path, fd

    @property
    def held(self) -> bool:
        return self._fd >= 0

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)   # closing the only descriptor drops the flock
            self._fd = -1

    def __enter__(self) -> StateLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def acquire(state_dir: str) -> StateLock:
    """Take ``<state_dir>/lock`` (creating the directory as the store would) without waiting.

    Raises ``StateLocked`` when another process holds it, ``OSError`` when the file cannot be
    opened or locked for another reason (a read-only or missing file system)."""
    Path(state_dir).mkdir(parents=True, exist_ok=True, mode=0o750)
    path = os.path.join(state_dir, LOCK_NAME)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = _read_pid(fd)
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise StateLocked(state_dir, holder) from None
        raise
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError:
        os.close(fd)
        raise
    return StateLock(path, fd)


def _read_pid(fd: int) -> int | None:
    """The pid the holder wrote; None while it has not written it yet, or for anything else."""
    try:
        text = os.pread(fd, 32, 0).decode("ascii", errors="replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
