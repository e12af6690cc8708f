"""An exclusive lock on a data directory, so two processes never open the same LMDB environment for writing.

LMDB itself allows several processes on one environment; for the bus that would be two nodes appending to
the same partitions, so the second one is refused with a message that says what to do.
"""

from __future__ import annotations

import fcntl
import os

from bus.errors import NodeIdentityMismatch


def lock_data_dir(path: str) -> int:
    """Take the directory's LOCK file (held until the process exits or ``unlock_data_dir``). Returns the fd."""
    os.makedirs(path, exist_ok=True)
    lock_path = os.path.join(path, "LOCK")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise NodeIdentityMismatch(
            f"data directory {path} is in use by another process (pid {holder}); "
            "give each node and coordinator its own --data-dir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd


def unlock_data_dir(fd: int) -> None:
    os.close(fd)  # closing the descriptor releases the flock
