"""submitit's executors as the launcher uses them: submit a group of stage jobs (one job array) after some jobs,
ask which jobs are still queued or running, cancel jobs.

Only this module imports submitit, and only when the submitit launcher runs. With SLURM, dependencies are the
scheduler's (`afterok`, with `kill-on-invalid-dep` so the dependants of a failed job never wait forever) and the
driver may exit while the jobs run; what is alive comes from `squeue` (not `sacct`, which needs SLURM's
accounting, often off on small clusters). submitit's local and debug executors have no queue and no
dependencies: the driver submits a job there only once its upstream is done (askexpert/cluster/driver.py).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass

from askexpert.cluster.stage_job import StageJob
from askexpert.errors import UserError
from askexpert.pipeline.launcher_settings import LauncherSettings

# squeue states of a job that is queued, running or about to run again (a requeued one)
ALIVE_STATES = {
    "PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "STOPPED", "SIGNALING", "RESIZING",
    "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "STAGE_OUT", "RESV_DEL_HOLD",
    "PREEMPTED",  # on its way back to PENDING when the partition requeues preempted jobs
}  # fmt: skip
# A line of a job's log that says why it failed: an exception, our one-line error, or SLURM's own word
REASON = re.compile(r"^(askexpert: error: .*|[\w.]*(Error|Exception|Interrupt)\b.*|.*\*\*\* JOB \d+.*)$")


@dataclass
class Submitted:
    job_id: str
    log: str  # the job's stderr (submitit writes stdout beside it)


class Scheduler:
    """One submitit executor (`settings.cluster`: slurm, local or debug) writing its job files in `folder`."""

    def __init__(self, settings: LauncherSettings, folder: str) -> None:
        self.settings, self.folder = settings, folder
        self.uses_slurm = settings.cluster == "slurm"
        if self.uses_slurm and shutil.which("sbatch") is None:
            raise UserError("--launcher.cluster slurm: sbatch is not on PATH here; run on a SLURM login node")
        self._jobs: dict[str, object] = {}  # submitit's job objects of this process (local and debug executors)
        self.errors: dict[str, str] = {}  # job id -> its exception's first line (the debug executor runs them here)

    def submit(self, jobs: list[StageJob], after: list[str], cpu_only: bool) -> list[Submitted]:
        """Submit `jobs` as one array, each starting once every job of `after` finished well (SLURM only: the
        other executors are given jobs whose upstream is done)."""
        import submitit

        # requeued at the time limit up to this many times (submitit's default, 3, would stop a long fit early)
        executor = submitit.AutoExecutor(folder=self.folder, cluster=self.settings.cluster, slurm_max_num_timeout=50)
        executor.update_parameters(**self._parameters(after, cpu_only))
        try:
            with executor.batch():
                handles = [executor.submit(job) for job in jobs]
        except (subprocess.CalledProcessError, submitit.core.utils.FailedJobError, OSError) as err:
            detail = getattr(err, "stderr", None) or getattr(err, "output", None) or str(err)
            detail = detail.decode(errors="replace") if isinstance(detail, bytes) else str(detail)
            lines = [line for line in detail.strip().splitlines() if line.strip()]
            raise UserError(f"sbatch refused the jobs: {lines[-1] if lines else err}") from None
        submitted = []
        for handle in handles:
            self._jobs[str(handle.job_id)] = handle
            submitted.append(Submitted(str(handle.job_id), str(handle.paths.stderr)))
        if self.settings.cluster == "debug":  # runs in this process, now (without submitit's post-mortem debugger)
            for handle in handles:
                error = handle.exception()
                if error is not None:
                    self.errors[str(handle.job_id)] = str(error).strip().splitlines()[0] if str(error) else repr(error)
        return submitted

    def _parameters(self, after: list[str], cpu_only: bool) -> dict:
        s = self.settings
        cpus = s.cpus_per_fit
        parameters = {"name": "askexpert", "timeout_min": s.time_min, "nodes": 1, "tasks_per_node": 1}
        parameters |= {"cpus_per_task": cpus, "gpus_per_node": 0 if cpu_only else s.gpus_per_fit}
        if s.mem_gb is not None:
            parameters["mem_gb"] = s.mem_gb
        if not self.uses_slurm:
            return parameters
        extra = {str(k): v for k, v in s.sbatch.items()}
        if after:
            parameters["slurm_dependency"] = "afterok:" + ":".join(after)
            extra.setdefault("kill-on-invalid-dep", "yes")  # a failed upstream cancels its dependants
        for key, value in (("partition", s.partition), ("account", s.account), ("qos", s.qos)):
            if value:
                parameters[f"slurm_{key}"] = value
        parameters["slurm_array_parallelism"] = s.array_parallelism
        if extra:
            parameters["slurm_additional_parameters"] = extra
        return parameters

    def alive(self, job_ids: list[str]) -> set[str]:
        """Which of `job_ids` are queued or running now."""
        if not job_ids:
            return set()
        if self.settings.cluster == "debug":  # ran when submitted
            return set()
        if not self.uses_slurm:
            return {i for i in job_ids if i in self._jobs and not self._jobs[i].done()}
        return _squeue_alive(job_ids)

    def cancel(self, job_ids: list[str]) -> None:
        if not job_ids:
            return
        if self.uses_slurm:
            subprocess.run(["scancel", *job_ids], capture_output=True, timeout=60, check=False)
            return
        for job_id in job_ids:
            if job_id in self._jobs:
                self._jobs[job_id].cancel(check=False)


def _squeue_alive(job_ids: list[str], tries: int = 5, pause_s: float = 10.0) -> set[str]:
    """Jobs of `job_ids` that squeue lists in a live state (array tasks one per line: `-r`). A busy controller
    that does not answer is asked again (`tries` times, `pause_s` apart) before the driver gives up."""
    wanted = set(job_ids)
    command = ["squeue", "-h", "-r", "-o", "%i %T", "-j", ",".join(sorted(wanted))]
    for attempt in range(tries):
        try:
            found = subprocess.run(command, capture_output=True, text=True, timeout=60)
            problem = None if found.returncode == 0 or "Invalid job id" in found.stderr else found.stderr
        except (OSError, subprocess.TimeoutExpired) as err:
            found, problem = None, f"no answer ({type(err).__name__})"
        if problem is None:
            break
        if attempt + 1 == tries:
            reason = (str(problem).strip().splitlines() or ["no output"])[-1]
            raise UserError(f"squeue failed {tries} times: {reason}; the jobs go on, run the same command again")
        time.sleep(pause_s)
    alive = set()
    for line in found.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1] in ALIVE_STATES:
            alive.add(parts[0])
    # a job id given as `123` that squeue lists as array tasks `123_0`: alive while any task is
    return {i for i in wanted if i in alive or any(a.startswith(f"{i}_") for a in alive)}


def failure_reason(log: str) -> str:
    """Why a job failed, in one line, from its log (stderr; stdout beside it is read too): the last exception or
    error line (`askexpert.errors.UserError: ...` as its message alone), else the last line."""
    lines: list[str] = []
    for path in (log, log[: -len(".err")] + ".out" if log.endswith(".err") else None):
        if path and os.path.isfile(path):
            with open(path, errors="replace") as handle:
                lines += [line.rsplit("\r", 1)[-1].strip() for line in handle if line.strip()]
    reasons = [line for line in lines if REASON.match(line)]
    if not reasons:
        return lines[-1] if lines else "no log (the job never started, or its log folder is not shared with the nodes)"
    reason = reasons[-1].removeprefix("askexpert: error: ")
    for ours in ("askexpert.errors.UserError: ", "askexpert.errors.DivergenceError: "):
        reason = reason.removeprefix(ours)
    return reason
