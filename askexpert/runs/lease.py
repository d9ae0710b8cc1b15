"""Who writes a run folder across the hosts of a shared file system: a lease, `<folder>/.lease`.

`flock` (askexpert/runs/lock.py) is one host's lock: on NFS or Lustre it may not reach the other hosts, and a pid
names a process on one host only. A lease is a JSON file saying which process (host, pid, SLURM job, a random
token) writes the folder, and until when. Its holder renews it every ttl/3 (a heartbeat thread), so a holder that
vanished without a trace (a dead node) lets go when its lease expires. It is taken over sooner when its holder is
known dead, by these rules in this order:
(a) on this host, its pid is gone (or the caller holds this host's flock on the folder, which says so). A live pid
    on this host other than ours is judged first: (b) does not apply to it (two processes of one SLURM allocation
    on one node would take each other's lease), and before its lease expires neither does (c).
(b) it is our own SLURM job (requeued, taking back its own stage).
(c) squeue says whether its job still runs: listed in a running state (suspended and stopped included: such a job
    cannot renew, but resumes where it was) keeps the lease even past its expiry; not listed, or pending again,
    is dead. squeue missing, failing or timing out says nothing: on to (d).
(d) it expired. The ttl is `ASKEXPERT_LEASE_SECONDS` (600).
On this host, flock judges the holders (askexpert/runs/lock.py); where it cannot (a file system without flock,
no lock file), this host's leases are judged by the rules above too. A lease that exists but cannot be read (an
error other than "not found", after one retry: ESTALE, EIO, EACCES) has a holder we cannot name, never a dead one.

Races. A lease is created by hard-linking a complete, synced temporary file to `.lease`: link() is atomic and
exclusive on every NFS version (O_EXCL is not on NFSv2), and, unlike O_EXCL then write, no reader ever meets an
empty lease, which it would judge nobody's. A takeover renames the stale lease aside, checks that what it moved
carries the token it judged dead, and otherwise puts it back (by link: never over a newer lease); so of two
contenders for one stale lease only one removes it, and the other then meets the winner's. What remains:
- While a contender holds a live lease aside to check it (a rename and a read: microseconds locally, a few NFS
  round trips) `.lease` is absent: a third process looking just then creates its own, and the moved holder has
  lost its lease. Its heartbeat notices within ttl/3 and warns on stderr, but it goes on writing.
- A heartbeat checks its token, then replaces the file; a takeover in between (possible only once the lease
  expired: a holder frozen for a whole ttl, or hosts' clocks apart by more than a ttl) leaves both believing they
  hold it until the other's heartbeat warns. Hosts must agree on the time (NTP) within a small part of a ttl.
- Rule (b) cannot tell apart two steps of one SLURM job writing one folder at once on different nodes.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shlex
import socket
import subprocess
import sys
import threading
import time
import uuid

from askexpert.errors import UserError
from askexpert.files.atomic import process_alive

LEASE_FILE = ".lease"
SECONDS_ENV = "ASKEXPERT_LEASE_SECONDS"
DEFAULT_SECONDS = 600.0
# squeue states of a job whose processes may still write (a suspended or stopped job resumes where it was)
ALIVE_STATES = frozenset({"RUNNING", "COMPLETING", "CONFIGURING", "SUSPENDED", "STOPPED", "SIGNALING", "RESIZING"})
# `read`'s answer for a lease that exists but cannot be read, and how long it waits before its one retry
UNREADABLE = "unreadable"
READ_RETRY_SECONDS = 0.1


def command_line() -> str:
    """This process's command line, short, for the people reading a refusal."""
    argv = list(sys.argv) or ["python"]
    ours = argv[0].endswith(os.path.join("askexpert", "__main__.py"))
    argv[0] = "python -m askexpert" if ours else "python -c" if argv[0] == "-c" else os.path.basename(argv[0])
    text = " ".join([argv[0], *(shlex.quote(a) for a in argv[1:])])
    return text if len(text) <= 200 else text[:197] + "..."


