"""Run-folder leases: one writer per folder across the hosts of a shared file system (askexpert/runs/lease.py)."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from conftest import REPO

from askexpert.errors import UserError
from askexpert.runs import lease as leases
from askexpert.runs.lease import LEASE_FILE, SECONDS_ENV, Lease
from askexpert.runs.lock import LOCK_FILE, PART_OF_ENV, check_not_in_use, is_held, locked

# a process that tries the lease at an agreed instant, says whether it won, and holds it a moment if it did
CONTEND = """import sys, time
from askexpert.errors import UserError
from askexpert.runs.lease import Lease
lease = Lease(sys.argv[1])
time.sleep(max(0.0, float(sys.argv[2]) - time.time()))
try:
    lease.acquire()
except UserError as error:
    print("refused", error, flush=True)
else:
    print("won", flush=True)
    time.sleep(float(sys.argv[3]))
    lease.release()
"""


@pytest.fixture(autouse=True)
def no_slurm(monkeypatch, tmp_path):
    """No SLURM job of ours, the default ttl, and a squeue that cannot say anything unless a test provides one."""
    for name in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", SECONDS_ENV):
        monkeypatch.delenv(name, raising=False)
    empty = tmp_path / "no-squeue"
    empty.mkdir()
    monkeypatch.setenv("PATH", f"{empty}{os.pathsep}{os.path.dirname(sys.executable)}")


def write_lease(
    folder: Path, host: str = "elsewhere", pid: int = 123, job=None, expires_in: float = 3600, **extra
) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    info = {"host": host, "pid": pid, "job": job, "token": uuid.uuid4().hex, "command": "python -m askexpert fit"}
    info.update(acquired=time.time() - 10, expires=time.time() + expires_in, **extra)
    (folder / LEASE_FILE).write_text(json.dumps(info))
    return info


def current(folder: Path) -> dict:
    return json.loads((folder / LEASE_FILE).read_text())


def fake_squeue(tmp_path: Path, monkeypatch, script: str) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "squeue").write_text(f"#!/bin/sh\n{script}\n")
    (bin_dir / "squeue").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def dead_pid() -> int:
    return next(pid for pid in range(4242, 4_194_304) if not os.path.exists(f"/proc/{pid}"))


def sleeper() -> subprocess.Popen:
    """A live process on this host that is not this one (and holds nothing)."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


def no_flock(monkeypatch) -> None:
    """A file system without flock (Lustre mounted without -o flock): flock fails with ENOSYS."""
    import fcntl

    def flock(fd, operation):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", flock)


def contenders(folder: Path, count: int, hold: float = 1.0) -> list[str]:
    start = time.time() + 0.5  # all start together, once their interpreters are up
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", CONTEND, str(folder), str(start), str(hold)],
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        for _ in range(count)
    ]
    return [process.communicate(timeout=30)[0].strip() for process in processes]


def test_one_of_two_processes_gets_the_lease(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    answers = contenders(folder, 2)
    assert sorted(answer.split()[0] for answer in answers) == ["refused", "won"], answers
    assert "is in use by pid" in next(a for a in answers if a.startswith("refused"))
    assert not (folder / LEASE_FILE).exists()  # released by the winner


def test_of_several_processes_judging_one_expired_lease_exactly_one_takes_it(tmp_path):
    folder = tmp_path / "run"
    write_lease(folder, expires_in=-5)
    answers = contenders(folder, 3)
    assert sorted(answer.split()[0] for answer in answers) == ["refused", "refused", "won"], answers


def test_a_dead_holder_on_this_host_is_taken_over(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", CONTEND, str(folder), "0", "120"], stdout=subprocess.PIPE, text=True, cwd=REPO
    )
    try:
        assert holder.stdout.readline().strip() == "won"
        with pytest.raises(UserError, match=f"in use by pid {holder.pid} on host {socket.gethostname()}, lease"):
            Lease(str(folder)).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)  # no chance to release its lease
        holder.wait()
    assert current(folder)["pid"] == holder.pid
    lease = Lease(str(folder))
    lease.acquire()
    assert current(folder)["token"] == lease.token
    lease.release()
    # a hand-written one too, and through `locked`
    write_lease(folder, host=socket.gethostname(), pid=dead_pid())
    with locked(str(folder)):
        assert current(folder)["pid"] == os.getpid()
    assert not (folder / LEASE_FILE).exists()


