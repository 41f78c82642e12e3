"""Progress output that suits where it goes: a live bar on a terminal, and in a log file (stderr not
a terminal) one plain line at the start, at most one every ``interval`` seconds, and one at the end."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO


class Progress:
    """Iterate over ``iterable`` (``total`` items, counted from ``initial``) while reporting to
    ``stream`` (default stderr). ``set_postfix(**values)`` adds values to the report; ``close()``
    (or leaving a ``with`` block) ends it."""

    def __init__(
        self,
        iterable: Iterable,
        total: int,
        desc: str,
        unit: str = "it",
        initial: int = 0,
        enabled: bool = True,
        stream: TextIO | None = None,
        interval: float = 30.0,
    ):
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.count, self.stream, self.interval, self.enabled = initial, stream or sys.stderr, interval, enabled
        self.postfix: dict[str, Any] = {}
        self._bar = None
        if enabled and self.stream.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=self.stream, dynamic_ncols=True)
        self._start = self._last = time.monotonic()
        self._first, self._reported = initial, None
        if enabled and self._bar is None:
            self._line()

    def __iter__(self) -> Iterator:
        for item in self.iterable:
            yield item
            self.count += 1
            if self._bar is not None:
                self._bar.update(1)
            elif self.enabled and time.monotonic() - self._last >= self.interval:
                self._line()

    def set_postfix(self, **values: Any) -> None:
        self.postfix = values
        if self._bar is not None:
            self._bar.set_postfix(values, refresh=False)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """End the bar; in a log, write the final line (unless nothing happened since the last)."""
        if self._bar is not None:
            self._bar.close()
        elif self.enabled and self.count != self._reported:
            self._line()

    def _line(self) -> None:
        now = time.monotonic()
        rate = (self.count - self._first) / (now - self._start) if now > self._start else 0.0
        extra = "".join(f", {k} {v}" for k, v in self.postfix.items())
        print(f"{self.desc}: {self.count}/{self.total} ({rate:.3g} {self.unit}/s){extra}", file=self.stream, flush=True)
        self._last, self._reported = now, self.count