def lease_seconds() -> float:
    raw = os.environ.get(SECONDS_ENV, "").strip()
    if not raw:
        return DEFAULT_SECONDS
    seconds = math.nan
    with contextlib.suppress(ValueError):
        seconds = float(raw)
    if not (math.isfinite(seconds) and seconds > 0):
        raise UserError(f"{SECONDS_ENV}={raw!r} is not a positive number of seconds (default {DEFAULT_SECONDS:g})")
    return seconds


def slurm_job() -> str | None:
    """This process's SLURM job, as squeue and the user name it: `<array job>_<task>` for an array task."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return f"{array}_{task}"
    return os.environ.get("SLURM_JOB_ID") or None


def read(path: str) -> dict | None:
    """The lease at `path`; None when there is none, {} when it is not a lease (no holder to wait for), and
    {UNREADABLE: why} when the file system does not let it be read (a holder we cannot name, never a dead one)."""
    failure: OSError | None = None
    for _ in range(2):
        if failure is not None:  # a stale NFS handle, an I/O error, no permission: perhaps gone in a moment
            time.sleep(READ_RETRY_SECONDS)
        try:
            with open(path, encoding="utf-8") as handle:
                info = json.loads(handle.read())
        except (FileNotFoundError, NotADirectoryError):  # none there (the second: the "folder" is a file)
            return None
        except ValueError:
            return {}
        except OSError as error:
            failure = error
            continue
        return info if isinstance(info, dict) else {}
    return {UNREADABLE: f"its lease {path} cannot be read: {getattr(failure, 'strerror', None) or failure}"}


def describe(info: dict) -> str:
    if UNREADABLE in info:
        return f"an unknown process ({info[UNREADABLE]})"
    job = f" (SLURM job {info['job']})" if info.get("job") else ""
    try:
        until = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(info["expires"])))
    except (KeyError, TypeError, ValueError, OverflowError):
        until = "an unknown time"
    return f"pid {info.get('pid')} on host {info.get('host')}{job}, lease until {until}"


def _slurm_says_alive(job: str) -> bool | None:
    """Whether SLURM lists `job` in a running state; None when it cannot say (no squeue, an error, a timeout)."""
    try:
        done = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    # listed in a running state: alive; not listed (or pending again, after a requeue): gone
    return None if done.returncode != 0 else any(state in ALIVE_STATES for state in done.stdout.split())


def holder_dead(info: dict, host_locked: bool = False) -> bool:
    """Whether the lease's holder is known to be gone (rules (a)-(d) above). `host_locked`: the caller holds this
    host's flock on the folder, so a lease from this host is a dead holder's, whatever process its pid names now."""
    if UNREADABLE in info:
        return False  # held by someone we cannot name
    try:
        expires, pid = float(info["expires"]), int(info["pid"])
    except (KeyError, TypeError, ValueError):
        return True  # not a lease anyone wrote whole: nobody to wait for
    job = str(info["job"]) if info.get("job") else None
    here = info.get("host") == socket.gethostname()
    if here and (host_locked or pid <= 0 or not process_alive(pid)):
        return True  # (a)
    another_process_here = here and pid != os.getpid()
    if job and job == slurm_job() and not another_process_here:
        return True  # (b)
    expired = time.time() > expires
    if another_process_here and not expired:
        return False  # (a): its pid runs
    alive = _slurm_says_alive(job) if job else None  # (c)
    return expired if alive is None else not alive  # (d) where squeue says nothing


def foreign_holder(folder: str, this_host: bool = False) -> dict | None:
    """The lease of `folder`, when a live process on another host holds it; `this_host`: on this host too (where
    flock cannot judge this host's holders: a file system without flock, or no lock file)."""
    info = read(os.path.join(folder, LEASE_FILE))
    if not info or (not this_host and info.get("host") == socket.gethostname()) or holder_dead(info):
        return None
    return info


class Lease:
    """`folder`'s lease for this process: `acquire`, then `release` when done; `lost` once another took it."""

    def __init__(self, folder: str, seconds: float | None = None, part_of: list[str] | None = None) -> None:
        self.folder = folder
        self.part_of = list(part_of or [])  # the folders of the command this process is part of (lock.py)
        self.path = os.path.join(folder, LEASE_FILE)
        self.seconds = lease_seconds() if seconds is None else seconds
        self.token = uuid.uuid4().hex
        self.acquired = 0.0
        self.lost = False
        self._pid = os.getpid()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self, host_locked: bool = False) -> None:
        """Take the lease, or raise one `UserError` line naming its live holder."""
        for _ in range(5):  # each round ends with the lease created, refused, or a dead one removed
            self.acquired = time.time()
            if self._create():
                self._thread = threading.Thread(target=self._heartbeat, name="askexpert-lease", daemon=True)
                self._thread.start()
                return
            info = read(self.path)
            if info is None:
                continue  # released while we looked: create again
            if not holder_dead(info, host_locked):
                raise UserError(f"{self.folder} is in use by {describe(info)}; wait for it to finish or stop it")
            self._remove(info.get("token"))
        raise UserError(f"{self.folder}: other processes keep taking its lease ({self.path}); try again")

    def release(self) -> None:
        """Stop renewing; remove the lease if it is still ours (a takeover's, after we lost it, stays)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()  # a renewal under way would otherwise write the lease back after its removal
        if os.getpid() == self._pid and self._thread is not None:  # a forked child never releases its parent's
            self._remove(self.token)
            with contextlib.suppress(OSError):  # a renewal's temporary, left when its write failed
                os.unlink(f"{self.path}.{self.token}.new")
        self._thread = None

    # -- the steps (each safe against a contender doing the same at the same time) --------------------------
    def _record(self) -> dict:
        where = {"host": socket.gethostname(), "pid": self._pid, "job": slurm_job(), "token": self.token}
        record = {**where, "command": command_line(), "acquired": self.acquired, "expires": time.time() + self.seconds}
        return {**record, "part_of": self.part_of} if self.part_of else record

    def _write_temporary(self) -> str:
        """A complete, synced copy of our lease under a name nobody else uses (the token is unique)."""
        temporary = f"{self.path}.{self.token}.new"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, (json.dumps(self._record()) + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        return temporary

    def _create(self) -> bool:
        """Whether we created the lease (exclusively: link fails when `.lease` exists)."""
        temporary = self._write_temporary()
        try:
            os.link(temporary, self.path)
            return True
        except OSError as error:
            # over NFS a link whose reply was lost is sent again and fails (EEXIST) although the first one made it:
            # the temporary's link count tells
            with contextlib.suppress(OSError):
                if os.stat(temporary).st_nlink == 2:
                    return True
            if isinstance(error, FileExistsError):
                return False
            raise
        finally:
            with contextlib.suppress(OSError):
                os.unlink(temporary)

    def _remove(self, token: str | None) -> bool:
        """Remove the lease if it (still) carries `token`: rename it aside, then look at what was moved; anything
        else (a contender's newer lease) is put back. Whether the lease carrying `token` is gone by our hand."""
        aside = f"{self.path}.{self.token}.stale"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False  # a contender removed it first
        moved = read(aside)
        ours = moved is not None and moved.get("token") == token
        if not ours:
            with contextlib.suppress(OSError):  # fails only when yet another lease was made meanwhile: that one wins
                os.link(aside, self.path)
        with contextlib.suppress(OSError):
            os.unlink(aside)
        return ours

    def _carries_our_token(self) -> bool | None:
        """Whether the lease is still ours; None when it cannot be read now (asked again at the next beat)."""
        for attempt in range(2):
            info = read(self.path) or {}
            if UNREADABLE in info:
                return None
            if info.get("token") == self.token:
                return True
            # a contender may hold it aside for a moment to check it (see the module docstring): look once more
            if attempt or self._stop.wait(min(1.0, self.seconds / 10)):
                return False
        return False

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.seconds / 3):
            try:
                carries = self._carries_our_token()
                if carries is None:
                    continue  # neither ours for sure nor someone else's: not written over, asked again
                if not carries:
                    if self._stop.is_set():
                        return  # released meanwhile
                    self.lost = True
                    held = read(self.path)
                    by = f"now held by {describe(held)}" if held else "removed by another process"
                    warning = f"lost the lease on {self.folder} ({by}); it may be written by two processes at once"
                    print(f"askexpert: warning: {warning}", file=sys.stderr, flush=True)
                    return
                os.replace(self._write_temporary(), self.path)
            except OSError:  # a full disk or a file server that does not answer: try again at the next beat
                continue