def test_a_live_holder_on_another_host_refuses_in_one_line(tmp_path, monkeypatch):
    folder = tmp_path / "run"
    info = write_lease(folder, job="4411")
    (folder / LOCK_FILE).write_text('{"pid": 123, "command": "python -m askexpert fit", "started": "then"}\n')
    fake_squeue(tmp_path, monkeypatch, "echo RUNNING")
    until = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["expires"]))
    expected = (
        f"{folder} is in use by pid 123 on host elsewhere (SLURM job 4411), lease until {until}; "
        "wait for it to finish or stop it"
    )
    with pytest.raises(UserError) as refused:
        with locked(str(folder)):
            pass
    assert str(refused.value) == expected and "\n" not in expected
    assert current(folder) == info and "then" in (folder / LOCK_FILE).read_text()  # nothing of the holder's touched
    # a pipeline does not delete or write into it either, nor take a folder around it
    assert is_held(str(folder))
    with pytest.raises(UserError, match="run/experts is part of .*run, which is in use by pid 123 on host elsewhere"):
        check_not_in_use(str(folder / "experts"))
    with pytest.raises(UserError, match="contains .*run, which is in use by pid 123 on host elsewhere"):
        with locked(str(tmp_path)):
            pass


def test_an_expired_lease_of_another_host_is_taken_over(tmp_path):
    folder = tmp_path / "run"
    write_lease(folder, expires_in=-1)
    assert not is_held(str(folder))
    with locked(str(folder)):
        assert current(folder)["host"] == socket.gethostname() and current(folder)["pid"] == os.getpid()
    assert not (folder / LEASE_FILE).exists()


def test_a_lease_of_our_own_slurm_job_is_taken_back(tmp_path, monkeypatch):
    folder = tmp_path / "run"
    write_lease(folder, job="777")
    monkeypatch.setenv("SLURM_JOB_ID", "777")  # the job was requeued, now on another node
    with locked(str(folder)):
        assert current(folder)["job"] == "777" and current(folder)["pid"] == os.getpid()
    write_lease(folder, job="41_3")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "41")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    with locked(str(folder)):
        assert current(folder)["job"] == "41_3"


@pytest.mark.parametrize(
    ("squeue", "alive"),
    [("true", False), ("echo PENDING", False), ("echo RUNNING", True), ("echo COMPLETING", True), ("exit 1", True)],
)
def test_squeue_says_whether_another_hosts_job_still_runs(tmp_path, monkeypatch, squeue, alive):
    """Not listed or not running: dead. squeue failing (or missing, the fixture's PATH) says nothing."""
    folder = tmp_path / "run"
    write_lease(folder, job="4411")
    fake_squeue(tmp_path, monkeypatch, squeue)
    assert is_held(str(folder)) is alive
    if alive:
        with pytest.raises(UserError, match="SLURM job 4411"):
            Lease(str(folder)).acquire()
    else:
        with locked(str(folder)):
            assert current(folder)["pid"] == os.getpid()


def test_without_squeue_another_hosts_job_is_alive_until_its_lease_expires(tmp_path):
    folder = tmp_path / "run"
    write_lease(folder, job="4411")
    assert is_held(str(folder))


