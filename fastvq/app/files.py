"""Atomic writes: every file the application writes holds either its old content or its complete
new content, whatever interrupts the write (kill -9, a full disk), and no other local user can
redirect a write by planting a symlink in a shared folder.

`write_atomic` is the one function through which the application writes a file (checkpoints, PNG,
npy, JSON). It never opens a name that could exist already: the temporary file is created
exclusively (``O_CREAT | O_EXCL | O_NOFOLLOW``) under an unpredictable name in the target's
folder, and the finished file is renamed over the target, which replaces a symlink there instead of
following it. `tempfile.mkstemp` does the same creation but with mode 0600 whatever the umask;
outputs here keep the permissions an ordinary `open` gives (0666 less the umask).
"""

from __future__ import annotations

import glob
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_NAME_KEPT = 200
"""Characters of the target's name kept in a temporary's (names are at most 255 bytes)."""


def write_atomic(path: str | Path, write: Callable[[BinaryIO], object]) -> None:
    """Call ``write(f)`` on a new temporary file in ``path``'s folder, fsync it, rename it over
    ``path`` (a symlink at ``path`` is replaced, never followed) and fsync the folder. A failed
    write leaves ``path`` as it was and removes the temporary. Temporaries left by killed
    processes for the same ``path`` are removed first."""
    path = Path(path)
    remove_stale_temporaries(path)
    fd, tmp = _create_temporary(path)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


def _prefix(path: Path) -> str:
    """Every temporary of ``path`` is named PREFIX + PID + '.' + random + '.tmp'."""
    return f".{path.name[:_NAME_KEPT]}."


def _create_temporary(path: Path) -> tuple[int, Path]:
    """(descriptor, path) of a new empty file beside ``path``, created by this call alone."""
    for _ in range(100):
        tmp = path.with_name(f"{_prefix(path)}{os.getpid()}.{secrets.token_hex(8)}.tmp")
        try:
            return os.open(tmp, _CREATE, 0o666), tmp
        except FileExistsError:  # planted, or (2^-64) drawn twice: another name
            continue
    raise FileExistsError(f"{path.parent}: no free temporary name for {path.name} in 100 tries")


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_stale_temporaries(path: Path) -> None:
    """Delete the temporaries beside ``path`` (``.NAME.PID.*.tmp``, and ``.NAME.PID.tmp`` of fastvq
    0.1) whose process no longer runs. Unlinking never follows a link; one that cannot be removed
    (a folder planted under such a name) is left alone."""
    prefix = _prefix(path)
    for tmp in path.parent.glob(glob.escape(prefix) + "*.tmp"):
        pid = tmp.name[len(prefix) : -len(".tmp")].split(".", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _running(int(pid)):
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
