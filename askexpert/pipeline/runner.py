"""Running a prepared run's stages in order. Each stage is skipped (done with this config, its artefact intact),
resumed from its last checkpoint, or trained from the start (the partition: built), and stages.json says which
after every step. A diverged stage is recorded and stops the run before anything is evaluated. With
`--parallel_experts N`, the experts train N at a time per device as child processes (askexpert/pipeline/launcher.py)
once every stage before them is done.

With an ablation's store (askexpert/ablation/store.py), each stage lives in the store under its identity and the run
folder links to it, so runs that share a stage train it once.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from askexpert.errors import DivergenceError, UserError
from askexpert.files.atomic import atomic_write_bytes, atomic_write_text
from askexpert.files.checkpoints import check_checkpoint_file, has_training_state
from askexpert.interrupts import interruption
from askexpert.lightning_cli.cli import run_lightning_command
from askexpert.pipeline.launcher import (
    Job,
    device_slots,
    divergence_of,
    fit_job,
    gpus_for,
    last_line,
    launch_jobs,
    raise_if_interrupted,
    visible_gpus,
)
from askexpert.pipeline.partitioning import partition_from_settings, validation_confusion
from askexpert.pipeline.prepare import PreparedRun
from askexpert.pipeline.record import (
    is_done,
    mark_diverged,
    mark_done,
    mark_interrupted,
    save_record,
    started_entry,
)
from askexpert.pipeline.stages import Stage, StageKind
from askexpert.pipeline.wandb_runs import stage_environment, wandb_stage_env
from askexpert.runs.folder import last_checkpoint
from askexpert.runs.layout import RunLayout
from askexpert.runs.lock import check_not_in_use
from datamodules.datamodule import ImageDataModule
from datamodules.partitions import Partition


class StageStart(Enum):
    """How a stage starts; the value is how the pipeline says so."""

    SKIPPED = "done, config unchanged, skipped"
    FROM_THE_START = "running"
    RESUMED = "resuming from its last checkpoint"


def execute(prepared: PreparedRun, store=None) -> None:
    """Run (or skip, or resume) every stage of a prepared run. `store`: an ablation's
    `askexpert.ablation.store.StageStore`, see the module docstring. A diverged stage raises `DivergenceError`
    (with its `stage`) after it is recorded; nothing after it runs."""
    begin(prepared, store)
    parallel = int(prepared.settings.get("parallel_experts") or 1)
    side_by_side: list[tuple[Stage, bool]] = []  # experts to train once everything before them is done
    stages = prepared.stages
    for number, stage in enumerate(stages, 1):
        # the whole of a stage's turn, its start and finish too: a signal while its folder is made ready or its
        # record written still marks it (and the experts queued so far) interrupted
        with _recorded_if_interrupted(prepared, [stage, *(queued for queued, _ in side_by_side)]):
            start = _start_stage(prepared, stage, f"[{number}/{len(stages)}] {stage.name}", store)
            if start is StageStart.SKIPPED:
                continue
            if parallel > 1 and stage.trains and stage.kind is StageKind.EXPERT:
                side_by_side.append((stage, start is StageStart.RESUMED))
                continue
            if not stage.trains:
                _build_partition(prepared, stage, store)
            else:
                try:
                    run_fit(stage, prepared.layout, start is StageStart.RESUMED, prepared.settings)
                except DivergenceError as err:
                    raise _diverged(prepared, stage, err) from None
            _finish_stage(prepared, stage, store)
    if side_by_side:
        with _recorded_if_interrupted(prepared, [stage for stage, _ in side_by_side]):
            _run_side_by_side(prepared, side_by_side, parallel, store)


def begin(prepared: PreparedRun, store=None) -> None:
    """Before any stage: forget stale stages (--overwrite) and write the run's own files. Run again by `execute`
    after the submitit launcher's jobs (it changes nothing then)."""
    _forget_stale(prepared)
    _write_run_files(prepared, store)


def _forget_stale(prepared: PreparedRun) -> None:
    """--overwrite: forget the stages whose config changed and everything that depends on them."""
    if not prepared.stale:
        return
    planned = {s.name for s in prepared.stages}
    dropped = set(prepared.stale)
    for stage in prepared.stages:
        if any(d in dropped for d in stage.depends_on):
            dropped.add(stage.name)
    for name in dropped:
        remove(prepared.layout.stage_dir(name))
        prepared.record.pop(name, None)
        if name not in planned:
            print(f"{name}: removed (not part of this config)", flush=True)


def _write_run_files(prepared: PreparedRun, store) -> None:
    layout = prepared.layout
    os.makedirs(layout.root, exist_ok=True)
    if prepared.profile_copy:  # before pipeline.yaml, which names it
        atomic_write_bytes(os.path.join(layout.root, prepared.profile_copy[0]), prepared.profile_copy[1])
    atomic_write_text(layout.settings, prepared.settings_yaml)
    if store is not None:
        os.makedirs(store.logits, exist_ok=True)
        store.link(store.logits, layout.logits)


