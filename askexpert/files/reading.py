"""How every record askexpert reads back (stages.json, pipeline.yaml, report.json, manifest.json, a device
profile) is opened and parsed: one chain, so that no reader lets a file that is not what askexpert writes escape
as a traceback.

A file that cannot be read is a `UserError` ("cannot read PATH: why"). A file whose bytes are not a document
(not UTF-8, not JSON or YAML, or nested deeper than the parser's recursion allows: `[[[...` a few thousand deep)
raises `DamagedFile`, whose `reason` the reader puts into its own line with the command that writes the file
again. Checking the parsed document's fields is the reader's job (askexpert/files/fields.py).

Standard library (and PyYAML, imported only for YAML): the torch-free expert server reads its manifest here.
"""

from __future__ import annotations

import json
from typing import Any

from askexpert.errors import UserError


class DamagedFile(UserError):
    """A file whose bytes are not a JSON or YAML document; `reason` says why, in a few words."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path} is damaged ({reason})")
        self.path, self.reason = path, reason


def read_bytes(path: str, what: str = "") -> bytes:
    """`path`'s bytes; `what` names the file in the error ("device profile")."""
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as err:
        raise UserError(f"cannot read {what + ' ' if what else ''}{path}: {err.strerror or err}") from None


def read_json_file(path: str, what: str = "") -> Any:
    return parse_json(read_bytes(path, what), path)


def read_yaml_file(path: str, what: str = "") -> Any:
    return parse_yaml(read_bytes(path, what), path)


def parse_json(data: bytes, path: str) -> Any:
    """A JSON document's value (NaN and Infinity parse: the reader's range checks refuse them by name)."""
    text = _text(data, path)
    try:
        return json.loads(text)
    except RecursionError:
        raise DamagedFile(path, "not valid JSON: nested too deeply") from None
    except ValueError as err:  # JSONDecodeError, or an integer of more digits than Python converts
        raise DamagedFile(path, f"not valid JSON: {_first_line(err)}") from None


def parse_yaml(data: bytes, path: str) -> Any:
    """A YAML document's value, read as data only (`safe_load`: no tag builds an object)."""
    import yaml

    text = _text(data, path)
    try:
        return yaml.safe_load(text)
    except RecursionError:  # PyYAML composes nested collections recursively
        raise DamagedFile(path, "not valid YAML: nested too deeply") from None
    # besides YAMLError, safe_load's constructors raise plain errors on a malformed tagged scalar
    # (`2020-13-45`: ValueError, `!!bool 3`: KeyError, `!!timestamp x`: AttributeError)
    except (yaml.YAMLError, ValueError, OverflowError) as err:
        raise DamagedFile(path, f"not valid YAML: {_first_line(err)}") from None
    except (TypeError, AttributeError, LookupError):  # their text ("'3'") says nothing to a user
        raise DamagedFile(path, "not valid YAML: a tagged value (`!!bool`, `!!timestamp`, ...) is malformed") from None


def _text(data: bytes, path: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise DamagedFile(path, "not UTF-8 text") from None


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0][:200] if lines else type(err).__name__
