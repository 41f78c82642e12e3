"""Argument checks of the models' constructors and samplers: a bad value raises ValueError naming
the argument, the range it must lie in and the value given, before anything is built."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Any

MAX_SEED = 2**63 - 1
"""Seeds of a draw are ints in [0, MAX_SEED]: torch's generators and the fused ops' Philox take 63
bits."""


def check_int(name: str, value: Any, minimum: int = 1, maximum: int | None = None) -> None:
    """``value`` must be an int (not a bool) in [minimum, maximum]."""
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Integral)
        or value < minimum
        or (maximum is not None and value > maximum)
    ):
        bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{name} must be an int {bound}, got {value!r}")


def check_number(
    name: str, value: Any, minimum: float = -math.inf, maximum: float = math.inf, *, below_maximum: bool = False
) -> None:
    """``value`` must be a finite real number (not a bool) in [minimum, maximum] ([minimum,
    maximum) with ``below_maximum``)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(value)
        or value < minimum
        or value > maximum
        or (below_maximum and value == maximum)
    ):
        if math.isinf(maximum):
            bound = "" if math.isinf(minimum) else f" >= {minimum:g}"
        else:
            bound = f" in [{minimum:g}, {maximum:g}{')' if below_maximum else ']'}"
        raise ValueError(f"{name} must be a finite number{bound}, got {value!r}")


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> None:
    choices = list(choices)
    if not any(value == choice and type(value) is type(choice) for choice in choices):
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def check_seed(seed: Any) -> None:
    """``seed`` must be None or an int in [0, MAX_SEED]."""
    if seed is not None:
        check_int("seed", seed, minimum=0, maximum=MAX_SEED)
