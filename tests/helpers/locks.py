"""Another process holding a folder's lock, as a second writer would meet it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import REPO

# -- locks ----------------------------------------------------------------------------------------------------
TAKE = "import sys, time\nfrom askexpert.runs.lock import locked\nwith locked(sys.argv[1]):\n    pass\n"


HOLD = TAKE.replace("pass", "print('held', flush=True)\n    time.sleep(120)")


def hold(folder: Path) -> subprocess.Popen:
    """Another process holding `folder` (it only imports the stdlib-only lock helper: fast)."""
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert process.stdout.readline().strip() == "held"
    return process
