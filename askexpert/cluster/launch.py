"""How `pipeline` and `ablate` hand their stages to the submitit launcher, and what they do with the outcome.

Both plan as always (askexpert/pipeline/prepare.py); the stages not yet done go out as jobs (driver.py); once
they are all done, the command goes on exactly as with the local launcher: `execute` finds every stage done in
the store (it links and records them, trains nothing) and the evaluation writes the same report. A pipeline run's
stages live in a store of its own, `<out>/store`, its stage folders linking there as an ablation cell's do.
"""

from __future__ import annotations

import os

from askexpert.ablation.store import StageStore
from askexpert.cluster.graph import describe_graph, job_graph
from askexpert.errors import DivergenceError, UserError
from askexpert.pipeline.launcher_settings import LauncherSettings
from askexpert.pipeline.prepare import PreparedRun
from askexpert.runs.layout import RunLayout

PIPELINE_STORE = "store"  # a submitit pipeline run's own store, inside its --out


def pipeline_store(layout: RunLayout) -> StageStore:
    return StageStore(os.path.join(layout.root, PIPELINE_STORE))


def describe_jobs(runs: list[PreparedRun], store: StageStore) -> str:
    """`--dry_run` with the submitit launcher: the job graph, nothing submitted."""
    return describe_graph(job_graph(runs, store), store) + "\ndry run: no job was submitted"


def check_jobs(runs: list[PreparedRun], store: StageStore, launcher: LauncherSettings) -> None:
    """Everything the launcher can refuse, before anything is written: submitit and sbatch (not for a dry run),
    a fit on several devices, a damaged jobs.json."""
    from askexpert.cluster.driver import check_single_device, jobs_folder, load_jobs

    check_single_device(job_graph(runs, store))
    load_jobs(jobs_folder(launcher, store))


def prepare_runs(runs: list[PreparedRun], store: StageStore) -> None:
    """The run folders made ready for jobs, as the local runner makes them before its first stage: stale stages
    forgotten (--overwrite), the run's files written, a local run's finished stages moved into the store, and
    every stage still to train recorded as started in stages.json (a driver started again then finds the run
    as it left it, and does not forget the same stale stages twice while their jobs write through the links)."""
    from askexpert.pipeline.record import is_done, save_record, started_entry
    from askexpert.pipeline.runner import begin

    for prepared in runs:
        begin(prepared, store)
        adopt_local_stages(prepared, store)
        for stage in prepared.stages:
            if not is_done(prepared.record.get(stage.name, {}), stage.identity) and not store.is_done(stage):
                prepared.record[stage.name] = started_entry(stage.identity, stage.config, resumed=False)
        save_record(prepared.layout, prepared.record)


def train_on_cluster(runs: list[PreparedRun], store: StageStore, launcher: LauncherSettings, held: tuple[str, ...]):
    """Submit and follow the jobs of every stage of `runs` not yet done; returns the driver's `Outcome`.
    `held`: the folders this command holds (the jobs work inside them as its own, see StageJob)."""
    from askexpert.cluster.driver import Driver

    prepare_runs(runs, store)
    os.makedirs(store.root, exist_ok=True)
    return Driver(job_graph(runs, store), store, launcher, (*held, store.root)).run()


def check_can_submit(launcher: LauncherSettings) -> None:
    """Before anything is written: submitit installed, and sbatch here when the executor is SLURM."""
    import importlib.util
    import shutil

    if importlib.util.find_spec("submitit") is None:
        raise UserError("--launcher submitit needs the submitit package: pip install submitit==1.5.4")
    if launcher.cluster == "slurm" and shutil.which("sbatch") is None:
        raise UserError(
            "--launcher submitit: sbatch is not on PATH here; run on a SLURM login node, or use "
            "--launcher.cluster local to run the jobs on this machine"
        )


def adopt_local_stages(prepared: PreparedRun, store: StageStore) -> None:
    """A pipeline run started with the local launcher goes on with submitit: its finished stages (done in
    stages.json, a real folder or file in the run) move into the run's store and are linked back, as if a job had
    made them; nothing finished is trained again."""
    from askexpert.pipeline.record import is_done
    from askexpert.pipeline.runner import remove

    for stage in prepared.stages:
        local = prepared.layout.stage_dir(stage.name)
        if not is_done(prepared.record.get(stage.name, {}), stage.identity) or os.path.islink(local):
            continue
        if not os.path.exists(local) or store.is_done(stage):
            continue
        os.makedirs(store.root, exist_ok=True)
        remove(store.path(stage))  # an unfinished try of a job, replaced by the stage the run finished itself
        os.replace(local, store.path(stage))
        store.link(store.path(stage), local)
        store.mark_done(stage)


def record_outcome(prepared: PreparedRun, store: StageStore, outcome) -> None:
    """What became of a run's stage jobs, in its stages.json as the local launcher records it: a done stage linked
    and recorded; a diverged stage with where (`evaluate` and `route` then refuse the run, saying so); a failed one
    with its job's line; one that never started with the stage it waited for."""
    from askexpert.pipeline.record import is_done, save_record
    from askexpert.pipeline.runner import take_done_stage

    changed = False
    for stage in prepared.stages:
        key = store.key(stage)
        if key in outcome.done:  # linked and recorded as `execute` would
            done_here = is_done(prepared.record.get(stage.name, {}), stage.identity)
            take_done_stage(prepared, stage, store.path(stage), store, done_here)
            continue
        entry = {"identity": stage.identity, "done": False, "config": stage.config}
        if key in outcome.diverged:
            found = outcome.diverged[key]
            entry["diverged"] = {"step": found.get("step"), "epoch": found.get("epoch"), "last_good": None}
        elif key in outcome.failed:
            entry["failed"] = outcome.failed[key]
        elif key in outcome.blocked:
            entry["not_started"] = f"{outcome.blocked[key]} failed"
        else:
            continue
        prepared.record[stage.name] = entry
        changed = True
    if changed:
        save_record(prepared.layout, prepared.record)


def stage_keys(prepared: PreparedRun, store: StageStore) -> list[str]:
    return [store.key(stage) for stage in prepared.stages]


def raise_for_pipeline(outcome, prepared: PreparedRun, store: StageStore) -> None:
    """A pipeline whose stages are not all done stops here, with one line (exit 3 for a divergence)."""
    keys = stage_keys(prepared, store)
    diverged = outcome.divergence(keys)
    if diverged is not None:
        raise DivergenceError(
            f"stage {diverged.get('stage')} diverged, so nothing was evaluated: {diverged.get('message')}",
            step=int(diverged.get("step", -1)),
            epoch=int(diverged.get("epoch", -1)),
            last_good=None,
            stage=diverged.get("stage"),
        )
    problem = outcome.problem(keys)
    if problem is not None and all(k in outcome.running or k in outcome.done for k in keys):
        raise StillRunning(problem)
    if problem is not None:
        failed = sum(k in outcome.failed for k in keys)
        raise UserError(f"{failed} stage job(s) failed, nothing was evaluated; first: {problem}; rerun to retry")


class StillRunning(Exception):  # noqa: N818 - not an error: the command ends early on purpose
    """`--launcher.wait false`: the jobs were submitted; the command ends without evaluating."""
