"""`python -m askexpert pipeline`: the whole system in one process, from data to report.

    python -m askexpert pipeline --config configs/pipeline/demo.yaml --out runs/demo

Stages, each in its own folder under `--out` with its resolved config:
    generalist/  base/  partition.json  experts/<strategy>/<i>/  experts/static/<i>/  logits/
then the evaluation writes report.json, report.md and pareto.png.

Each training stage is a `fit` (the same LightningCLI as `python -m askexpert fit`), described by config
files plus overrides. Where a stage's `data` settings come from (`DATASET_KEYS` in askexpert/pipeline/settings.py):
- the dataset itself (source, root, image size, split fraction and seeds, stand-in sizes), `seed_everything`
  and `default_root_dir` always come from the pipeline: every stage must see the same splits, so a stage file
  that sets a dataset key to another value is refused;
- every other `data` key (batch sizes, workers, augmentation), from lowest to highest precedence: the
  DataModule's defaults, the stage's config files, a value the pipeline config or command line sets
  explicitly, the stage's `overrides`. A pipeline default never replaces a stage file's value.
Every stage's arguments are resolved (`--print_config`) before anything trains, so a typo in the last stage
fails at once; `--dry_run true` prints each stage's essentials (model, batch, lr, epochs, precision) and stops
(it builds models and data but no GPU trainer, so a GPU config can be checked on a laptop).
`stages.json` records each stage's resolved config and whether it finished:
- a finished stage whose config is unchanged is skipped;
- a stage that was interrupted resumes from its last checkpoint (SIGTERM or SIGINT: recorded as interrupted, and
  the pipeline exits 143 or 130, askexpert/interrupts.py);
- a stage that diverged (non-finite loss, see askexpert/callbacks/guard.py) stops the pipeline before any evaluation,
  exit status 3; it counts as not done, so a rerun with a changed config retrains it without `--overwrite`;
- a stage whose config changed is refused unless `--overwrite`, which retrains it and everything after it.
`--parallel_experts N` trains up to N experts at once per device, each as its own `fit` process (the same
training as one after another, see `askexpert experts --per_device`).
`--launcher submitit` trains every stage as a SLURM job instead (askexpert/cluster/, docs/cluster.md), in a store
of the run's own (`--out/store`), then goes on here exactly as the local launcher does.
Routing and profile settings only change the evaluation, which always runs (from cached logits).

How a run goes, top to bottom in `run` below; each step's code is a module of askexpert/pipeline/:
1. parse     the pipeline config and command line, and which data keys they set (`settings`);
2. check     settle what the settings mean (the profile's path, an explicit partition's size), then check
             everything that can be checked without training (`prepare`, `checks`);
3. plan      the stages in the order they run, each `fit` resolved, with its identity (`stages`):
               generalist  the edge model, on every class
               base        the all-class medium model every expert starts from
               partition   which classes each expert covers (reads the generalist for confusion or overlap)
               experts     one per class subset, trained with the run's strategy (`--specialization`)
               static experts   the same experts trained without specialising, the baseline (`--static_baseline`)
4. execute   each stage skipped, resumed or trained, recorded in stages.json (`runner`, `record`;
             experts side by side: `launcher`);
5. evaluate  every model once on val and test, then the report and its headline (`report`).
"""

from __future__ import annotations

from askexpert.cluster.launch import (
    PIPELINE_STORE,
    StillRunning,
    check_can_submit,
    check_jobs,
    describe_jobs,
    pipeline_store,
    raise_for_pipeline,
    record_outcome,
    train_on_cluster,
)
from askexpert.errors import UserError
from askexpert.pipeline.dry_run import describe_plan
from askexpert.pipeline.launcher_settings import launcher_settings
from askexpert.pipeline.prepare import prepare
from askexpert.pipeline.record import load_record
from askexpert.pipeline.report import evaluate_and_report
from askexpert.pipeline.runner import execute
from askexpert.pipeline.settings import parse_settings, recorded_profile
from askexpert.runs.lock import locked


def run(argv: list[str]) -> dict:
    # 1. parse
    settings, explicit_data = parse_settings(argv)
    launcher = launcher_settings(settings.launcher)
    on_cluster = launcher.name == "submitit"
    # 2. check and 3. plan: nothing is written, so a bad value in the last stage costs no training
    own = (PIPELINE_STORE,) if on_cluster else ()
    if on_cluster and not settings.dry_run:
        check_can_submit(launcher)
    prepared = prepare(
        settings, settings.overwrite, explicit_data=explicit_data, dry_run=settings.dry_run, own_files=own
    )
    if on_cluster:
        check_jobs([prepared], pipeline_store(prepared.layout), launcher)
    if settings.dry_run:
        print(describe_plan(prepared), flush=True)
        if on_cluster:
            print(describe_jobs([prepared], pipeline_store(prepared.layout)), flush=True)
        return {}
    # One writer per run (askexpert/runs/lock.py); its in-process stages and expert processes are covered.
    with locked(prepared.layout.root):
        # written by another pipeline since it was read (a damaged one that --overwrite repairs reads as before)
        if load_record(prepared.layout, overwrite=settings.overwrite) != prepared.record:
            raise UserError(f"--out {prepared.layout.root} changed while this pipeline was planned; run it again")
        # 4. execute: generalist, base, partition, experts, static experts (with submitit: as jobs, then
        #    `execute` finds them done in the run's store and only links and records them)
        store = None
        if on_cluster:
            store = pipeline_store(prepared.layout)
            outcome = train_on_cluster([prepared], store, launcher, (prepared.layout.root,))
            record_outcome(prepared, store, outcome)
            try:
                raise_for_pipeline(outcome, prepared, store)
            except StillRunning:
                return {}
        execute(prepared, store)
        # 5. evaluate, with the run's own copy of the profile, as `evaluate --run` will: the same report either way
        settings.profile = recorded_profile(prepared.layout.root, prepared.profile_copy[0])
        return evaluate_and_report(settings, prepared.layout, prepared.routing)
