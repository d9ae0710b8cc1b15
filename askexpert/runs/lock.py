"""Who may write a run folder: one process at a time, under a lock (`locked`).

The process that writes a run folder (a `fit`'s run folder, a pipeline's `--out`, an experts `--root`, an
ablation's `--out` and its store) holds an OS lock (`flock`) on `<folder>/.lock`, which also records who holds
it (pid, command, start time) for the one-line refusal a second writer gets. The kernel drops the lock when its
holder dies, even from SIGKILL, so a crash never blocks the resume. The folders a holder locks are listed in the
environment (`ASKEXPERT_LOCKED_FOLDERS`), which its in-process stages and child processes (side-by-side experts,
DDP ranks) inherit: they take their own lock on their own folder inside it without being refused by their
parent's, while anyone else who writes inside a held folder is refused. Commands that only read (validate, test,
predict, evaluate, route, profile) take no lock.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import sys
import time
from collections.abc import Iterator

from askexpert.errors import UserError
from askexpert.files.atomic import remove_stale_temporaries

# -- locks ---------------------------------------------------------------------------------------------------
LOCK_FILE = ".lock"
LOCKED_ENV = "ASKEXPERT_LOCKED_FOLDERS"


def _inherited() -> list[str]:
    """Folders locked by this process or a command that started it (directly or further up).

    `LOCKED_ENV` holds [folder, pid of the holder] pairs; an entry whose holder is not this process or one of
    its ancestors (a variable exported into an unrelated shell, say) is ignored, so it cannot let a second
    writer in."""
    try:
        held = json.loads(os.environ.get(LOCKED_ENV) or "[]")
    except json.JSONDecodeError:
        return []
    if not isinstance(held, list):
        return []
    ancestors = _ancestors()
    return [
        entry[0]
        for entry in held
        if isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str) and entry[1] in ancestors
    ]


def _ancestors() -> set[int]:
    """This process's pid and its ancestors' (from /proc where there is one, else the parent only)."""
    pids, pid = {os.getpid()}, os.getppid()
    while pid > 1 and pid not in pids:
        pids.add(pid)
        try:
            with open(f"/proc/{pid}/stat", encoding="utf-8") as handle:
                pid = int(handle.read().rsplit(")", 1)[1].split()[1])  # the field after the state: ppid
        except (OSError, ValueError, IndexError):
            break
    return pids


def _command_line() -> str:
    argv = list(sys.argv) or ["python"]
    ours = argv[0].endswith(os.path.join("askexpert", "__main__.py"))
    argv[0] = "python -m askexpert" if ours else "python -c" if argv[0] == "-c" else os.path.basename(argv[0])
    text = " ".join([argv[0], *(shlex.quote(a) for a in argv[1:])])
    return text if len(text) <= 200 else text[:197] + "..."


def holder(folder: str) -> str:
    """Who holds (or last held) `folder`'s lock, from its lock file."""
    try:
        with open(os.path.join(folder, LOCK_FILE), encoding="utf-8") as handle:
            info = json.loads(handle.read() or "{}")
        return f"pid {int(info['pid'])} (`{info['command']}`, started {info['started']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def _try_lock(path: str, shared: bool = False, create: bool = True) -> int | None:
    """An open descriptor of `path` holding its flock, or None when another descriptor holds it."""
    import fcntl

    # a probe (`create=False`) opens read-only: flock works on any descriptor, and a lock file this process may
    # not write (another user's, a read-only mount) is still probed rather than taken for free
    fd = os.open(path, os.O_RDWR | os.O_CREAT if create else os.O_RDONLY, 0o644)
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


def is_held(folder: str) -> bool:
    """Whether some process holds `folder`'s lock now."""
    path = os.path.join(folder, LOCK_FILE)
    if not os.path.isfile(path):
        return False
    try:
        fd = _try_lock(path, shared=True, create=False)
    except OSError:  # gone, or a lock file we may not open (read-only folder): nobody writes through it
        return False
    if fd is None:
        return True
    os.close(fd)
    return False


def check_not_in_use(folder: str, around_only: bool = False) -> None:
    """Refuse to write into `folder` while a process outside this command holds it or a folder around it (e.g.
    a `fit` still training in a stage folder that a pipeline would start again); `around_only`: only the folders
    around it."""
    folder = os.path.realpath(folder)
    ours = {os.path.realpath(p) for p in _inherited()}
    for candidate in _parents(folder) if around_only else [folder, *_parents(folder)]:
        if candidate in ours or not is_held(candidate):
            continue
        where = candidate if candidate == folder else f"{folder} is part of {candidate}, which"
        raise UserError(f"{where} is in use by {holder(candidate)}; wait for it to finish or stop it")


def check_nothing_inside_in_use(folder: str, ours: list[str]) -> None:
    """Refuse to take `folder` while a process outside this command writes in a folder inside it (a `fit` or a
    pipeline running in a subfolder): two writers in one tree, and its stale-file cleanup, would collide."""
    if not os.path.isdir(folder):
        return
    for parent, folders, files in os.walk(folder):
        if LOCK_FILE in files and parent != folder and parent not in ours and is_held(parent):
            raise UserError(f"{folder} contains {parent}, which is in use by {holder(parent)}; wait for it to finish")
        folders[:] = [name for name in folders if not name.startswith(".")]


def _parents(folder: str) -> list[str]:
    parents = []
    while (parent := os.path.dirname(folder)) != folder:
        parents.append(parent)
        folder = parent
    return parents


@contextlib.contextmanager
def locked(folder: str) -> Iterator[None]:
    """Hold `folder` (created if needed) for this process and the processes it starts, until the block ends.

    A second writer (another process, or one writing inside this folder) gets one `UserError` line naming the
    holder. A folder this command already holds (`LOCKED_ENV`) is entered without a second lock. Without
    `fcntl` (Windows) nothing is locked: run one writer per folder there.
    """
    try:
        import fcntl  # noqa: F401
    except ImportError:
        yield
        return
    folder = os.path.realpath(folder)
    ours = [os.path.realpath(p) for p in _inherited()]
    if folder not in ours:
        check_not_in_use(folder, around_only=True)
        check_nothing_inside_in_use(folder, ours)
    os.makedirs(folder, exist_ok=True)
    fd = _try_lock(os.path.join(folder, LOCK_FILE))
    if fd is None:
        if folder in ours:  # held by this command (this process or the one that started it)
            yield
            return
        raise UserError(f"{folder} is in use by {holder(folder)}; wait for it to finish or stop it")
    try:
        # who holds it, for a second writer's message; written in place (renaming a new file over a lock file
        # would give the next process another inode to lock)
        info = {"pid": os.getpid(), "command": _command_line(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        os.fsync(fd)
        remove_stale_temporaries(folder)
        previous = os.environ.get(LOCKED_ENV)
        try:
            entries = json.loads(previous or "[]")
        except json.JSONDecodeError:
            entries = []
        os.environ[LOCKED_ENV] = json.dumps([*(entries if isinstance(entries, list) else []), [folder, os.getpid()]])
        try:
            yield
        finally:
            if previous is None:
                os.environ.pop(LOCKED_ENV, None)
            else:
                os.environ[LOCKED_ENV] = previous
    finally:
        os.close(fd)  # closing the descriptor releases the lock
