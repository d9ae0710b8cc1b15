"""The one launcher of child `fit` processes, used by `experts --devices` and `pipeline --parallel_experts`.

Lightning has no launcher for N different models, so each expert trains as its own `python -m askexpert fit`,
a few at a time per GPU (pinned with `CUDA_VISIBLE_DEVICES`) or on this machine, its output in its `fit.log`:
exactly the training it would get alone, while a large GPU runs several at once. After a failure no new child
starts; if this process is interrupted, the running children are stopped too.

A child that diverged exits with `DivergenceError.exit_status`; `divergence_of` reads where (step, epoch) from its
log's last line. That is the one way a child's divergence is detected. A child stopped by SIGTERM or SIGINT
(exit status 143 or 130, askexpert/interrupts.py) stops the launcher as that signal would (`raise_if_interrupted`).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from askexpert.errors import DivergenceError, UserError
from askexpert.interrupts import Interrupted, signal_of_exit, stop_on_signals

# How `main` prefixes the one-line error a failed command prints (askexpert/cli.py)
ERROR_PREFIX = "askexpert: error: "
# Where a divergence happened, as askexpert/callbacks/guard.py words it: "... at step 12 (epoch 0, ..."
DIVERGED_AT = re.compile(r"at step (\d+) \(epoch (\d+)")
# Trainer accelerators that may run on CUDA: only their children are pinned to a GPU each.
CUDA_ACCELERATORS = ("gpu", "cuda", "auto")


@dataclass
class Job:
    name: str
    command: list[str]
    log: str
    env: dict[str, str] = field(default_factory=dict)  # added to this process's environment (W&B's run names)


def fit_job(name: str, fit_args: list[str], folder: str, env: dict[str, str] | None = None) -> Job:
    """A child `python -m askexpert fit` (`fit_args` start with `fit`) that trains into `folder`, its output in
    `folder`/fit.log; `env`: variables it gets on top of this process's (`wandb_stage_env`)."""
    return Job(name, [sys.executable, "-m", "askexpert", *fit_args], os.path.join(folder, "fit.log"), dict(env or {}))


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as values for a child's CUDA_VISIBLE_DEVICES: this process's own list
    when it has one (a child given "0" would otherwise see physical GPU 0, not the first visible one)."""
    import torch

    count = torch.cuda.device_count()
    visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return visible[:count] if visible else [str(i) for i in range(count)]


def gpus_for(trainer: dict, gpus: Callable[[], list[str]]) -> list[str]:
    """The GPUs children with this resolved `trainer` config are spread over: `gpus()`, or none when the trainer
    does not run on CUDA (CPU children share this machine's cores; the GPUs are then not even looked for)."""
    return gpus() if trainer.get("accelerator") in CUDA_ACCELERATORS else []


def device_slots(devices: list[str], per_device: int = 1) -> list[str | None]:
    """One slot per job that may run at once: `per_device` per GPU id, or `per_device` on this machine (None)."""
    per_device = max(1, per_device)
    return [d for d in devices for _ in range(per_device)] if devices else [None] * per_device


def launch_jobs(
    jobs: list[Job],
    slots: list[str | None],
    poll_seconds: float = 0.5,
    on_done: Callable[[Job, int], None] | None = None,
) -> dict[str, int]:
    """Run `jobs`, one per slot at a time (a slot is a GPU id, or None: this machine); returns each started
    job's exit status, and calls `on_done(job, status)` as each ends. After a failure no new job starts, and the
    running ones finish. If this process is interrupted (Ctrl-C, SIGTERM, an error), the running jobs are
    stopped too: none trains on unattended."""
    pending, running, codes = list(jobs), {}, {}
    with stop_on_signals():  # SIGTERM or SIGINT raise Interrupted here too when no command installed it
        try:
            while pending or running:
                for index, slot in enumerate(slots):
                    if index in running or not pending or any(code != 0 for code in codes.values()):
                        continue
                    job = pending.pop(0)
                    running[index] = (job, *_start(job, slot))
                for index, (job, process, log) in list(running.items()):
                    code = process.poll()
                    if code is None:
                        continue
                    log.close()
                    del running[index]
                    codes[job.name] = code
                    print(f"{job.name}: {'done' if code == 0 else f'failed (exit {code})'}", flush=True)
                    if on_done is not None:
                        on_done(job, code)
                if any(code != 0 for code in codes.values()):
                    pending.clear()
                time.sleep(poll_seconds if running else 0)
        finally:
            _stop([process for _, process, _ in running.values()])
            for _, _, log in running.values():
                log.close()
    return codes


def run_jobs(jobs: list[Job], devices: list[str], poll_seconds: float = 0.5, per_device: int = 1) -> None:
    """Run `jobs`, `per_device` at a time on each GPU (one after another without devices); raise UserError on a
    failure (a DivergenceError, whose exit status says so, when the first failed job diverged)."""
    codes = launch_jobs(jobs, device_slots(devices, per_device), poll_seconds)
    failed = [job for job in jobs if codes.get(job.name, 0) != 0]
    raise_if_interrupted(failed, codes)
    if failed:
        names = ", ".join(f"{job.name} (log: {job.log})" for job in failed)
        message = f"training failed for {names}: {last_line(failed[0].log)}"
        diverged = divergence_of(failed[0], codes[failed[0].name])
        if diverged is not None:
            raise DivergenceError(message, step=diverged.step, epoch=diverged.epoch, last_good=None)
        raise UserError(message)


def raise_if_interrupted(failed: list[Job], codes: dict[str, int]) -> None:
    """A child stopped by SIGTERM or SIGINT (a scheduler stopping the job, Ctrl+C) stops its launcher as that
    signal would: `Interrupted`, so the command exits 143 or 130 and says how to resume."""
    for job in failed:
        signum = signal_of_exit(codes[job.name])
        if signum is not None:
            raise Interrupted(signum)


def last_line(path: str) -> str:
    """What a failed fit said: its `askexpert: error: ...` message (without the prefix, even when a progress
    bar shares its line), else the log's last non-empty line."""
    with open(path, errors="replace") as f:
        text = f.read()
    if ERROR_PREFIX in text:
        return text.rsplit(ERROR_PREFIX, 1)[1].strip().splitlines()[0]
    lines = [line.rsplit("\r", 1)[-1].strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "(empty log)"


def divergence_of(job: Job, code: int) -> DivergenceError | None:
    """The divergence a child reported by its exit status, with the step and epoch from its log (-1 where the
    log does not say); None for any other exit."""
    if code != DivergenceError.exit_status:
        return None
    line = last_line(job.log)
    found = DIVERGED_AT.search(line)
    step, epoch = (int(found[1]), int(found[2])) if found else (-1, -1)
    return DivergenceError(line, step=step, epoch=epoch, last_good=None)


def _start(job: Job, slot: str | None) -> tuple[subprocess.Popen, object]:
    env = dict(os.environ)
    for name in ("WANDB_SWEEP_ID", "WANDB_RUN_ID"):  # an expert is not the sweep agent's run
        env.pop(name, None)
    env.update(job.env)
    if slot is not None:
        env["CUDA_VISIBLE_DEVICES"] = slot
    os.makedirs(os.path.dirname(job.log), exist_ok=True)
    # appended: a resumed expert keeps the log of its interrupted run (and a refused start does not erase it)
    log = open(job.log, "a")  # noqa: SIM115 - closed when the job ends
    where = f"GPU {slot}" if slot is not None else "this machine"
    print(f"{job.name}: training on {where} (log: {job.log})", flush=True)
    return subprocess.Popen(job.command, env=env, stdout=log, stderr=subprocess.STDOUT), log


def _stop(processes: list[subprocess.Popen], grace_seconds: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after `grace_seconds`, to every process still running."""
    alive = [p for p in processes if p.poll() is None]
    for process in alive:
        process.terminate()
    deadline = time.monotonic() + grace_seconds
    for process in alive:
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
