"""`fastvq.app.files.write_atomic`: no planted symlink or predictable temporary name redirects a
write, and every file the application writes goes through it."""

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from fastvq.app import files
from fastvq.app.files import write_atomic

APP = Path(files.__file__).parent


def write(data):
    return lambda f: f.write(data)


def test_a_symlink_planted_at_a_predictable_temporary_name_is_not_followed(tmp_path):
    """Another local user, in a shared folder, links every name a writer could guess (fastvq 0.1's
    .NAME.PID.tmp for the next few PIDs) to a file of the victim's: nothing reaches it."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    shared = tmp_path / "shared"
    shared.mkdir()
    planted = [shared / f".out.bin.{pid}.tmp" for pid in range(os.getpid() - 5, os.getpid() + 5)]
    for link in planted:
        link.symlink_to(victim)
    write_atomic(shared / "out.bin", write(b"new"))
    assert victim.read_bytes() == b"precious"
    target = shared / "out.bin"
    assert not target.is_symlink() and target.read_bytes() == b"new"
    assert (shared / f".out.bin.{os.getpid()}.tmp").is_symlink()  # this process's old name: left alone


def test_a_symlink_at_the_final_name_is_replaced_not_followed(tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    target = tmp_path / "out.json"
    target.symlink_to(victim)
    write_atomic(target, write(b"{}"))
    assert victim.read_bytes() == b"precious"
    assert not target.is_symlink() and target.read_bytes() == b"{}"


def test_the_temporary_is_created_exclusively_and_a_taken_name_is_skipped(tmp_path, monkeypatch):
    """Even a name guessed right (the random part forced here) is never opened: creation is
    O_EXCL | O_NOFOLLOW, and the writer draws another name."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    drawn = iter(["guessed", "fresh"])
    monkeypatch.setattr(files.secrets, "token_hex", lambda n: next(drawn))
    guessed = tmp_path / f".out.npy.{os.getpid()}.guessed.tmp"
    guessed.symlink_to(victim)
    write_atomic(tmp_path / "out.npy", write(b"data"))
    assert victim.read_bytes() == b"precious" and guessed.is_symlink()
    assert (tmp_path / "out.npy").read_bytes() == b"data"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([guessed.name, "out.npy", "victim"])


def test_temporary_names_are_unpredictable_and_files_get_the_usual_permissions(tmp_path, monkeypatch):
    names = []
    real_replace = os.replace

    def spy(src, dst):
        names.append(Path(src).name)
        real_replace(src, dst)

    monkeypatch.setattr(files.os, "replace", spy)
    for _ in range(3):
        write_atomic(tmp_path / "out.png", write(b"png"))
    assert len(set(names)) == 3 and all(
        re.fullmatch(rf"\.out\.png\.{os.getpid()}\.[0-9a-f]{{16}}\.tmp", n) for n in names
    ), names
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "out.png").stat().st_mode) == 0o666 & ~umask  # not mkstemp's 0600


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "metrics.json"
    target.write_bytes(b"old")

    def failing(f):
        f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(target, failing)
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_stale_temporaries_of_dead_writers_are_removed_in_both_name_forms(tmp_path):
    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead_old, dead_new = tmp_path / ".out.bin.999999999.tmp", tmp_path / ".out.bin.999999999.0a1b.tmp"
        alive = tmp_path / f".out.bin.{writer.pid}.0a1b.tmp"
        other = tmp_path / ".other.bin.999999999.tmp"  # another target's: not ours to remove
        for path in (dead_old, dead_new, alive, other):
            path.write_bytes(b"x")
        blocked = tmp_path / ".out.bin.999999998.tmp"
        blocked.mkdir()  # a folder planted under a temporary's name must not stop the write
        write_atomic(tmp_path / "out.bin", write(b"new"))
    finally:
        writer.kill()
        writer.wait()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([alive.name, other.name, blocked.name, "out.bin"])


def test_names_up_to_the_file_system_limit_are_written(tmp_path):
    """A temporary's name keeps at most 200 characters of the target's, so a 250-character name
    (a 255-byte limit) still gets one."""
    target = tmp_path / ("n" * 246 + ".png")
    write_atomic(target, write(b"png"))
    assert target.read_bytes() == b"png" and len(list(tmp_path.iterdir())) == 1


WRITES_A_FILE = re.compile(
    r"\.write_(text|bytes)\(|\bopen\([^)]*[\"'][wax]b?\+?[\"']|torch\.save\(|save_file\(|os\.open\((?![^)]*(O_NOFOLLOW|_OPEN_FLAGS))"
    r"|\b(np\.save|np\.savez\w*|savefig|\.save)\((?!f[,)])"
)


def test_every_file_the_application_writes_goes_through_write_atomic():
    """A write that bypasses `write_atomic` (a path given to open/np.save/savefig/PIL's save) would
    bring the symlink hole back; `checkpoint.save` is itself a `write_atomic` caller. The run-folder
    lock (runlock.py) opens its lock file itself, never through a symlink (O_NOFOLLOW, which its
    _OPEN_FLAGS carry)."""
    offenders = []
    for source in sorted(APP.glob("*.py")):
        if source.name == "files.py":
            continue
        for number, line in enumerate(source.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if WRITES_A_FILE.search(code) and "checkpoint.save(" not in code:
                offenders.append(f"{source.name}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
    assert "write_atomic" in (APP / "checkpoint.py").read_text() and "write_atomic" in (APP / "report.py").read_text()
