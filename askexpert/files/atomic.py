"""How every file is written: to a temporary file in its own folder, fsynced and renamed over the old one
(`atomic_path`, `atomic_write_bytes`, `atomic_write_text`, `write_json`; checkpoints: askexpert/files/checkpoints.py's
`save_torch_file`, the same way). A reader, or a run resumed after a crash or a full disk, sees the old file or
the new one, never part of one. A temporary file left by a killed writer is removed by the next process that
locks the folder (askexpert/runs/lock.py). Standard library only: a lock can be taken without importing torch.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from typing import Any

# -- atomic writes -----------------------------------------------------------------------------------------
# .<name>.<pid>.<8 hex>.tmp: ours and files/checkpoints.save_torch_file's; .tmp-*: mkstemp's (before fsync);
# *.ckpt.tmp: an older strip_training_state's
TEMPORARY = re.compile(r"^\..+\.\d+\.[0-9a-f]{8}\.tmp$|^\.tmp-|\.ckpt\.tmp$")


def temporary_name(path: str) -> str:
    """A temporary file's path next to `path` (same folder, so the rename stays on one file system)."""
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def fsync_folder(folder: str) -> None:
    """Make a rename in `folder` durable (where the platform lets a folder be fsynced)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yields a temporary path for a writer that wants a file name (`torch.save`, `savefig`, a YAML dumper); when
    the block ends, that file is fsynced and renamed to `path`. On any error it is removed and `path` is left as
    it was."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):  # said of `path`, not of the temporary file the rename would fail on
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
    os.makedirs(folder, exist_ok=True)
    tmp = temporary_name(path)
    try:
        with naming_errors(path, tmp):  # the user's file, not the temporary one or a descriptor
            yield tmp
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)  # a full disk shows up here at the latest
            finally:
                os.close(fd)
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_folder(folder)


@contextlib.contextmanager
def naming_errors(path: str, written: str | None = None) -> Iterator[None]:
    """An OSError in the block that names no file (a write to an open file: a full disk says only "No space left
    on device") or names `written` (the temporary file that becomes `path`) is raised again naming `path`: the
    one line the user sees (askexpert/errors.py) says which file could not be written."""
    try:
        yield
    except OSError as err:
        if err.errno is None or err.filename not in (None, written):
            raise
        raise OSError(err.errno, err.strerror, path) from None


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write `path` through a temporary file, fsync and rename: readers never see half a file."""
    with atomic_path(path) as tmp, open(tmp, "xb") as handle:  # a name of our own: created with the umask's mode
        handle.write(data)


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def remove_stale_temporaries(folder: str, skip: Callable[[str], bool] | None = None) -> None:
    """Delete the temporary files killed writers left in `folder` and its subfolders (not following links: a
    store's stages are cleaned by the store's own lock). Called under the folder's lock; a file whose name carries
    the pid of a process still alive (a writer in a subfolder with a lock of its own) is left alone, and so is
    every subfolder, with all inside it, for which `skip` says True (one held by a writer of its own, which
    cleaned it when it took it: askexpert/runs/lock.py)."""
    for parent, folders, files in os.walk(folder):
        if skip is not None:
            folders[:] = [name for name in folders if not skip(os.path.join(parent, name))]
        for name in files:
            if TEMPORARY.search(name) and not _writer_alive(name):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(parent, name))


def _writer_alive(temporary: str) -> bool:
    """Whether the process named in a temporary file's name (`.<name>.<pid>.<hex>.tmp`) still runs."""
    found = re.search(r"\.(\d+)\.[0-9a-f]{8}\.tmp$", temporary)
    return found is not None and process_alive(int(found.group(1)))


def staging_folder(path: str, kind: str = "partial") -> str:
    """A new, empty folder `.<name>.<kind>-<pid>` beside `path`, to build `path` in and rename into place. First
    the folders of that pattern whose process is gone are removed: a writer killed with SIGKILL cannot clean up
    (SIGTERM and SIGINT let it: askexpert/interrupts.py), and nothing else would ever remove them."""
    parent, name = os.path.split(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    pattern = re.compile(rf"^\.{re.escape(name)}\.{re.escape(kind)}-(\d+)$")
    for entry in os.listdir(parent):
        found = pattern.match(entry)
        left = os.path.join(parent, entry)
        if found and os.path.isdir(left) and not os.path.islink(left) and not process_alive(int(found[1])):
            shutil.rmtree(left, ignore_errors=True)
    staging = os.path.join(parent, f".{name}.{kind}-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    return staging


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def write_json(path: str, value: Any, indent: int | None = 2, sort_keys: bool = False, default=None) -> None:
    """`value` as JSON (one trailing newline), written atomically: the one way a JSON file is written here."""
    atomic_write_text(path, json.dumps(value, indent=indent, sort_keys=sort_keys, default=default) + "\n")
