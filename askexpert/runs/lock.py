"""Who may write a run folder: one process at a time, under a lock (`locked`).

The process that writes a run folder (a `fit`'s run folder, a pipeline's `--out`, an experts `--root`, an
ablation's `--out` and its store) holds an OS lock (`flock`) on `<folder>/.lock`, which also records who holds
it (pid, command, start time) for the one-line refusal a second writer gets. The kernel drops the lock when its
holder dies, even from SIGKILL, so a crash never blocks the resume. The folders a holder locks are listed in the
environment (`ASKEXPERT_LOCKED_FOLDERS`), which its in-process stages and child processes (side-by-side experts,
DDP ranks) inherit: they take their own lock on their own folder inside it without being refused by their
parent's, while anyone else who writes inside a held folder is refused. Commands that only read (validate, test,
predict, evaluate, route, profile) take no lock.

A lock holds on one host only, so its holder also holds the folder's lease (`<folder>/.lease`,
askexpert/runs/lease.py), which the writers on other hosts of a shared file system (NFS, Lustre) see and respect.
On one host the flock decides who is alive; the lease adds the other hosts' writers, and decides alone where the
file system has no flock.

A process that is part of a command without being its child (a SLURM job of a `--launcher submitit` driver) says
so in `ASKEXPERT_PART_OF`, a JSON list of the driver's folders; its lock and lease record them (`part_of`), so a
driver started again on the same folders is not refused by the jobs the previous one left running inside them.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import time
from collections.abc import Iterator

from askexpert.errors import UserError
from askexpert.files.atomic import remove_stale_temporaries
from askexpert.runs.lease import LEASE_FILE, Lease, command_line, describe, foreign_holder

# -- locks ---------------------------------------------------------------------------------------------------
LOCK_FILE = ".lock"
LOCKED_ENV = "ASKEXPERT_LOCKED_FOLDERS"
PART_OF_ENV = "ASKEXPERT_PART_OF"
# flock errors of a file system that has no flock (Lustre mounted without -o flock, NFS without a lock daemon)
NO_FLOCK = {errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK}


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


def _part_of() -> list[str]:
    """The folders of the command this process is part of without being its child (`PART_OF_ENV`); [] when the
    variable is absent or not a JSON list of paths."""
    try:
        folders = json.loads(os.environ.get(PART_OF_ENV) or "[]")
    except json.JSONDecodeError:
        return []
    if not isinstance(folders, list) or not all(isinstance(f, str) and f for f in folders):
        return []
    return [os.path.realpath(f) for f in folders]


def _lock_info(folder: str) -> dict:
    """What `folder`'s lock file says of its (last) holder; {} when it says nothing readable."""
    try:
        with open(os.path.join(folder, LOCK_FILE), encoding="utf-8") as handle:
            info = json.loads(handle.read() or "{}")
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def holder(folder: str) -> str:
    """Who holds (or last held) `folder`'s lock, from its lock file."""
    info = _lock_info(folder)
    try:
        return f"pid {int(info['pid'])} (`{info['command']}`, started {info['started']})"
    except (ValueError, KeyError, TypeError):
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
    """Whether some process holds `folder` now: its lock on this host, or its lease on another host."""
    return _holding(folder) is not None


def _in_use_by(folder: str) -> str | None:
    """Who holds `folder` now, for a refusal; None when nobody does."""
    found = _holding(folder)
    return None if found is None else found[0]


def _holding(folder: str) -> tuple[str, dict] | None:
    """Who holds `folder` now, for a refusal, and its record (its lease, or its lock file's holder info); None
    when nobody does. Where flock cannot judge this host's holders, their leases do (askexpert/runs/lease.py)."""
    flock = _lock_held(folder)
    lease = foreign_holder(folder, this_host=flock is None)
    if lease is not None:
        return describe(lease), lease
    return (holder(folder), _lock_info(folder)) if flock else None


def _lock_held(folder: str) -> bool | None:
    """Whether some process (on this host, or on any host where the file system shares flock) holds the lock;
    None when flock cannot tell: no lock file, one we may not open, or a file system without flock."""
    path = os.path.join(folder, LOCK_FILE)
    if not os.path.isfile(path):
        return None
    try:
        fd = _try_lock(path, shared=True, create=False)
    except OSError:  # gone, a lock file we may not open, no flock there: this host's lease says
        return None
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
        if candidate in ours or (by := _in_use_by(candidate)) is None:
            continue
        where = candidate if candidate == folder else f"{folder} is part of {candidate}, which"
        raise UserError(f"{where} is in use by {by}; wait for it to finish or stop it")


def check_nothing_inside_in_use(folder: str, ours: list[str]) -> None:
    """Refuse to take `folder` while a process outside this command writes in a folder inside it (a `fit` or a
    pipeline running in a subfolder): two writers in one tree, and its stale-file cleanup, would collide. A holder
    that says it is part of a command holding `folder` or one of `ours` (`PART_OF_ENV`: a job a driver of this
    folder started) is no other writer: a driver started again may take the folder while such jobs run."""
    if not os.path.isdir(folder):
        return
    folder = os.path.realpath(folder)
    commands = {folder, *(os.path.realpath(p) for p in ours)}
    for parent, folders, files in os.walk(folder):
        if (LOCK_FILE in files or LEASE_FILE in files) and parent != folder and parent not in commands:
            found = _holding(parent)
            if found is not None and not _part_of_one(found[1], commands):
                raise UserError(f"{folder} contains {parent}, which is in use by {found[0]}; wait for it to finish")
        folders[:] = [name for name in folders if not name.startswith(".")]


def _part_of_one(record: dict, commands: set[str]) -> bool:
    """Whether a holder's record says it is part of a command holding one of `commands` (real paths)."""
    part_of = record.get("part_of")
    return isinstance(part_of, list) and any(isinstance(f, str) and f in commands for f in part_of)


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
    holder. A folder this command already holds (`LOCKED_ENV`) is entered without a second lock. The holder also
    holds the folder's lease, for the writers on other hosts (askexpert/runs/lease.py); on a file system without
    flock the lease alone decides. Without `fcntl` (Windows) nothing is locked: run one writer per folder there.
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
    path, host_locked = os.path.join(folder, LOCK_FILE), True
    try:
        fd = _try_lock(path)
    except OSError as error:
        if error.errno not in NO_FLOCK:
            raise
        fd, host_locked = os.open(path, os.O_RDWR | os.O_CREAT, 0o644), False  # the lease alone decides
    if fd is None:
        if folder in ours:  # held by this command (this process or the one that started it)
            yield
            return
        by = _in_use_by(folder) or holder(folder)
        raise UserError(f"{folder} is in use by {by}; wait for it to finish or stop it")
    lease = None
    try:
        part_of = _part_of()
        if folder not in ours:  # this command's folders are its holder's lease already
            # before anything is written: a live holder on another host keeps its lock record and its temporaries
            lease = Lease(folder, part_of=part_of)
            lease.acquire(host_locked)
        # who holds it, for a second writer's message; written in place (renaming a new file over a lock file
        # would give the next process another inode to lock)
        info = {"pid": os.getpid(), "command": command_line(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        if part_of:
            info["part_of"] = part_of
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        os.fsync(fd)
        # a subfolder held by a writer of its own (one part of this command, which cleaned it when it took it)
        # keeps its temporaries, even those whose name carries no pid to judge them by
        remove_stale_temporaries(folder, skip=is_held)
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
        if lease is not None:
            lease.release()
        os.close(fd)  # closing the descriptor releases the lock
