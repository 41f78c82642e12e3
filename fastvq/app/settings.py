"""Typed settings: command-line text parsed by the type its definition declares (a `RunConfig`
field, a model constructor's argument), JSON values from a checkpoint checked against the same
declarations, and the range of every number a run or a command takes.

Each rule raises `SettingError` naming the setting, so the command line names the flag.
"""

from __future__ import annotations

import contextlib
import json
import math
import numbers
import re
import types
import typing
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from fastvq.models.checks import check_choice, check_int, check_number
from fastvq.models.diffusion import MAX_GUIDANCE
from fastvq.models.prior import check_sampling

from . import device
from .errors import SettingError

BOOLEANS = {"true": True, "false": False, "yes": True, "no": False, "1": True, "0": False}
"""Words a boolean setting accepts, in any case."""
NONE_WORDS = ("none", "null")
MAX_SEED = 2**32 - 1
"""Seeds of `fastvq train` and `fastvq sample` are ints in [0, MAX_SEED]: batches, draws and steps
derive 63-bit seeds from them (seed * 1000003 + step)."""
MAX_DEPTH = 32
"""The deepest nesting a JSON value from a file may have."""


def _options(annotation: Any) -> tuple[list[Any], bool]:
    """The non-None alternatives of an annotation, and whether None is allowed."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        return [a for a in args if a is not type(None)], type(None) in args
    return [annotation], annotation is type(None) or annotation is Any


PLURALS = {bool: "booleans", int: "ints", float: "finite numbers", str: "strings"}


def describe(annotation: Any) -> str:
    """'an int', 'true or false (yes/no, 1/0)', 'a list of ints', 'none or an int', ... for an
    annotation."""
    options, nullable = _options(annotation)
    words = ["none"] if nullable and annotation is not Any else []
    for option in options:
        if option is bool:
            words.append("true or false (yes/no, 1/0)")
        elif option in (int, float, str):
            words.append({int: "an int", float: "a finite number", str: "a string"}[option])
        elif typing.get_origin(option) in (list, tuple, Sequence) or option in (list, tuple):
            item = (typing.get_args(option) or (Any,))[0]
            words.append(f"a list of {PLURALS[item]}" if item in PLURALS else "a list")
        elif typing.get_origin(option) is dict or option is dict:
            words.append("a mapping")
        else:
            words.append(getattr(option, "__name__", str(option)))
    return " or ".join(words)


def conforms(value: Any, annotation: Any, depth: int = 0) -> bool:
    """Whether a JSON value fits an annotation of a setting (int, float, bool, str, unions with
    None, lists/tuples/Sequences of those, dict[str, ...], Any; numbers finite, nesting bounded)."""
    if depth > MAX_DEPTH:
        return False
    options, nullable = _options(annotation)
    if value is None:
        return nullable
    for option in options:
        origin = typing.get_origin(option)
        if option is Any:
            return _bounded(value, depth)
        if option is bool:
            ok = isinstance(value, bool)
        elif option is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif option is float:
            ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
        elif option is str:
            ok = isinstance(value, str)
        elif origin in (list, tuple, Sequence) or option in (list, tuple):
            item = (typing.get_args(option) or (Any,))[0]
            ok = isinstance(value, list) and all(conforms(v, item, depth + 1) for v in value)
        elif origin is dict or option is dict:
            item = (typing.get_args(option) or (str, Any))[1]
            ok = isinstance(value, dict) and all(
                isinstance(k, str) and conforms(v, item, depth + 1) for k, v in value.items()
            )
        else:
            ok = False
        if ok:
            return True
    return False


def _bounded(value: Any, depth: int) -> bool:
    """A JSON value nested at most MAX_DEPTH deep, its numbers finite."""
    if depth > MAX_DEPTH:
        return False
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list):
        return all(_bounded(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _bounded(v, depth + 1) for k, v in value.items())
    return value is None or isinstance(value, (bool, int, str))


def parse_text(text: str, annotation: Any) -> Any:
    """The value of command-line ``text`` for a setting declared as ``annotation``; ValueError
    saying what was expected when it is not one."""
    options, nullable = _options(annotation)
    stripped = text.strip()
    if nullable and stripped.lower() in NONE_WORDS:
        return None
    for option in options:
        try:
            return _parse_one(stripped, option)
        except ValueError:
            continue
    raise ValueError(f"expected {describe(annotation)}")


def _parse_one(text: str, option: Any) -> Any:
    origin = typing.get_origin(option)
    if option is bool:
        if text.lower() in BOOLEANS:
            return BOOLEANS[text.lower()]
    elif option is int:
        if re.fullmatch(r"[+-]?\d+", text):
            return int(text)
    elif option is float:
        value = float(text)  # ValueError for what is not a number
        if math.isfinite(value):
            return value
    elif option is str:
        return json.loads(text) if len(text) >= 2 and text[0] == text[-1] == '"' else text
    elif origin in (list, tuple, Sequence) or option in (list, tuple):
        item = (typing.get_args(option) or (str,))[0]
        parts = json.loads(text) if text.startswith("[") else text.split(",")  # [1, 2, 2] or 1,2,2
        if isinstance(parts, list):
            return [_parse_one(str(p).strip(), item) for p in parts]
    elif option is Any:
        return json.loads(text)
    raise ValueError(text)


def _int(minimum: int = 1, maximum: int | None = None) -> Callable[[str, Any], None]:
    return lambda name, value: check_int(name, value, minimum, maximum)


def _number(minimum: float = -math.inf, maximum: float = math.inf, below_maximum: bool = False):
    return lambda name, value: check_number(name, value, minimum, maximum, below_maximum=below_maximum)


def _positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _threads(name: str, value: Any) -> None:
    device.check_threads(value)


def _betas(name: str, value: Any) -> None:
    if (
        not isinstance(value, (list, tuple))
        or len(value) != 2
        or any(isinstance(b, bool) or not isinstance(b, numbers.Real) or not 0 <= b < 1 for b in value)
    ):
        raise ValueError(f"{name} must be two numbers in [0, 1), got {value!r}")


RULES: dict[str, Callable[[str, Any], None]] = {
    "steps": _int(),
    "batch_size": _int(),
    "image_size": _int(),
    "ckpt_every": _int(),
    "log_every": _int(),
    "eval_every": _int(),
    "num_eval": _int(),
    "resize": _int(),
    "crop": _int(),
    "max_images": _int(),
    "world_size": _int(),
    "codebook_size": _int(),
    "codebook_dim": _int(),
    "workers": _int(0),
    "threads": _threads,
    "num": _int(),
    "seed": _int(0, MAX_SEED),
    "lr": _positive,
    "betas": _betas,
    "holdout": _number(0.0, 1.0, below_maximum=True),
    "guidance": _number(0.0, MAX_GUIDANCE),
    "eta": _number(0.0, 1.0),
    "temperature": lambda name, value: check_sampling(value, None),
    "top_k": lambda name, value: check_sampling(1, value),
}
"""The range of each number a run (`RunConfig`) or a command takes, by setting name; None, where a
setting allows it, means its default and is not checked here. Threads: at most this machine's CPUs."""


@contextlib.contextmanager
def named(name: str) -> Iterator[None]:
    """Re-raise a ValueError of the body whose message starts with ``name`` (a model's argument
    check) as a SettingError naming the setting ``name``."""
    try:
        yield
    except SettingError:
        raise
    except ValueError as err:
        text = str(err)
        detail = text[len(name) :] if text.startswith(name) else f": {text}"
        raise SettingError("{%s}%s" % (name, detail.replace("{", "{{").replace("}", "}}"))) from None


def check_setting(name: str, value: Any) -> None:
    """Raise SettingError naming ``name`` when ``value`` (not None) breaks its rule in RULES."""
    if value is not None and name in RULES:
        with named(name):
            RULES[name](name, value)


def check_choice_setting(name: str, value: Any, choices: Sequence[Any]) -> None:
    with named(name):
        check_choice(name, value, choices)