def test_the_heartbeat_renews_the_lease_and_notices_losing_it(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv(SECONDS_ENV, "0.6")
    folder = tmp_path / "run"
    with locked(str(folder)):
        first = current(folder)["expires"]
        deadline = time.time() + 2
        while current(folder)["expires"] == first and time.time() < deadline:  # renewed every 0.2 s
            time.sleep(0.01)
        assert current(folder)["expires"] > first and current(folder)["expires"] > time.time()
        # someone else took it (say, after a long freeze of ours); written just after a renewal, so that this
        # test does not meet the check-then-replace window the module docstring owns up to
        taken = write_lease(folder)
        time.sleep(0.6)
        assert current(folder) == taken  # not written over
    assert current(folder) == taken  # and not removed at the release
    warnings = [line for line in capfd.readouterr().err.splitlines() if "lease" in line]
    assert len(warnings) == 1 and warnings[0].startswith(f"askexpert: warning: lost the lease on {folder} (now held")


def test_release_leaves_someone_elses_lease_alone(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    lease = Lease(str(folder))
    lease.acquire()
    other = write_lease(folder, expires_in=-1)
    lease.release()
    assert current(folder) == other


def test_two_contenders_for_one_stale_lease_one_wins(tmp_path):
    """Both judged the same dead token; the second moves the first's new lease aside, sees it is not the dead
    one, and puts it back."""
    folder = tmp_path / "run"
    stale = write_lease(folder, expires_in=-1)
    first, second = Lease(str(folder)), Lease(str(folder))
    assert leases.holder_dead(leases.read(first.path)) and leases.holder_dead(leases.read(second.path))
    assert first._remove(stale["token"]) and first._create()
    assert not second._remove(stale["token"]) and not second._create()
    assert current(folder)["token"] == first.token
    assert sorted(os.listdir(folder)) == [LEASE_FILE]  # nothing left aside
    with pytest.raises(UserError, match=f"in use by pid {os.getpid()}"):
        second.acquire()
    # the other order: the second removed it first and created its own, the first's rename finds nothing
    (folder / LEASE_FILE).unlink()
    stale = write_lease(folder, expires_in=-1)
    third = Lease(str(folder))
    assert third._remove(stale["token"]) and not first._remove(stale["token"])


@pytest.mark.parametrize("value", ["0", "-3", "soon", "nan", "inf"])
def test_a_bad_lease_duration_is_one_line(tmp_path, monkeypatch, value):
    monkeypatch.setenv(SECONDS_ENV, value)
    with pytest.raises(UserError) as bad:
        with locked(str(tmp_path / "run")):
            pass
    assert str(bad.value) == f"{SECONDS_ENV}={value!r} is not a positive number of seconds (default 600)"
    monkeypatch.setenv(SECONDS_ENV, "30")
    with locked(str(tmp_path / "run")):  # the refused one let go of the folder's lock
        assert current(tmp_path / "run")["expires"] - time.time() == pytest.approx(30, abs=5)


def test_without_flock_the_lease_alone_decides(tmp_path, monkeypatch):
    """Lustre mounted without -o flock: flock fails with ENOSYS."""
    no_flock(monkeypatch)
    folder = tmp_path / "run"
    with locked(str(folder)):
        assert current(folder)["pid"] == os.getpid()
        with pytest.raises(UserError, match=f"in use by pid {os.getpid()} on host"):
            Lease(str(folder)).acquire()
    assert not (folder / LEASE_FILE).exists()


def test_without_flock_this_hosts_holders_are_judged_by_their_pid(tmp_path, monkeypatch):
    """Where flock judges this host's holders, their leases are not looked at; where it cannot, their pids are."""
    folder = tmp_path / "runs" / "x"
    process = sleeper()
    try:
        write_lease(folder, host=socket.gethostname(), pid=process.pid)
        (folder / LOCK_FILE).write_text(f'{{"pid": {process.pid}, "command": "python -m askexpert fit"}}\n')
        assert not is_held(str(folder))  # nobody holds the lock: flock says so
        no_flock(monkeypatch)
        assert is_held(str(folder))
        in_use = f"in use by pid {process.pid} on host {socket.gethostname()}"
        with pytest.raises(UserError, match=f"runs contains .*runs/x, which is {in_use}"):
            with locked(str(tmp_path / "runs")):
                pass
        with pytest.raises(UserError, match=f"runs/x/fit is part of .*runs/x, which is {in_use}"):
            check_not_in_use(str(folder / "fit"))
        with pytest.raises(UserError, match=in_use):
            with locked(str(folder)):
                pass
    finally:
        process.kill()
        process.wait()
    assert not is_held(str(folder))  # its pid is gone
    with locked(str(tmp_path / "runs")):
        pass


def test_a_live_process_of_our_slurm_job_on_this_host_keeps_its_lease(tmp_path, monkeypatch):
    """Two processes of one allocation on one node: rule (b), our own job, does not hand us the other's lease."""
    monkeypatch.setenv("SLURM_JOB_ID", "777")
    folder, here = tmp_path / "run", socket.gethostname()
    process = sleeper()
    try:
        write_lease(folder, host=here, pid=process.pid, job="777")
        with pytest.raises(UserError, match=rf"in use by pid {process.pid} on host {here} \(SLURM job 777\)"):
            Lease(str(folder)).acquire()
        # our own pid (a requeued job that got it again) and a process of our job on another node: taken back
        assert leases.holder_dead(write_lease(folder, host=here, pid=os.getpid(), job="777"))
        assert leases.holder_dead(write_lease(folder, pid=process.pid, job="777"))
        # this host's flock, held by the caller, says the holder is gone whatever its pid names now
        assert leases.holder_dead(write_lease(folder, host=here, pid=process.pid, job="777"), host_locked=True)
    finally:
        process.kill()
        process.wait()
    assert leases.holder_dead(write_lease(folder, host=here, pid=process.pid, job="777"))  # (a): its pid is gone


@pytest.mark.parametrize(
    ("squeue", "alive"),
    [("echo SUSPENDED", True), ("echo STOPPED", True), ("echo RUNNING", True), ("true", False), ("exit 1", False)],
)
def test_squeue_keeps_an_expired_lease_of_a_job_that_still_runs(tmp_path, monkeypatch, squeue, alive):
    """A suspended job cannot renew its lease: squeue listing it alive outweighs the expiry; only when squeue says
    nothing (here: it fails) does the expiry decide."""
    folder = tmp_path / "run"
    write_lease(folder, job="4411", expires_in=-60)
    fake_squeue(tmp_path, monkeypatch, squeue)
    assert is_held(str(folder)) is alive
    if alive:
        with pytest.raises(UserError, match="SLURM job 4411"):
            with locked(str(folder)):
                pass
    # the same for a live process of this host, where flock cannot judge it
    process = sleeper()
    try:
        info = write_lease(folder, host=socket.gethostname(), pid=process.pid, job="4411", expires_in=-60)
        assert leases.holder_dead(info) is not alive
    finally:
        process.kill()
        process.wait()


def test_a_lease_that_cannot_be_read_has_a_holder(tmp_path, monkeypatch):
    """ESTALE, EIO, EACCES: a holder we cannot name, not a dead one. A failure that passes is retried once."""
    folder = tmp_path / "run"
    path = folder / LEASE_FILE
    write_lease(folder, expires_in=-1)  # would be taken over, could it be read
    failures = {"left": 10**6}
    real_open = open

    def flaky_open(name, *args, **kwargs):
        if str(name) == str(path) and failures["left"] > 0:
            failures["left"] -= 1
            raise OSError(errno.ESTALE, "Stale file handle", str(name))
        return real_open(name, *args, **kwargs)

    monkeypatch.setattr(leases, "open", flaky_open, raising=False)
    assert leases.read(str(path)) == {leases.UNREADABLE: f"its lease {path} cannot be read: Stale file handle"}
    assert is_held(str(folder))
    expected = f"{folder} is in use by an unknown process (its lease {path} cannot be read: Stale file handle)"
    with pytest.raises(UserError) as refused:
        with locked(str(folder)):
            pass
    assert str(refused.value) == f"{expected}; wait for it to finish or stop it"
    with pytest.raises(UserError, match="contains .*run, which is in use by an unknown process"):
        with locked(str(tmp_path)):
            pass
    assert path.exists() and not leases.holder_dead(leases.read(str(path)))
    failures["left"] = 1  # fails once, then reads
    assert leases.read(str(path))["host"] == "elsewhere"
    failures["left"] = 1
    assert not is_held(str(folder))  # expired: its holder is gone
    # the holder's own heartbeat neither renews over it nor gives it up while it cannot read it
    path.unlink()
    lease = Lease(str(folder))
    lease.acquire()
    try:
        failures["left"] = 2
        assert lease._carries_our_token() is None
        assert lease._carries_our_token() is True
    finally:
        lease.release()
    assert not path.exists()


def test_a_job_of_this_folders_driver_on_another_host_does_not_refuse_it(tmp_path, monkeypatch):
    """A `--launcher submitit` job runs on another host and says (`part_of`) which command's folders it works in: a
    driver started again on them takes them, and leaves the job's folder, temporaries included, alone."""
    out = Path(os.path.realpath(tmp_path)) / "out"
    claim = out / "store" / "claims" / "base-1"
    info = write_lease(claim, part_of=[str(out), str(out / "store")])
    temporary = claim / ".tmp-k2j3h4"  # a temporary file whose name names no writer
    temporary.write_text("half")
    with locked(str(out)), locked(str(out / "store")):
        assert is_held(str(claim))
    assert temporary.exists() and current(claim) == info
    for part_of in ([], [str(tmp_path / "another")]):  # not part of this command: a second writer, refused
        write_lease(claim, part_of=part_of)
        with pytest.raises(
            UserError, match="out contains .*claims/base-1, which is in use by pid 123 on host elsewhere"
        ):
            with locked(str(out)):
                pass
    # what `locked` writes: the folders the variable names, as real paths; nothing where it names none
    (tmp_path / "link").symlink_to(out, target_is_directory=True)
    monkeypatch.setenv(PART_OF_ENV, json.dumps([str(tmp_path / "link")]))
    mine = tmp_path / "mine"
    with locked(str(mine)):
        assert current(mine)["part_of"] == [str(out)]
        assert json.loads((mine / LOCK_FILE).read_text())["part_of"] == [str(out)]
    for value in ("not json", '"a string"', "[1]", "[]"):
        monkeypatch.setenv(PART_OF_ENV, value)
        with locked(str(mine)):
            assert "part_of" not in current(mine) and "part_of" not in json.loads((mine / LOCK_FILE).read_text())