# -- one stage's start and end ---------------------------------------------------------------------------------
def _start_stage(prepared: PreparedRun, stage: Stage, header: str, store) -> StageStart:
    """Get a stage's folder ready and record it as started, or find it done (and skip it)."""
    layout, record = prepared.layout, prepared.record
    entry = record.get(stage.name, {})
    local = layout.stage_dir(stage.name)
    folder = local if store is None else store.path(stage)
    done_here = is_done(entry, stage.identity)
    artefact = layout.best(folder) if stage.trains else folder
    done = (store.is_done(stage) if store is not None else done_here) and os.path.exists(artefact)
    broken = _broken_artefact(stage, artefact) if done else None
    if broken is not None:
        print(f"{header}: {broken}; {'training' if stage.trains else 'building'} it again", flush=True)
    elif done:
        take_done_stage(prepared, stage, folder, store, done_here)
        print(f"{header}: {StageStart.SKIPPED.value}", flush=True)
        return StageStart.SKIPPED
    if store is None and os.path.islink(local):  # a stage shared from an ablation's store: train our own
        os.unlink(local)
    same = store is not None or entry.get("identity") == stage.identity
    resume = broken is None and stage.trains and same and can_resume(folder, header)
    _ready_folder(stage, folder, local, store, resume)
    start = StageStart.RESUMED if resume else StageStart.FROM_THE_START
    print(f"{header}: {start.value} ({folder})", flush=True)
    record[stage.name] = started_entry(stage.identity, stage.config, resume)
    save_record(layout, record)
    return start


def take_done_stage(prepared: PreparedRun, stage: Stage, folder: str, store, done_here: bool) -> None:
    """A stage done in the store: the run links to it, and records it as done."""
    if store is None:
        return
    store.link(folder, prepared.layout.stage_dir(stage.name))
    if not done_here:
        # trained by a job of the submitit launcher through this run: its seconds (and whether it resumed)
        trained = store.job_record(stage, prepared.layout.root)
        prepared.record[stage.name] = {"identity": stage.identity, "done": True, "config": stage.config, **trained}
        save_record(prepared.layout, prepared.record)


def _ready_folder(stage: Stage, folder: str, local: str, store, resume: bool) -> None:
    """Empty the stage's folder unless it resumes; with a store, the run folder links to the store's."""
    if store is not None:
        store.mark_not_done(stage)  # not done while it trains, whatever happens to this process
    if not resume:
        check_not_in_use(folder)  # e.g. an expert process of a killed pipeline, still training there
        remove(folder)
    if store is not None:
        remove(local)
        if stage.trains:
            os.makedirs(folder, exist_ok=True)
            store.link(folder, local)


def _finish_stage(prepared: PreparedRun, stage: Stage, store) -> None:
    if store is not None:
        store.mark_done(stage)
    mark_done(prepared.record[stage.name])
    save_record(prepared.layout, prepared.record)


def _diverged(prepared: PreparedRun, stage: Stage, err: DivergenceError) -> DivergenceError:
    """Record a diverged stage (not done; a new config may replace it) and the error that stops the pipeline."""
    mark_diverged(prepared.record[stage.name], err)
    save_record(prepared.layout, prepared.record)
    message = f"stage {stage.name} diverged, so nothing was evaluated: {err}"
    return DivergenceError(message, step=err.step, epoch=err.epoch, last_good=err.last_good, stage=stage.name)


@contextlib.contextmanager
def _recorded_if_interrupted(prepared: PreparedRun, stages: list[Stage]) -> Iterator[None]:
    """SIGTERM or SIGINT while `stages` run (askexpert/interrupts.py): each one not finished is recorded as
    interrupted in stages.json before the interruption goes on; the pipeline run again resumes it."""
    try:
        yield
    except BaseException as err:
        signum = interruption(err)
        if signum is not None:
            for stage in stages:
                entry = prepared.record.get(stage.name, {})
                if not entry.get("done") and not entry.get("diverged"):
                    mark_interrupted(entry, signum)
            save_record(prepared.layout, prepared.record)
        raise


def can_resume(folder: str, header: str) -> bool:
    """Whether a stage's folder holds a last.ckpt to resume from; a truncated or corrupt one (a crash or a full disk
    before writes were atomic) restarts the stage, with a line saying so."""
    found = last_checkpoint(folder)
    if not found:
        return False
    try:
        check_checkpoint_file(found)
    except UserError as err:
        print(f"{header}: {err}; training the stage again from the start", flush=True)
        return False
    return has_training_state(found)


_INTACT: set[tuple[str, int, int]] = set()  # (path, size, mtime) of artefacts this process found intact


