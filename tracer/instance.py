"""The state directory and the single-instance lock (``<state_dir>/kvm-completion-tracer.lock``).

The lock is an exclusive ``flock`` taken before the probes load and held for the life of the
process (the kernel drops it when the process dies, however it dies). The holder writes its pid
into the file so a second instance can name it. A killed instance keeps the lock until its BPF
programs are torn down (1.5 s measured after a SIGKILL), so a start waits a bounded time
(``lock_wait_seconds``, ``--lock-wait``) for the holder to go before refusing.
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

LOCK_NAME: Final = "kvm-completion-tracer.lock"
DEFAULT_LOCK_WAIT_S: Final = 5.0
LOCK_POLL_S: Final = 0.05


class InstanceError(RuntimeError):
    """The state directory is unusable, or another instance runs; one line for the operator."""


class InstanceLock:
    def __init__(self, fd: int, path: Path) -> None:
        self.fd = fd
        self.path = path

    @classmethod
    def acquire(cls, state_dir: Path, wait_s: float = 0.0,
                on_wait: Callable[[str, Path, float], None] | None = None) -> InstanceLock:
        """Take the lock, waiting up to ``wait_s`` for another holder to release it (a dying
        previous instance); ``on_wait(holder_pid, path, wait_s)`` is called once when the
        wait starts. Raises InstanceError naming the holder if it still holds the lock."""
        prepare_state_dir(state_dir)
        path = state_dir / LOCK_NAME
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as err:
            raise InstanceError(f"state directory {state_dir} is not writable: cannot create "
                                f"{path}: {err.strerror} (set state_dir or --state-dir)") from None
        deadline = time.monotonic() + wait_s
        waited = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as err:
                if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    os.close(fd)
                    raise InstanceError(f"cannot lock {path}: {err.strerror}") from None
                if time.monotonic() >= deadline:
                    holder = _holder(fd)
                    os.close(fd)
                    after = f"; waited {wait_s:g} s for it to exit" if waited else ""
                    raise InstanceError(f"another kvm-completion-tracer is already running "
                                        f"(pid {holder}, holding {path}{after})") from None
                if not waited and on_wait is not None:
                    on_wait(_holder(fd), path, wait_s)
                waited = True
                time.sleep(LOCK_POLL_S)
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as err:
            os.close(fd)
            raise InstanceError(f"state directory {state_dir} is not writable: cannot write "
                                f"{path}: {err.strerror}") from None
        return cls(fd, path)

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # the file stays: unlinking it would race a starting instance
            self.fd = -1


def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    return text if text.isdigit() else "unknown"


def prepare_state_dir(state_dir: Path) -> None:
    """Create the directory (0700) if missing; refuse a path that is not a directory."""
    try:
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except FileExistsError:
        raise InstanceError(f"state directory {state_dir} is not a directory") from None
    except OSError as err:
        raise InstanceError(f"state directory {state_dir} cannot be created: "
                            f"{err.strerror}") from None
    if not state_dir.is_dir():
        raise InstanceError(f"state directory {state_dir} is not a directory")
