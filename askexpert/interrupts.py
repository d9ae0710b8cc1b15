"""SIGTERM and SIGINT: a command stops where it is, records what it was doing, and exits non-zero.

A scheduler (SLURM, systemd, Kubernetes) stops a job with SIGTERM and decides from the exit status whether it
finished; a requeue needs "did not finish". So inside `stop_on_signals` (installed by `askexpert.cli.main` for
every command but `serve`, which drains instead) either signal raises `Interrupted` in the main thread,
and `main` prints one line and exits with 128 + the signal's number, as a shell reports a process the signal
killed: 143 for SIGTERM, 130 for SIGINT (Ctrl+C).

Why an exception and not Lightning's own SIGTERM handling: Lightning only sets a flag and raises
`SIGTERMException` at the next batch boundary, a `SystemExit` without a code (exit 0), and turns Ctrl+C into
`sys.exit(1)`. `Interrupted` is a `BaseException` (no `except Exception` swallows it) and not a
`KeyboardInterrupt`, so Lightning tears the Trainer down quietly and re-raises it as it is; on the way out the
pipeline records the stage as interrupted (askexpert/pipeline/runner.py), an export removes its partial folder,
and every atomic writer removes its temporary file. What happens next is what happened before: the command run
again resumes from `last.ckpt`. Lightning's flag is still set first (its handler runs ours after its own), so
DDP ranks hear of the signal as before.

Standard library only: it is installed before anything heavy is imported.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(BaseException):
    """SIGTERM or SIGINT arrived; `exit_status` is 128 + the signal's number."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)

    @property
    def exit_status(self) -> int:
        return exit_status(self.signum)

    def __reduce__(self):  # an exception crosses process boundaries by pickling: keep the signal
        return type(self), (self.signum,)


_received: list[int] = []  # the signals this process received inside `stop_on_signals`, first one first
_handler_pid: list[int] = []  # the process that installed the handler (a forked child inherits it)


def _raise_interrupted(signum: int, frame) -> None:
    if not _handler_pid or os.getpid() != _handler_pid[-1]:
        # a forked child (a DataLoader worker) inherited the handler: behave as Python's defaults would
        if signum == signal.SIGINT:
            signal.default_int_handler(signum, frame)
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    _received.append(signum)
    if len(_received) == 1:
        raise Interrupted(signum)
    # a second signal while the first one's clean-up runs (children stopped, records written) does not cut it
    # short: it is already stopping, and the exit status is the first signal's (SIGKILL still ends it at once)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within the block, SIGTERM and SIGINT raise `Interrupted` in the main thread (once; see the module's
    docstring). In another thread, or inside an outer `stop_on_signals`, nothing changes."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) is (
        _raise_interrupted
    ):
        yield
        return
    previous = {signum: signal.getsignal(signum) for signum in SIGNALS}
    _handler_pid.append(os.getpid())
    try:
        for signum in SIGNALS:
            signal.signal(signum, _raise_interrupted)
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        _handler_pid.pop()
        _received.clear()  # what was received is answered inside the block (tests run several `main`s in a process)


def received_signal() -> int | None:
    """The first SIGTERM or SIGINT this process received inside `stop_on_signals`, else None."""
    return _received[0] if _received else None


def interruption(err: BaseException) -> int | None:
    """The signal behind `err` (SIGTERM or SIGINT), or None when `err` is no interruption: `Interrupted`,
    whatever a received signal turned into on its way out (Lightning's `sys.exit(1)` after a Ctrl+C, a worker
    error), a `KeyboardInterrupt` (Ctrl+C without the handler) and Lightning's `SIGTERMException` (SIGTERM
    without it: a `SystemExit` without a code, read by name here so that this module imports no Lightning)."""
    if isinstance(err, Interrupted):
        return err.signum
    if received_signal() is not None:
        return received_signal()
    if isinstance(err, KeyboardInterrupt):
        return int(signal.SIGINT)
    if type(err).__name__ == "SIGTERMException":
        return int(signal.SIGTERM)
    return None


def signal_of_exit(code: int) -> int | None:
    """The SIGTERM or SIGINT that stopped a child process, from its exit status (ours: 128 + the signal; one the
    signal killed: minus the signal), else None. A launcher whose child was interrupted is interrupted too."""
    for signum in SIGNALS:
        if code in (exit_status(signum), -int(signum)):
            return int(signum)
    return None


def exit_status(signum: int) -> int:
    """A command stopped by `signum` exits as a shell reports a process the signal killed: 128 + its number."""
    return 128 + int(signum)
