"""The overview (`python -m askexpert --help`) and the dispatcher's own errors import neither torch nor Lightning:
they answer at once (0.05 s on this machine instead of seconds), measured as imports, not as a timed test."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO

CHECK = (
    "import sys\n"
    "sys.argv = ['askexpert', *sys.argv[1:]]\n"
    "from askexpert.__main__ import main\n"
    "try:\n"
    "    main()\n"
    "except SystemExit as exit_:\n"
    "    code = exit_.code\n"
    "else:\n"
    "    code = 0\n"
    "heavy = sorted(m for m in ('torch', 'lightning', 'timm') if m in sys.modules)\n"
    "print('HEAVY', heavy, 'CODE', code)\n"
)


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CHECK, *args], capture_output=True, text=True, cwd=REPO, timeout=120)


def test_the_overview_imports_no_training_stack():
    done = _run("--help")
    assert "HEAVY [] CODE 0" in done.stdout, done.stdout + done.stderr
    assert "pipeline" in done.stdout and "fit" in done.stdout  # every command listed


def test_an_unknown_command_is_one_line_without_the_training_stack():
    done = _run("fitt")
    assert "HEAVY [] CODE 2" in done.stdout, done.stdout + done.stderr
    assert done.stderr.strip() == (
        "askexpert: error: unknown command 'fitt'; commands: fit, validate, test, predict, partition, experts, "
        "pipeline, evaluate, ablate, route, profile, export, serve, edge, adapt"
    )
