"""TensorBoard event files of a training run (``OUT/tensorboard/``), an optional dependency.

Generic on purpose: any training loop logs any dict of scalars per step, and images at evaluation
time. Event files are append-only; a resumed run opens a new one with ``purge_step`` at the first
step it logs, so TensorBoard drops what the old file logged after the checkpoint and shows one
curve. Nothing here touches torch's RNG, so exact resume is unaffected.
"""

from __future__ import annotations

import importlib
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from .errors import SettingError

INSTALL_HINT = "pip install tensorboard (or fastvq[tensorboard])"
_told = False  # whether the note that TensorBoard is off was printed in this process


def tensorboard_enabled(requested: bool | None, announce: bool = True) -> bool:
    """Whether to write event files: ``requested`` False: no; True: yes, and SettingError when the
    tensorboard package is missing; None: when it is installed, else (once per process, and only
    with ``announce``) a one-line note on stderr that says how to enable it."""
    if requested is False:
        return False
    try:
        importlib.import_module("torch.utils.tensorboard")  # raises ImportError without the tensorboard package
    except ImportError:
        if requested:
            raise SettingError(
                "{tensorboard} needs the tensorboard package, which is not installed: %s" % INSTALL_HINT
            ) from None
        global _told
        if announce and not _told:
            print(f"note: no TensorBoard event files ({INSTALL_HINT} to get them)", file=sys.stderr, flush=True)
            _told = True
        return False
    return True


class RunLog:
    """Writes ``scalars`` and ``images`` to TensorBoard event files in ``folder``; does nothing when
    ``folder`` is None (logging off, or a process other than rank 0). ``continues_at``: for a run
    resumed from a checkpoint, the first step it logs; TensorBoard then discards what earlier event
    files logged at that step or later (steps trained after the checkpoint, before a crash). Use as
    a context manager, or call ``close``."""

    def __init__(self, folder: Path | None, continues_at: int | None = None, flush_secs: int = 30):
        self._writer = None
        if folder is not None:
            from torch.utils.tensorboard import SummaryWriter

            if continues_at is not None:
                _after_earlier_files(Path(folder))
            self._writer = SummaryWriter(str(folder), purge_step=continues_at, flush_secs=flush_secs)

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        """Log each of ``values`` (tag -> number) at ``step``."""
        if self._writer is not None:
            for tag, value in values.items():
                self._writer.add_scalar(tag, float(value), step)

    def images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        """Log each of ``images`` (tag -> (H, W, 3) uint8) at ``step``."""
        if self._writer is not None:
            for tag, image in images.items():
                self._writer.add_image(tag, image, step, dataformats="HWC")

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _after_earlier_files(folder: Path) -> None:
    """Wait, if need be, until the clock is past the second in which the newest event file in
    ``folder`` was created. TensorBoard reads a folder's event files in name order, and a name starts
    with its creation second (then host, process id and a counter, which do not order runs), so a
    resumed run's file must start in a later second to be read after the files it continues."""
    seconds = [
        int(f.name.split(".")[3]) for f in folder.glob("events.out.tfevents.*") if f.name.split(".")[3].isdigit()
    ]
    if seconds:
        time.sleep(max(0.0, max(seconds) + 1 - time.time()))
