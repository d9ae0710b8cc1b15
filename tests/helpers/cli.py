"""Running the CLI as a user would, in-process, and checking a clean failure: one error line, nothing written."""

from __future__ import annotations

import sys
from pathlib import Path
from unittest import mock

from askexpert.cli import main


def run_main(args: list[str], capsys) -> tuple[int, str, str]:
    """Run the console entry point in-process; returns (exit code, stdout, stderr)."""
    with mock.patch.object(sys, "argv", ["askexpert", *args]):
        try:
            main()
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def seed_line(line: str) -> bool:
    """Lightning's "Seed set to 0": with "INFO: " in front where Lightning was first imported inside a test (its
    `lightning` logger's format; imported at collection, Lightning's own handler prints the bare message)."""
    return line.removeprefix("INFO: ").startswith("Seed set to")


def one_line(code: int, err: str, *fragments: str) -> str:
    """The single error line of a clean failure (no traceback), checked for `fragments`."""
    lines = [line for line in err.splitlines() if line.strip() and not seed_line(line)]
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("askexpert: error: ") and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def assert_clean_failure(code: int, err: str, run_dir: Path, *fragments: str) -> None:
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip() and not seed_line(line)]
    assert len(lines) == 1, err
    assert lines[0].startswith("askexpert: error: ")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert not run_dir.exists(), f"the failed run wrote {sorted(p.name for p in run_dir.rglob('*'))}"
