"""One fit across several processes under a real SLURM (`pytest -m cluster`; cluster/slurm_up.sh starts a one-node
cluster here): `srun` starts one task per device and Lightning's SLURMEnvironment makes them one DDP fit (CPU and
gloo here, as GPUs and NCCL on a real cluster). Skipped, with the reason, where no SLURM answers.

The jobs are polled with squeue every half second rather than `sbatch --wait` (which polls every few seconds, up
to 10 s, doubling the time of these short jobs); the cluster keeps no accounting, `scontrol` gives the exit code.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, TINY_ARGS, run_subprocess_env
from helpers.slurm import slurm_unavailable

pytestmark = pytest.mark.cluster

JOB_TIMEOUT_S = 300  # a job may wait behind others on this one 2-CPU node

# Put first on PYTHONPATH in the job: every task records what it writes under WATCH_ROOT in `WRITE_LOG.<rank>`
# (file opens for writing, renames, removals; a `makedirs(exist_ok=True)` of an existing folder writes nothing).
WRITE_AUDIT = """
import os, sys
_root, _log = os.environ.get("WATCH_ROOT"), os.environ.get("WRITE_LOG")
if _root and _log:
    _out = open(f"{_log}.{os.environ.get('SLURM_PROCID', 'x')}", "a", buffering=1)
    _writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    def _inside(path):
        return isinstance(path, (str, bytes, os.PathLike)) and os.path.abspath(os.fsdecode(path)).startswith(_root)
    def _audit(event, args):
        if event == "open" and _inside(args[0]) and (any(c in str(args[1] or "") for c in "wax+")
                                                      or (args[2] or 0) & _writing):
            _out.write(f"open {os.fsdecode(args[0])}\\n")
        elif event in ("os.rename", "os.remove", "os.rmdir", "os.truncate") and _inside(args[0]):
            _out.write(f"{event} {' -> '.join(os.fsdecode(a) for a in args[:2] if isinstance(a, (str, bytes)))}\\n")
    sys.addaudithook(_audit)
"""


@pytest.fixture(scope="module", autouse=True)
def slurm():
    reason = slurm_unavailable()
    if reason is not None:
        pytest.skip(reason)


def job_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The test's environment for the job (sbatch exports it), without the SLURM variables of any job around us."""
    env = {k: v for k, v in run_subprocess_env().items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
    if "SLURM_CONF" in os.environ:
        env["SLURM_CONF"] = os.environ["SLURM_CONF"]
    return {**env, **(extra or {})}


def run_job(sbatch_args: list[str], output: Path, env: dict[str, str]) -> tuple[str, int, str]:
    """Submit a batch job from the repository root and wait for it: (final state, exit status, its output)."""
    submitted = subprocess.run(
        ["sbatch", "--parsable", "--chdir", str(REPO), "--output", str(output), *sbatch_args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert submitted.returncode == 0, submitted.stderr
    job = submitted.stdout.strip().split(";")[0]
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True).stdout.strip():
        if time.monotonic() > deadline:
            subprocess.run(["scancel", job])
            pytest.fail(f"job {job} did not end within {JOB_TIMEOUT_S} s (squeue: is the node busy or down?)")
        time.sleep(0.5)
    shown = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    state, exit_code = re.search(r"JobState=(\S+)", shown), re.search(r"ExitCode=(\d+):(\d+)", shown)
    assert state and exit_code, f"scontrol no longer knows job {job}: {shown}"
    status, signal = int(exit_code.group(1)), int(exit_code.group(2))
    status = 128 + signal if signal else status
    return state.group(1), status, output.read_text() if output.exists() else ""


def test_two_tasks_train_one_ddp_model_with_the_shipped_sbatch_script(tmp_path):
    """cluster/fit_multinode.sbatch on one node x 2 tasks (CPU, no GPU: --gpus-per-node=0): one fit of world size 2,
    best.ckpt and last.ckpt in the run folder, written by rank 0 alone."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(WRITE_AUDIT)
    run, writes = tmp_path / "run", tmp_path / "writes"
    env = job_env({"WATCH_ROOT": str(run), "WRITE_LOG": str(writes)})
    env["PYTHONPATH"] = os.pathsep.join([str(hook), env["PYTHONPATH"]])
    layout = ["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0"]
    fit = [*TINY_ARGS, "--trainer.accelerator", "cpu", "--trainer.precision", "32-true"]
    fit += ["--trainer.default_root_dir", str(run)]

    state, status, out = run_job([*layout, "cluster/fit_multinode.sbatch", *fit], tmp_path / "job.out", env)

    assert (state, status) == ("COMPLETED", 0), out
    assert "Traceback" not in out and "askexpert: error" not in out, out
    assert "MEMBER: 2/2" in out and "Starting with 2 processes" in out, out  # one DDP world of the two tasks
    assert f"fit_multinode: 1 node(s) x 2 task(s), {REPO}/.venv/bin/python" in out, out  # the repo's venv
    assert "sync_dist=True" not in out, out  # epoch-level logs are reduced across the processes
    for name in ("checkpoints/best.ckpt", "checkpoints/last.ckpt", "metrics.csv", "config.yaml"):
        assert (run / name).is_file(), f"{name} missing: {sorted(p.name for p in run.rglob('*'))}\n{out}"
    assert "train/acc" in (run / "metrics.csv").read_text()
    rank0, rank1 = (Path(f"{writes}.{rank}") for rank in (0, 1))
    assert "checkpoints/last.ckpt" in rank0.read_text()  # the audit saw rank 0's writes...
    assert not rank1.exists() or rank1.read_text() == "", rank1.read_text()  # ...and none of rank 1


def test_tasks_the_trainer_cannot_map_are_one_error_line(tmp_path):
    """`sbatch --ntasks=2` (no --ntasks-per-node) with `--trainer.devices 1`: Lightning would raise a RuntimeError
    in every task; the job's output holds one `askexpert: error:` line saying what to change, the job fails, and
    nothing is written."""
    run = tmp_path / "run"
    fit = " ".join([sys.executable, "-m", "askexpert", "fit", *TINY_ARGS, "--trainer.default_root_dir", str(run)])

    state, status, out = run_job(
        ["--ntasks=2", "--cpus-per-task=1", "--wrap", f"srun {fit}"], tmp_path / "job.out", job_env()
    )

    assert state == "FAILED" and status == 2, out
    errors = [line for line in out.splitlines() if line.startswith("askexpert: error:")]
    assert len(errors) == 1, out
    assert "SLURM gives 2 tasks (--ntasks=2) but the trainer asks for 1 device x 1 node" in errors[0], out
    assert "--ntasks-per-node=1 instead of --ntasks=2" in errors[0] and "--trainer.devices 2" in errors[0], out
    assert "Traceback" not in out and "RuntimeError" not in out, out
    assert not run.exists()
