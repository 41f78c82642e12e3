"""A lock on a run folder while a run writes to it, so that a second run into the same folder fails
at once instead of mixing its checkpoints and metrics with the first one's.

The lock is ``fcntl.flock`` on ``OUT/.fastvq-run.lock``: the operating system releases it when
the process that holds it ends, however it ends (kill -9 included), so a crashed run never blocks
the next one. The file also records the holder's process id and host, only to name them in the
error. Written by hand rather than with the ``filelock`` package because that one truncates the
lock file on every attempt (erasing the holder's pid) and follows a symlink planted in its place.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
from pathlib import Path

from .errors import SettingError

LOCK_FILE = ".fastvq-run.lock"
"""The lock's file name inside a run folder; removed when the run ends."""

_OPEN_FLAGS = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC


class RunFolderLock:
    """Hold the lock of run folder ``folder`` (created if missing) while entered; a folder locked
    by another process raises SettingError naming ``setting`` (the folder's argument, ``out_dir``:
    ``--out`` on the command line) and that process. On exit the lock file is removed, and so is
    the folder when this lock created it and nothing else was written there."""

    def __init__(self, folder: str | Path, setting: str = "out_dir"):
        self.folder, self.setting = Path(folder), setting
        self._fd: int | None = None
        self._created = False

    def __enter__(self) -> RunFolderLock:
        self._created = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        try:
            self._fd = _acquire(self.folder / LOCK_FILE, self.setting)
        except BaseException:
            self._remove_folder_if_unused()
            raise
        os.ftruncate(self._fd, 0)
        os.write(self._fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is None:
            return
        if _is_file_of(self.folder / LOCK_FILE, self._fd):  # not one made after someone deleted ours
            (self.folder / LOCK_FILE).unlink()  # while held: see _acquire
        os.close(self._fd)
        self._fd = None
        self._remove_folder_if_unused()

    def _remove_folder_if_unused(self) -> None:
        if self._created:
            try:
                self.folder.rmdir()  # only if empty: a run that failed before writing anything
            except OSError:
                pass


def _acquire(path: Path, setting: str) -> int:
    """An open descriptor of ``path`` holding its exclusive lock. The holder removes the file before
    it releases the lock, so a descriptor opened before that removal may win a lock on a file that
    is gone: the lock counts only if ``path`` is still the file locked, else it is taken again."""
    while True:
        fd = _open(path, setting)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise _busy(path, setting, holder) from None
        except BaseException:
            os.close(fd)
            raise
        if _is_file_of(path, fd):
            return fd
        os.close(fd)


def _is_file_of(path: Path, fd: int) -> bool:
    """Whether ``path`` names the file open as ``fd``."""
    try:
        here, there = os.stat(path, follow_symlinks=False), os.fstat(fd)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def check_unlocked(folder: str | Path, setting: str = "out_dir") -> None:
    """Raise the error of `RunFolderLock` if a run holds ``folder``'s lock now; creates nothing."""
    path = Path(folder) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    except OSError as err:
        raise _unusable(path, setting, err) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # conflicts with a holder's exclusive lock only
    except BlockingIOError:
        raise _busy(path, setting, _holder(fd)) from None
    finally:
        os.close(fd)


def _open(path: Path, setting: str) -> int:
    try:
        return os.open(path, _OPEN_FLAGS, 0o644)
    except OSError as err:
        raise _unusable(path, setting, err) from None


def _unusable(path: Path, setting: str, err: OSError) -> OSError | SettingError:
    if err.errno == errno.ELOOP:  # O_NOFOLLOW met a symlink
        return SettingError(
            "{%s} {folder}: its lock file {lock} is a symbolic link; remove it (fastvq never makes one)" % setting,
            folder=path.parent,
            lock=path.name,
        )
    return err


def _holder(fd: int) -> str:
    """'process PID on HOST' as the lock file records it, or 'another process' before it is written."""
    try:
        pid, _, host = os.pread(fd, 256, 0).decode(errors="replace").strip().partition(" ")
    except OSError:
        pid, host = "", ""
    if not pid.isdigit():
        return "another process"
    return f"process {pid}" + (f" on {host}" if host and host != socket.gethostname() else "")


def _busy(path: Path, setting: str, holder: str) -> SettingError:
    return SettingError(
        "{%s} {folder}: another run ({holder}) is writing there (it holds the lock {lock}, which "
        "ends with that process); wait for it to end or choose another {%s}" % (setting, setting),
        folder=path.parent,
        holder=holder,
        lock=path,
    )
