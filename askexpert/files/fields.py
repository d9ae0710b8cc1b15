"""Values read from a record (a JSON or YAML file), checked by type and by range where the file is read.

A reader walks its record with these functions. The first value of the wrong type or out of its range raises
`BadField`, which names the field by its path in the record (`operating_point.threshold`); the reader turns it
into one line that names the file and the command that writes it again. The checks sit at the reader so that
every use after it may trust the value: a NaN threshold or a class id past the end never reaches the router.

Standard library only: the torch-free expert server reads its manifest with them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any


class BadField(ValueError):
    """A record's field that is missing, of the wrong type or out of its range; `str()` says which and why."""


def field(record: dict, key: str, where: str) -> Any:
    """`record[key]`, the record being the mapping at path `where` ("" at the top)."""
    if key not in record:
        raise BadField(f"{where}{key} is missing")
    return record[key]


def mapping(value: Any, name: str) -> dict:
    if not isinstance(value, dict):
        raise BadField(f"{name} must be a mapping, got {_shown(value)}")
    return value


def sequence(value: Any, name: str, min_length: int = 0) -> list:
    if not isinstance(value, list):
        raise BadField(f"{name} must be a list, got {_shown(value)}")
    if len(value) < min_length:
        raise BadField(f"{name} must hold at least {min_length} entr{'y' if min_length == 1 else 'ies'}")
    return value


def text(value: Any, name: str) -> str:
    if not isinstance(value, str) or not value:
        raise BadField(f"{name} must be a non-empty text, got {_shown(value)}")
    return value


def flag(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise BadField(f"{name} must be true or false, got {_shown(value)}")
    return value


def choice(value: Any, name: str, choices: Iterable[str]) -> str:
    choices = tuple(choices)
    if value not in choices or not isinstance(value, str):
        raise BadField(f"{name} must be one of {', '.join(choices)}, got {_shown(value)}")
    return value


def number(value: Any, name: str, low: float = -math.inf, high: float = math.inf, above: bool = False) -> float:
    """A JSON number (never a text that merely parses as one, nor true/false), finite, in [low, high]; with
    `above`, strictly above `low` (a temperature divides: 0 is refused, as a NaN or an infinity is)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BadField(f"{name} must be a finite number, got {_shown(value)}")
    if value < low or value > high or (above and value == low):
        raise BadField(f"{name} must be {_range(low, high, above)}, got {value!r}")
    return float(value)


def whole(value: Any, name: str, low: int, high: float = math.inf) -> int:
    """A JSON integer (1.0 and true are refused: they are not ids or counts) in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadField(f"{name} must be a whole number, got {_shown(value)}")
    if not low <= value <= high:
        raise BadField(f"{name} must be {_range(low, high, False)}, got {value!r}")
    return value


def _range(low: float, high: float, above: bool) -> str:
    if high == math.inf:
        return f"{'above' if above else 'at least'} {low:g}"
    return f"in {'(' if above else '['}{low:g}, {high:g}]"


def _shown(value: Any) -> str:
    shown = repr(value)
    return shown if len(shown) <= 40 else f"a {type(value).__name__}"
