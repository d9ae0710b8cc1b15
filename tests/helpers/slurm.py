"""Whether a real SLURM cluster answers here (cluster/slurm_up.sh starts a one-node one), for the `cluster` tests."""

from __future__ import annotations

import shutil
import subprocess


def slurm_unavailable() -> str | None:
    """Why no SLURM cluster can take jobs here, in one line; None when one can."""
    for command in ("sbatch", "squeue", "sinfo", "scancel"):
        if shutil.which(command) is None:
            return f"no SLURM here ({command} not found); start one with `bash cluster/slurm_up.sh` (root)"
    try:
        found = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"SLURM does not answer ({type(err).__name__}); start it with `bash cluster/slurm_up.sh` (root)"
    states = found.stdout.split()
    if found.returncode != 0 or not any(s.startswith(("idle", "mix", "alloc")) for s in states):
        reason = (found.stderr.strip().splitlines() or [f"node states {states}"])[-1]
        return f"SLURM has no node up ({reason}); start it with `bash cluster/slurm_up.sh` (root)"
    return None
