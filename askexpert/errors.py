"""The one exception type that reaches users as a message instead of a traceback.

Anything the user can fix (a missing folder, a bad checksum, an unknown model name) raises `UserError`
with a message that names the problem and, where useful, the valid choices. `askexpert.cli.main`
prints it on one line and exits non-zero; every other exception is a bug and keeps its traceback. An
`OSError` about a path (a read-only folder, a full disk, a file where a folder should be) is the user's
environment, not a bug: `os_error_message` turns it into the same one line.
"""

from __future__ import annotations

import errno
import os
import traceback

# errno values that mean "the disk cannot take the write", whatever file was being written
DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


class UserError(Exception):
    """A problem with the user's input, reported as one clear line."""


class RunsDivergedError(UserError):
    """Some runs of an ablation diverged while the others finished (their results are written); exit status 3, as
    for one diverged run, so a script or scheduler sees that the grid is not whole."""

    exit_status = 3


class DivergenceError(UserError):
    """Training produced a non-finite loss, gradient or weight (`askexpert.callbacks.guard`); exit status 3.

    `step` and `epoch` locate the first bad step, `last_good` is the checkpoint that is still intact (or None),
    `stage` the pipeline stage that diverged (None for a plain `fit`).
    """

    exit_status = 3

    def __init__(self, message: str, step: int, epoch: int, last_good: str | None, stage: str | None = None) -> None:
        super().__init__(message)
        self.step = step
        self.epoch = epoch
        self.last_good = last_good
        self.stage = stage

    def __reduce__(self):  # an exception crosses process boundaries by pickling: keep its fields
        return type(self), (str(self), self.step, self.epoch, self.last_good, self.stage)


def find_user_error(ex: BaseException | None) -> UserError | None:
    """The UserError behind an exception chain (e.g. one a class raised while jsonargparse built it)."""
    seen = set()
    while ex is not None and id(ex) not in seen:
        if isinstance(ex, UserError):
            return ex
        seen.add(id(ex))
        ex = ex.__cause__ or ex.__context__
    return None


def undecodable_config(err: UnicodeDecodeError) -> UserError:
    """The one line for a config file that is not UTF-8 text. jsonargparse reads every config file (`--config
    FILE`, `--data FILE`, ...) as text and lets the decoding error out, which names no file: the file is the one
    its `read_text` was reading when it failed."""
    for frame, _ in traceback.walk_tb(err.__traceback__):
        reading = frame.f_locals.get("self") if frame.f_code.co_name == "read_text" else None
        if reading is not None and hasattr(reading, "relative"):
            return UserError(f"config file {reading.relative} is not UTF-8 text (a YAML file is)")
    return UserError(f"a config file is not UTF-8 text (a YAML file is): {err.reason} at byte {err.start}")


class NestedParseError(UserError):
    """What a parser jsonargparse made for a class inside an option (`--model.init_args.foo`) could not parse.

    That parser does not know the command; the command's parser completes the line (`one_line_parse_error`).
    """


def one_line_parse_error(message: str, prog: str, ex: BaseException | None, nested: bool = False) -> UserError:
    """What an argument parser raises instead of printing usage: the UserError inside, or the first lines.

    `prog` is what the hint names (`python -m askexpert fit`); `nested` marks a parser made for a class inside an
    option (see `NestedParseError`). jsonargparse puts a reason on the line after a blank one ('Parser key
    "model":', '', '  - Expected ...'), so blank lines are skipped.
    """
    lines = [line.strip().removeprefix("- ") for line in message.strip().splitlines() if line.strip()]
    user_error = find_user_error(ex)
    if nested:
        return user_error if user_error is not None else NestedParseError(" ".join(lines[:2]))
    if isinstance(user_error, NestedParseError):  # 'Parser key "model": Option 'foo' is not accepted (see ...)'
        return UserError(f"{' '.join(lines[:1] + [str(user_error)])} (see `{prog} --help`)")
    if user_error is not None:
        return user_error
    return UserError(f"{' '.join(lines[:2])} (see `{prog} --help`)")


def one_line_for_user(err: BaseException) -> tuple[str, int] | None:
    """(message, exit status) when an exception is the user's to fix, None when it is a bug (keep the traceback).

    jsonargparse wraps what a class raised while being built: the user's problem is the UserError inside. An
    OSError about a path (read-only folder, full disk, a file where a folder should be) is the user's to fix too.
    """
    user_error = find_user_error(err)
    message = str(user_error) if user_error is not None else os_error_message(err)
    return None if message is None else (message, getattr(user_error, "exit_status", 2))


def os_error_message(err: BaseException) -> str | None:
    """One line for an OSError about a path (or a full disk), naming the path; None for anything else.

    Only `__cause__` is followed, not `__context__`: a bug raised while handling an OSError stays a bug.
    Python gives a denied write on a missing file (a read-only folder) the file's name: the folder is what the
    user must change, so the line names it.
    """
    while not isinstance(err, OSError) and err.__cause__ is not None:  # e.g. wrapped by jsonargparse (`from`)
        err = err.__cause__
    if not isinstance(err, OSError) or err.errno is None:
        return None
    reason = err.strerror or os.strerror(err.errno)
    if err.filename is None:  # a write to an open file: only a full disk is the user's to fix
        return f"cannot write: {reason} (free some space and run again)" if err.errno in DISK_FULL else None
    path = os.fsdecode(err.filename)
    if err.filename2 is not None:
        path = f"{path} -> {os.fsdecode(err.filename2)}"
    elif err.errno in (errno.EACCES, errno.EPERM) and not os.path.lexists(path):
        return f"cannot write in {os.path.dirname(os.path.abspath(path))}: {reason}"
    if err.errno in DISK_FULL:
        return f"cannot write {path}: {reason} (free some space and run again)"
    if err.errno == errno.EROFS:
        return f"cannot write {path}: {reason}"
    return f"cannot use {path}: {reason}"


def check_output_path(path: str, option: str, kind: str) -> None:
    """Refuse, before anything is computed, an output that cannot be written: a folder where a file is expected
    (`kind="file"`), a file where a folder is expected (`kind="folder"`), a file on the way to it, or a folder
    without write permission (root passes that check: it ignores permissions)."""
    if kind == "file" and os.path.isdir(path):
        raise UserError(f"{option} {path} is a folder; give a file name")
    if kind == "folder" and os.path.lexists(path) and not os.path.isdir(path):
        raise UserError(f"{option} {path} is a file; give a folder")
    # the nearest existing folder on the way is where the first file or folder will be created
    existing = os.path.abspath(path if kind == "folder" else os.path.dirname(os.path.abspath(path)))
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UserError(f"{option} {path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{option} {path}: no permission to write in {existing}")