def _broken_artefact(stage: Stage, path: str) -> str | None:
    """Why a finished stage's artefact (best.ckpt, or the partition file) cannot be used; None when it loads.
    A stage is only done when what the next stages and the evaluation read is intact."""
    status = os.stat(path)
    key = (os.path.realpath(path), status.st_size, status.st_mtime_ns)
    if key in _INTACT:  # an ablation's cells share stages: each file is read once per process
        return None
    try:
        if stage.trains:
            check_checkpoint_file(path)
        else:
            Partition.load(path, allow_uncovered=True)  # whether it loads; the coverage rule was applied when built
    except UserError as err:
        return str(err)
    _INTACT.add(key)
    return None


def remove(path: str) -> None:
    if os.path.islink(path):  # a stage shared through an ablation's store: drop the link, keep the stage
        os.unlink(path)
    elif os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.remove(path)


# -- what each kind of stage runs -------------------------------------------------------------------------------
def _build_partition(prepared: PreparedRun, stage: Stage, store) -> None:
    local = prepared.layout.stage_dir(stage.name)
    folder = local if store is None else store.path(stage)
    run_partition(prepared.settings, prepared.layout, folder)
    if store is not None:
        store.link(folder, local)


def run_partition(settings, layout: RunLayout, path: str | None = None) -> None:
    part = settings.partition
    datamodule = ImageDataModule(**settings.data.as_dict())
    confusion = None
    if part.method == "confusion" or part.overlap:
        confusion = validation_confusion(layout.best(layout.stage_dir("generalist")), datamodule)
    partition = partition_from_settings(part, datamodule, confusion)
    path = path or layout.partition
    partition.save(path)
    sizes = ", ".join(str(len(c)) for c in partition.experts)
    print(f"partition: {part.method}, {partition.num_experts} experts ({sizes} classes) -> {path}", flush=True)


def run_fit(stage: Stage, layout: RunLayout, resume: bool, settings=None) -> None:
    """Train a stage in this process; with the run's pipeline `settings`, as a W&B run of the run's group
    (askexpert/pipeline/wandb_runs.py; the environment is restored afterwards)."""
    env = wandb_stage_env(stage, settings, layout) if settings is not None else {}
    with warnings.catch_warnings(), stage_environment(env):
        # in-process on purpose: LightningCLI's advice to use sys.argv does not apply
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        run_lightning_command(stage.fit_command(resume))
    if not os.path.isfile(layout.best(layout.stage_dir(stage.name))):
        raise UserError(f"stage {stage.name} finished without a best checkpoint (was validation disabled?)")


# -- experts side by side ------------------------------------------------------------------------------------------
@dataclass
class _SideBySide:
    """What became of each expert trained side by side, as its process ended."""

    prepared: PreparedRun
    stages: dict[str, Stage]
    store: Any
    diverged: list[DivergenceError] = field(default_factory=list)
    no_checkpoint: list[Job] = field(default_factory=list)

    def job_done(self, job: Job, code: int) -> None:
        stage, layout = self.stages[job.name], self.prepared.layout
        divergence = divergence_of(job, code)
        if code == 0 and not os.path.isfile(layout.best(layout.stage_dir(stage.name))):
            self.no_checkpoint.append(job)
        elif code == 0:
            _finish_stage(self.prepared, stage, self.store)
        elif divergence is not None:
            self.diverged.append(_diverged(self.prepared, stage, divergence))


def _run_side_by_side(prepared: PreparedRun, stages: list[tuple[Stage, bool]], parallel: int, store) -> None:
    """Train expert stages (each with whether it resumes) `parallel` at a time on each device, each as its own
    `fit` process (logs in `<stage>/fit.log`)."""
    layout = prepared.layout
    for stage, _ in stages:  # their `seconds` count from this batch's start: queueing and overlap included
        prepared.record[stage.name]["side_by_side"] = parallel
    save_record(layout, prepared.record)
    jobs = [
        fit_job(
            stage.name,
            stage.fit_command(resume),
            layout.stage_dir(stage.name),
            wandb_stage_env(stage, prepared.settings, layout),
        )
        for stage, resume in stages
    ]
    results = _SideBySide(prepared, {stage.name: stage for stage, _ in stages}, store)
    gpus = gpus_for(_trainer_config(prepared, stages[0][0]), visible_gpus)
    codes = launch_jobs(jobs, device_slots(gpus, parallel), on_done=results.job_done)
    if results.diverged:
        raise results.diverged[0]
    if results.no_checkpoint:
        job = results.no_checkpoint[0]
        raise UserError(f"stage {job.name} finished without a best checkpoint (log: {job.log})")
    failed = [job for job in jobs if codes.get(job.name, 0) != 0]
    raise_if_interrupted(failed, codes)
    if failed:
        raise UserError(f"stage {failed[0].name} failed: {last_line(failed[0].log)} (log: {failed[0].log})")


def _trainer_config(prepared: PreparedRun, stage: Stage) -> dict:
    """An expert's resolved trainer settings (experts i > 0 point at expert 0's config)."""
    resolved = {s.name: s.config for s in prepared.stages}
    return resolved.get(stage.config.get("same_as"), stage.config).get("trainer", {})
