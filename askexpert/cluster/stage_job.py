"""What one job of the submitit launcher runs: one stage of the store, trained (or built) exactly as the local
launcher trains it, and marked done or diverged in the store.

A job may run more than once for one stage: SLURM requeues it after a preemption or its time limit (submitit calls
`checkpoint`, and the job starts again from the same pickled `StageJob`), a driver started again may find it
failed and submit it anew. Every start therefore looks at the store first: a finished stage is left as it is, an
interrupted fit resumes from its last.ckpt (`can_resume`, as the local runner does), anything else starts from
the beginning. The stage's claim (`<store>/claims/<key>`, held with `locked`: flock on one host and a lease
across hosts, askexpert/runs/lease.py) makes sure two jobs never train one stage at once, even from two drivers.

The job writes only the stage's own files and markers, and the links of its run folder to the stages it reads
(made atomically: jobs side by side may link the same upstream stage); never a run's stages.json, which the
driver writes.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from typing import Any

from askexpert.ablation.store import StageStore
from askexpert.errors import DivergenceError
from askexpert.pipeline.stages import Stage
from askexpert.pipeline.wandb_runs import stage_environment, wandb_stage_env
from askexpert.runs.layout import RunLayout

CLAIMS = "claims"
PART_OF_ENV = "ASKEXPERT_PART_OF"  # read by askexpert/runs/lock.py: the holds of a job are its driver's


@dataclass
class StageJob:
    """One stage to train in a job. Picklable: submitit writes it to the job folder and the job reads it back
    (the driver writes these files itself; it never reads a job's pickled result, only the store's markers)."""

    key: str  # the stage's name in the store
    stage: Stage
    upstream: list[Stage]  # every stage it reads (linked into the run folder before it starts)
    run_root: str  # the run whose fit arguments it uses
    settings: Any  # that run's pipeline settings (the partition is built from them)
    store_root: str
    threads: int | None = None  # torch threads (the job's CPUs); None: torch's default
    driver_folders: tuple[str, ...] = ()  # what the driver holds (its --out, the store): see `_part_of_driver`

    def __call__(self) -> str:
        store = StageStore(self.store_root)
        _part_of_driver(self.driver_folders)
        if self.threads:
            import torch

            torch.set_num_threads(self.threads)
        env = wandb_stage_env(self.stage, self.settings, RunLayout(self.run_root)) if self.settings is not None else {}
        # the stage's W&B run is one of its pipeline run's group (askexpert/pipeline/wandb_runs.py)
        with _claimed(os.path.join(store.root, CLAIMS, self.key)), stage_environment(env):
            if store.is_done(self.stage):  # a duplicate or a requeued job whose stage finished meanwhile
                return "done before"
            self._link_run_folder(store)
            started = time.time()
            try:
                resumed = self._train(store)
            except DivergenceError as err:
                where = {"stage": self.stage.name, "step": err.step, "epoch": err.epoch, "message": str(err)}
                store.mark_diverged(self.stage, where | {"last_good": err.last_good})
                raise
            store.mark_done(self.stage, {"run": self.run_root, "started": started, "resumed": resumed})
        return "done"

    def checkpoint(self, *args, **kwargs):
        """Preempted or out of time: submitit requeues the same job, which resumes from the stage's last.ckpt."""
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self, *args, **kwargs)

    def _link_run_folder(self, store: StageStore) -> None:
        """The run folder's stage folders point into the store, as the local runner links them: the fit
        arguments name the run's paths (its folder, partition.json, base/best.ckpt)."""
        layout = RunLayout(self.run_root)
        for stage in [*self.upstream, self.stage]:
            target = store.path(stage)
            if stage.trains:
                os.makedirs(target, exist_ok=True)
            store.link(target, layout.stage_dir(stage.name))

    def _train(self, store: StageStore) -> bool:
        """Train (or build) the stage; whether it resumed from a last.ckpt."""
        from askexpert.pipeline.runner import can_resume, remove, run_fit, run_partition
        from askexpert.runs.lock import check_not_in_use

        layout, folder = RunLayout(self.run_root), store.path(self.stage)
        store.clear_divergence(self.stage)
        if not self.stage.trains:
            run_partition(self.settings, layout, folder)
            return False
        header = f"{self.stage.name} ({self.key})"
        resume = can_resume(folder, header)
        if not resume:
            check_not_in_use(folder)  # e.g. a local launcher training this very stage of the store
            remove(folder)
            os.makedirs(folder, exist_ok=True)
        print(f"{header}: {'resuming from its last checkpoint' if resume else 'running'} ({folder})", flush=True)
        run_fit(self.stage, layout, resume)
        return resume


@contextlib.contextmanager
def _claimed(claim: str, wait_s: float = 15.0):
    """Hold the stage's claim; while another job holds it (a duplicate submitted by a driver that was stopped
    between sbatch and writing jobs.json), wait for it, so this job ends as "done before" instead of failing and
    cancelling the stage's dependants."""
    from askexpert.errors import UserError
    from askexpert.runs.lock import locked

    said = False
    while True:
        stack = contextlib.ExitStack()
        try:
            stack.enter_context(locked(claim))
        except UserError as err:
            if "in use by" not in str(err):
                raise
            if not said:
                print(f"{claim}: {err}; waiting for it", flush=True)
                said = True
            time.sleep(wait_s)
            continue
        with stack:
            yield
        return


def _part_of_driver(folders: tuple[str, ...]) -> None:
    """The job is part of the driver's command, as a child process of it would be: the folders the driver holds
    (its --out and the store, askexpert/runs/lock.py) do not refuse the job's own locks inside them. The stage's
    claim and the fit's lock on its own folder still keep out every other writer of that stage."""
    import json

    from askexpert.runs.lock import LOCKED_ENV

    try:
        held = json.loads(os.environ.get(LOCKED_ENV) or "[]")
    except json.JSONDecodeError:
        held = []
    held = held if isinstance(held, list) else []
    os.environ[LOCKED_ENV] = json.dumps([*held, *([os.path.realpath(f), os.getpid()] for f in folders)])
    # and the holds the job takes say so (askexpert/runs/lock.py): a driver started again may take the folders
    os.environ[PART_OF_ENV] = json.dumps([os.path.realpath(f) for f in folders])
