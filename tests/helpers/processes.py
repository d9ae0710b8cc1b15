"""Process ids for tests of what a dead writer leaves behind."""

import subprocess
import sys


def dead_pid() -> int:
    """The id of a process that has exited (a leftover `.NAME.KIND-PID` folder of it is stale)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid
