"""One writer per folder: ``edgetune train --out RUN`` and ``edgetune pack --out APP`` hold a lock
on ``.NAME.lock`` beside the folder while they write it, so that a second process stops with a
message instead of interleaving its files. The lock is the operating system's (``flock``), which
a crashed or killed process releases with its last file descriptor: nothing is ever left stuck.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

from edgetune.formats.errors import ConfigError


def lock_path(folder: Path) -> Path:
    folder = Path(folder).absolute()
    return folder.parent / f".{folder.name}.lock"


@contextlib.contextmanager
def hold(folder: str | os.PathLike, what: str = "written") -> Iterator[None]:
    """Hold ``folder``'s lock for the block; if another process holds it, raise ConfigError naming it."""
    path = lock_path(Path(folder))
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            _lock(fd)
        except OSError:
            holder = ""
            with contextlib.suppress(OSError, ValueError):
                os.lseek(fd, 0, os.SEEK_SET)
                holder = os.read(fd, 64).decode().strip()
            os.close(fd)
            raise ConfigError(f"{folder} is being {what} by another edgetune process"
                              f"{f' (pid {holder})' if holder else ''}; wait for it to finish, or use another "
                              f"folder (the lock is {path}, released when that process ends)") from None
        # The holder before us may have removed the file after we opened it: lock the file that is there.
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, str(os.getpid()).encode())
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)


def _lock(fd: int) -> None:
    """An exclusive, non-blocking lock the system drops with the process: flock, or on Windows
    msvcrt's byte-range lock."""
    try:
        import fcntl
    except ImportError:
        import msvcrt

        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        return
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def check_free(folder: str | os.PathLike, what: str = "written") -> None:
    """Refuse now, before ``folder`` is read, if another process holds its lock."""
    if lock_path(Path(folder)).exists():
        with hold(folder, what):
            pass
