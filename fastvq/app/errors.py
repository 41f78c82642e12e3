"""Errors that name a setting of a run, so that each front end can spell it its own way.

Below the command line, messages speak of arguments (`image_size`); `fastvq.app.cli` re-spells
the same message with its flags (`--image-size`).
"""

from __future__ import annotations

import string
from collections.abc import Callable
from typing import Any


class SettingError(ValueError):
    """A setting with an unusable value. The message is a `str.format` template whose fields that
    are not in `values` are setting names: `str()` spells them as argument names, `spelled(spell)`
    as a front end chooses."""

    def __init__(self, template: str, **values: Any):
        self.template, self.values = template, values
        super().__init__(self.spelled(str))

    def __reduce__(self):  # pickled (from a data-loading process) with its template and values
        return _rebuild, (type(self), self.template, self.values)

    def spelled(self, spell: Callable[[str], str]) -> str:
        """The message with each setting name replaced by `spell(name)`."""
        fields = {field for _, field, _, _ in string.Formatter().parse(self.template) if field}
        return self.template.format(**{name: spell(name) for name in fields - self.values.keys()}, **self.values)


def _rebuild(cls: type[SettingError], template: str, values: dict[str, Any]) -> SettingError:
    return cls(template, **values)


class SettingFileNotFoundError(SettingError, FileNotFoundError):
    """A setting names a file or folder that does not exist."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, corrupt, not a fastvq checkpoint, or whose
    metadata does not describe a valid model that fits its tensors. The message names the file
    (``path``) and what is wrong."""

    def __init__(self, path: Any, problem: str):
        self.path, self.problem = path, problem
        super().__init__(f"checkpoint {path} {problem}")

    def __reduce__(self):
        return type(self), (self.path, self.problem)
