"""`python -m askexpert pipeline`: the whole system in one process, from data to report.

    python -m askexpert pipeline --config configs/pipeline/demo.yaml --out runs/demo

Stages, each in its own folder under `--out` with its resolved config:
    generalist/  base/  partition.json  experts/<strategy>/<i>/  experts/static/<i>/  logits/
then the evaluation writes report.json, report.md and pareto.png.

Each training stage is a `fit` (the same LightningCLI as `python -m askexpert fit`), described by config
files plus overrides. Where a stage's `data` settings come from (`DATASET_KEYS` below):
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
- a stage that was interrupted resumes from its last checkpoint;
- a stage that diverged (non-finite loss, see askexpert/callbacks/guard.py) stops the pipeline before any evaluation,
  exit status 3; it counts as not done, so a rerun with a changed config retrains it without `--overwrite`;
- a stage whose config changed is refused unless `--overwrite`, which retrains it and everything after it.
`--parallel_experts N` trains up to N experts at once per device, each as its own `fit` process (the same
training as one after another, see `askexpert experts --per_device`).
Routing and profile settings only change the evaluation, which always runs (from cached logits).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import shutil
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import yaml

import strategies
from askexpert.collab.costs import load_profile
from askexpert.collab.evaluation import evaluate_run, expert_families
from askexpert.collab.report import headline_table, write_report
from askexpert.collab.system import NO_CALIBRATION_SPLIT, Budget, RoutingConfig
from askexpert.errors import DivergenceError, UserError, find_user_error
from askexpert.files.atomic import atomic_write_bytes, atomic_write_text
from askexpert.files.checkpoints import check_checkpoint_file, has_training_state
from askexpert.runs.folder import last_checkpoint
from askexpert.runs.layout import RunLayout
from askexpert.runs.lock import LOCK_FILE, check_not_in_use, locked
from datamodules.datamodule import ImageDataModule
from datamodules.partitions import METHODS, Partition

DEFAULT_PROFILE = "configs/profiles/pi4_wifi_orin.yaml"
# Keys of `data` that define the dataset: every stage must see the same ones, so only the pipeline sets them.
DATASET_KEYS = (
    "source",
    "root",
    "download",
    "verify_checksums",
    "image_size",
    "stored_size",
    "val_fraction",
    "calib_fraction",
    "seed",
    "synthetic_train_per_class",
    "synthetic_test_per_class",
    "synthetic_seed",
    "max_memory_gb",
)
# Data keys that came after runs and ablation stores existed, with their defaults. At its default such a key is
# left out of a stage's identity, so the stages of existing runs and stores keep theirs (nothing retrains when
# the code learns a new option); set to anything else, it changes what the stage sees and so its identity.
LATER_DATA_DEFAULTS: dict[str, Any] = {
    "calib_fraction": 0.0,
    "stored_size": None,
    "auto_augment": None,
    "auto_augment_ops": 2,
    "auto_augment_magnitude": 9,
}
# The same for the model's options. `mean`/`std` became "unset" (the pretrained weights' own, else CIFAR-100's):
# unset, they stand in the identity as the CIFAR-100 values they used to default to.
LATER_MODEL_DEFAULTS: dict[str, Any] = {"img_size": None, "head_lr": None, "layer_decay": None, "random_erase": 0.0}
FORMER_MODEL_DEFAULTS: dict[str, Any] = {
    "mean": [0.5071, 0.4865, 0.4409],
    "std": [0.2673, 0.2564, 0.2762],
}
# The run keeps a copy of its device profile (pipeline.yaml names it relative to the run), so a copied or moved
# run evaluates with the same profile without the file it was made from.
PROFILE_DIR = "profile"


@dataclass
class FitStage:
    """A training stage: `fit` config files (in order) and overrides on top.

    Args:
        config: fit config files, e.g. [configs/generalist_demo.yaml].
        overrides: fit options by dotted name, e.g. {trainer.max_epochs: 3, model.init_args.lr: 0.001}.
    """

    config: list[str] = field(default_factory=list)
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class PartitionStage:
    """How the experts' classes are chosen (as `python -m askexpert partition`).

    Args:
        method: superclass, confusion, random or explicit.
        num_experts: number of experts.
        overlap: extra most-confused outside classes per expert (reads the generalist).
        seed: seed of random and confusion partitions.
        experts: explicit class lists (names or ids) for method explicit.
        allow_uncovered: allow classes that no expert covers.
    """

    method: str = "superclass"
    num_experts: int = 4
    overlap: int = 0
    seed: int = 0
    experts: list[list[int | str]] | None = None
    allow_uncovered: bool = False


def parser():
    from askexpert.parsers import command_parser

    p = command_parser("pipeline", "Train generalist, base model and experts, then evaluate the collaborative system.")
    p.add_argument("--out", type=str, required=True, help="run folder (every artefact goes here)")
    p.add_argument("--overwrite", type=bool, default=False, help="retrain stages whose config changed")
    p.add_argument("--seed", type=int, default=0, help="seed_everything of every training stage")
    p.add_class_arguments(FitStage, "generalist", help="the edge generalist")
    p.add_class_arguments(FitStage, "base", help="the all-class medium base model")
    p.add_class_arguments(PartitionStage, "partition", help="the experts' class subsets")
    p.add_class_arguments(FitStage, "experts", help="every expert (ExpertModule config)")
    p.add_argument("--specialization", type=str, default=strategies.DEFAULT_STRATEGY, help="strategy of the experts")
    p.add_argument(
        "--specialization_args",
        type=dict[str, Any],
        default={},
        help="parameters of the experts' strategy, e.g. {floor: 0.1} (the static baseline keeps its own)",
    )
    p.add_argument("--static_baseline", type=bool, default=True, help="also train static experts (a baseline)")
    p.add_class_arguments(RoutingConfig, "routing", help="routing and operating point")
    p.add_argument("--profile", type=str, default=DEFAULT_PROFILE, help="device profile YAML (latency and energy)")
    p.add_argument("--wandb_project", type=str | None, default=None, help="also log every stage and the report to W&B")
    p.add_argument(
        "--parallel_experts", type=int, default=1, help="experts trained at once per device, as separate processes"
    )
    p.add_argument(
        "--dry_run", type=bool, default=False, help="print every stage's resolved essentials; train and write nothing"
    )
    return p


# -- stages ----------------------------------------------------------------------------------------------
@dataclass
class Stage:
    name: str  # also its folder under --out (partition: the JSON file)
    config: dict  # what identifies it (resolved fit config, or the partition settings)
    depends_on: list[str]
    fit_args: list[str] | None = None  # None: the partition stage
    identity: str = ""


def _cli_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def explicit_data_keys(argv: list[str]) -> set[str]:
    """The `data` keys that the pipeline's config files or command line set (as opposed to defaults)."""
    from jsonargparse import Namespace

    given = parser().parse_args(argv, defaults=False).get("data")
    return set(given.keys()) if isinstance(given, Namespace) else set()


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, str) and "${" in a:  # an interpolation: resolved by the fit's parser, which sees our value
        return True
    if isinstance(a, str) and isinstance(b, str):  # paths: data/x, ./data/x, ~/x and /abs/data/x are one folder
        return os.path.abspath(os.path.expanduser(a)) == os.path.abspath(os.path.expanduser(b))
    return a == b


def _read_yaml(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as handle:
            return yaml.safe_load(handle)
    except (OSError, yaml.YAMLError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"cannot read config file {path}: {reason}") from None


def stage_file_data(paths: list[str]) -> dict[str, tuple[Any, str]]:
    """The `data` values a stage's config files set, each with the (last) file that set it. A `data:` that
    names a file of its own (jsonargparse's nested config) is read too."""
    found: dict[str, tuple[Any, str]] = {}
    for path in paths:
        loaded = _read_yaml(path)
        section, source = loaded.get("data") if isinstance(loaded, dict) else None, path
        if isinstance(section, str):
            nested = section if os.path.isabs(section) else os.path.join(os.path.dirname(path), section)
            source = nested if os.path.isfile(nested) else section
            section = _read_yaml(source) if os.path.isfile(source) else None
        if isinstance(section, dict):
            found.update({key: (value, source) for key, value in section.items()})
    return found


def _fit_arguments(
    stage: FitStage, what: str, data: dict, explicit: set[str], seed: int, root: str, wandb_project: str | None
) -> list[str]:
    """The `fit` arguments of one stage: its files, the pipeline's data (see the module docstring for which
    keys), its overrides, then what the pipeline sets for every stage."""
    for key in stage.overrides:
        if key.startswith("data.") and key[5:] in DATASET_KEYS:
            raise UserError(f"{what}.overrides sets {key}; the dataset is the pipeline's: set it in its data section")
        if key in ("trainer.default_root_dir", "seed_everything", "ckpt_path"):
            raise UserError(f"{what}.overrides sets {key}, which the pipeline sets for every stage")
    args = ["fit"]
    for path in stage.config:
        if not os.path.isfile(path):
            raise UserError(f"{what}.config: file not found: {path}")
        args += ["--config", path]
    for key, (value, path) in stage_file_data(stage.config).items():
        if key in DATASET_KEYS and not _same(value, data.get(key)):
            raise UserError(
                f"{what}.config {path} sets data.{key} to {value!r} but the pipeline's is {data.get(key)!r}: every "
                "stage must see the same dataset, so set it only in the pipeline's data section"
            )
    passed = {key: value for key, value in data.items() if key in DATASET_KEYS or key in explicit}
    args += [f"--data.{key}={_cli_value(value)}" for key, value in passed.items()]
    args += [f"--{key}={_cli_value(value)}" for key, value in stage.overrides.items()]
    if wandb_project:
        loggers = [
            {"class_path": "lightning.pytorch.loggers.WandbLogger", "init_args": {"project": wandb_project}},
            {"class_path": "askexpert.loggers.RunCSVLogger"},
        ]
        args.append(f"--trainer.logger={json.dumps(loggers)}")
    return args + [f"--seed_everything={seed}", "--trainer.default_root_dir", root]


@contextlib.contextmanager
def quiet():
    """No stdout, Lightning info lines or warnings while a stage is only checked (not run)."""
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def resolve_fit(args: list[str], what: str, cpu_trainer: bool = False) -> dict:
    """The fit's resolved config (as `--print_config` shows it); raises UserError, naming the stage, for bad
    arguments or values. `cpu_trainer`: check model and data but build the trainer on the CPU (dry runs)."""
    from askexpert.cli import cli_main

    buffer = io.StringIO()
    try:
        with quiet(), contextlib.redirect_stdout(buffer):
            try:
                cli_main([*args, "--print_config"])
            except SystemExit as exit_:
                if exit_.code not in (0, None):
                    raise UserError("its arguments are not valid") from None
        config = yaml.safe_load(buffer.getvalue()) or {}
        config.pop("ckpt_path", None)  # a resumed stage is the same stage
        with quiet():
            _instantiate(args, cpu_trainer)
    except Exception as err:
        found = find_user_error(err)
        if found is None:
            raise
        # the parser that failed may be a nested one named after the script: point at `fit --help` instead
        text = re.sub(
            r"\(see `python -m askexpert [^`]*--help`\)", "(see `python -m askexpert fit --help`)", str(found)
        )
        raise UserError(f"stage {what}: {text}") from None
    return config


# A dry run checks a GPU config on any machine: same model and data, a plain one-device CPU trainer.
CPU_TRAINER = ["--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.num_nodes=1", "--trainer.strategy=auto"]


def _instantiate(args: list[str], cpu_trainer: bool = False) -> None:
    """Build the stage's model, data and trainer without running them, so a bad value (a negative lr, an
    unknown model) fails now rather than after the stages before it trained. Experts get a stand-in subset:
    their partition does not exist yet."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from askexpert.cli import AskExpertCLI, check_image_size, map_specialization_names

    args = args[1:]  # without subcommands (run=False) LightningCLI takes the options of `fit` directly
    if "--partition" in args:
        i = args.index("--partition")
        args[i : i + 2] = ["--model.init_args.subset=[0]"]
    if cpu_trainer:
        args = [*args, *CPU_TRAINER]
    try:
        cli = AskExpertCLI(args=map_specialization_names(args), run=False)
    except MisconfigurationException as err:  # e.g. a GPU trainer on a machine without one
        reason = str(err).strip().splitlines()[0]
        raise UserError(f"{reason} (`--dry_run true` checks a config without building its trainer)") from None
    check_image_size(cli.model, cli.datamodule)
    h = cli.model.hparams
    if h.get("pretrained_path") and h.get("init", "pretrained") == "pretrained":
        # a weights file that does not fit fails now, not after the stages before it trained
        from askexpert.models.pretrained import load_file_weights

        load_file_weights(cli.model.net, h.model_name, h.pretrained_path, cli.model.num_outputs)


def _resolve_cached(args: list[str], what: str, root: str, cache: dict | None, cpu_trainer: bool = False) -> dict:
    """`resolve_fit`, remembered by the arguments with the run folder's path left out: the cells of an
    ablation differ from each other in their folder, and resolving costs a second or two each."""
    if cache is None:
        return resolve_fit(args, what, cpu_trainer)
    placeholder = json.dumps(root)[1:-1]
    key = json.dumps([args, cpu_trainer]).replace(placeholder, "$OUT")
    if key not in cache:
        cache[key] = json.dumps(resolve_fit(args, what, cpu_trainer)).replace(placeholder, "$OUT")
    return json.loads(cache[key].replace("$OUT", placeholder))


def plan_stages(
    settings, layout: RunLayout, cache: dict | None = None, explicit: set[str] = frozenset(), cpu_trainer: bool = False
) -> list[Stage]:
    """Every stage of a run with its resolved config and identity (`cache`: see `_resolve_cached`; `explicit`:
    the data keys the pipeline set, see `explicit_data_keys`; `cpu_trainer`: see `resolve_fit`)."""
    data = settings.data.as_dict()
    seed, wandb_project = settings.seed, settings.wandb_project
    stages = []
    for name in ("generalist", "base"):
        args = _fit_arguments(settings[name], name, data, explicit, seed, layout.stage_dir(name), wandb_project)
        stages.append(Stage(name, _resolve_cached(args, name, layout.root, cache, cpu_trainer), [], args))
    part = settings.partition
    reads_generalist = part.method == "confusion" or part.overlap > 0
    dataset = {key: data[key] for key in DATASET_KEYS}
    stages.append(
        Stage("partition", {"partition": part.as_dict(), "data": dataset}, ["generalist"] if reads_generalist else [])
    )
    base_ckpt = layout.best(layout.stage_dir("base"))
    strategy_args = settings.get("specialization_args") or {}
    if not isinstance(strategy_args, dict):
        raise UserError(f"specialization_args must map the strategy's parameters to values, got {strategy_args!r}")
    for family in expert_families(settings.specialization, settings.static_baseline):
        strategy = strategies.class_path(family)  # unknown names fail here, listing the known ones
        for i in range(part.num_experts):
            root = layout.expert_dir(family, i)
            args = _fit_arguments(settings.experts, "experts", data, explicit, seed, root, wandb_project)
            args += ["--partition", layout.partition, "--expert_index", str(i), "--specialization", strategy]
            if family == settings.specialization:  # the strategy's own parameters; the baseline keeps its defaults
                args += [f"--specialization.{key}={_cli_value(value)}" for key, value in strategy_args.items()]
            args += ["--model.init_args.base_path", base_ckpt]
            # experts of one family differ only in index and folder: resolve the first, derive the others
            if i == 0:
                config = _resolve_cached(args, f"experts/{family}/0", layout.root, cache, cpu_trainer)
            else:
                config = {"same_as": f"experts/{family}/0", "expert_index": i}
            depends = ["base", "partition"] if i == 0 else [f"experts/{family}/0"]
            stages.append(Stage(f"experts/{family}/{i}", config, depends, args))
    identities: dict[str, str] = {}
    for stage in stages:
        upstream = [identities[name] for name in stage.depends_on]
        text = json.dumps({"config": _identity_config(stage.config), "upstream": upstream}, sort_keys=True, default=str)
        # the run folder's own path is not part of a stage's identity: a moved or copied run still resumes
        for root in sorted({os.path.abspath(layout.root), layout.root}, key=len, reverse=True):
            text = text.replace(json.dumps(root)[1:-1], "$OUT")
        stage.identity = identities[stage.name] = hashlib.sha256(text.encode()).hexdigest()[:16]
    return stages


def _identity_config(config: dict) -> dict:
    """A stage's config as its identity sees it: without the data and model keys of `LATER_DATA_DEFAULTS` and
    `LATER_MODEL_DEFAULTS` at their default, and unset `FORMER_MODEL_DEFAULTS` as their former values."""
    config = dict(config)
    data = config.get("data")
    if isinstance(data, dict):
        config["data"] = {k: v for k, v in data.items() if k not in LATER_DATA_DEFAULTS or v != LATER_DATA_DEFAULTS[k]}
    model = config.get("model")
    args = model.get("init_args") if isinstance(model, dict) else None
    if isinstance(args, dict):
        args = {k: v for k, v in args.items() if k not in LATER_MODEL_DEFAULTS or v != LATER_MODEL_DEFAULTS[k]}
        # only where unset still means CIFAR-100's statistics: starting from pretrained weights it means theirs
        pretrained = args.get("pretrained") or args.get("pretrained_path") or args.get("init") == "pretrained"
        if not pretrained:
            args.update({k: v for k, v in FORMER_MODEL_DEFAULTS.items() if k in args and args[k] is None})
        config["model"] = {**model, "init_args": args}
    return config


# -- the record of what is done ----------------------------------------------------------------------------
def _stages_file(layout: RunLayout) -> str:
    return os.path.join(layout.root, "stages.json")


def load_record(layout: RunLayout) -> dict:
    path = _stages_file(layout)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError):
        record = None
    # a mapping of stage name -> a mapping per stage; anything else was not written by askexpert
    if not isinstance(record, dict) or not all(isinstance(entry, dict) for entry in record.values()):
        raise UserError(f"{path} is damaged; use --overwrite to start this run again")
    return record


def check_finished(layout: RunLayout) -> None:
    """Refuse a run whose stages did not all finish (one diverged, or it was interrupted): its models would make
    a report that looks like a result."""
    for name, entry in load_record(layout).items():
        if entry.get("diverged"):
            found = entry["diverged"]
            raise UserError(
                f"stage {name} of {layout.root} diverged (step {found.get('step')}, epoch {found.get('epoch')}), so "
                "the run has no result; rerun the pipeline with a changed config for that stage"
            )
        if not entry.get("done"):
            raise UserError(f"stage {name} of {layout.root} has not finished; rerun the pipeline to finish it")


def save_record(layout: RunLayout, record: dict) -> None:
    atomic_write_text(_stages_file(layout), json.dumps(record, indent=2, sort_keys=True) + "\n")


def check_out_folder(
    layout: RunLayout, stages: list[Stage], record: dict, overwrite: bool, own_files: tuple[str, ...] = ()
) -> list[str]:
    """Names of stages whose recorded config differs; refuses them (and foreign folders: files other than
    `own_files`, the caller's records) unless overwrite. A stage that diverged is not done: a new config for it
    is what the user is expected to try."""
    if os.path.exists(layout.root) and not os.path.isdir(layout.root):
        raise UserError(f"--out {layout.root} is a file, not a folder")
    if not record and os.path.isdir(layout.root) and set(os.listdir(layout.root)) - {*own_files, LOCK_FILE}:
        # even with --overwrite: only a pipeline's own stages are ever deleted
        raise UserError(f"--out {layout.root} already holds files that are not a pipeline run; choose another folder")
    planned = {s.name: s for s in stages}
    changed = [
        name
        for name, entry in record.items()
        if name in planned and entry.get("identity") != planned[name].identity and not entry.get("diverged")
    ]
    gone = [name for name in record if name not in planned]
    if (changed or gone) and not overwrite:
        names = ", ".join((changed + gone)[:6]) + (
            f" and {len(changed + gone) - 6} more" if len(changed + gone) > 6 else ""
        )
        raise UserError(
            f"--out {layout.root} holds a run with a different config (stages: {names}); "
            "use another --out, or --overwrite to retrain what changed"
        )
    return changed + gone


def _stage_path(layout: RunLayout, name: str) -> str:
    return layout.partition if name == "partition" else os.path.join(layout.root, *name.split("/"))


def _remove(path: str) -> None:
    if os.path.islink(path):  # a stage shared through an ablation's store: drop the link, keep the stage
        os.unlink(path)
    elif os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.remove(path)


def run_partition(settings, layout: RunLayout, path: str | None = None) -> None:
    from askexpert.commands.partition import partition_from_settings, validation_confusion

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


def run_fit(stage: Stage, layout: RunLayout, resume: bool) -> None:
    from askexpert.cli import cli_main

    args = list(stage.fit_args)
    if resume:
        args += ["--ckpt_path", "last"]
    with warnings.catch_warnings():  # in-process on purpose: LightningCLI's advice to use sys.argv does not apply
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        cli_main(args)
    if not os.path.isfile(layout.best(_stage_path(layout, stage.name))):
        raise UserError(f"stage {stage.name} finished without a best checkpoint (was validation disabled?)")


def _can_resume(folder: str, header: str) -> bool:
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
        if stage.fit_args is None:
            Partition.load(path, allow_uncovered=True)  # whether it loads; the coverage rule was applied when built
        else:
            check_checkpoint_file(path)
    except UserError as err:
        return str(err)
    _INTACT.add(key)
    return None


def section_of(settings, name: str):
    """A settings section, which must be a mapping (a config file may have set it to a plain value)."""
    from jsonargparse import Namespace

    value = settings.get(name)
    if not isinstance(value, Namespace):
        raise UserError(f"{name!r} must be a mapping of options, got {value!r}")
    return value


def find_config_file(path: str, what: str) -> str:
    """`path` as given, or relative to the askexpert checkout (so runs work from any folder); absolute."""
    if not os.path.isabs(path) and not os.path.isfile(path):
        checkout = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        if os.path.isfile(os.path.join(checkout, path)):
            return os.path.join(checkout, path)
    if not os.path.isfile(path):
        raise UserError(f"{what} not found: {path}")
    return os.path.abspath(path)


def find_profile(path: str, run_dir: str) -> str:
    """The device profile a pipeline is given: as `find_config_file`, else relative to the run folder (a pipeline
    started again from its run's pipeline.yaml names the run's own copy)."""
    try:
        return find_config_file(path, "device profile")
    except UserError:
        inside = os.path.join(run_dir, path)
        if os.path.isabs(path) or not os.path.isfile(inside):
            raise
        return os.path.abspath(inside)


def recorded_profile(run_dir: str, path: str) -> str:
    """The device profile a run's pipeline.yaml names: the run's own copy, relative to the run folder (a run made
    before the copy names the original file, absolute)."""
    found = os.path.join(run_dir, path)  # an absolute path stays itself
    if not os.path.isfile(found):
        raise UserError(f"the device profile of {run_dir} is missing: {found}; give one with --profile FILE")
    return os.path.abspath(found)


def check_partition_settings(settings, datamodule: ImageDataModule) -> None:
    """The partition is built after the generalist trains (confusion, overlap); its settings are checked now,
    by building it from the class names wherever no trained model is needed."""
    part = settings.partition
    if part.method not in METHODS:
        raise UserError(f"unknown partition method {part.method!r}; methods: {', '.join(METHODS)}")
    if part.num_experts < 1:
        raise UserError(f"--partition.num_experts must be at least 1, got {part.num_experts}")
    if part.overlap < 0:
        raise UserError(f"--partition.overlap must not be negative, got {part.overlap}")
    if part.method == "explicit":
        if not part.experts:
            raise UserError("--partition.method explicit needs the class lists: --partition.experts [[...], [...]]")
        settings.partition.num_experts = len(part.experts)
    if (part.method == "confusion" or part.overlap) and datamodule.hparams.val_fraction == 0:
        raise UserError("confusion partitions and overlap read validation data: set --data.val_fraction above 0")
    if part.method == "confusion":
        if part.num_experts > datamodule.num_classes:
            raise UserError(
                f"--partition.num_experts {part.num_experts} is more than the {datamodule.num_classes} classes"
            )
        return
    from askexpert.commands.partition import partition_from_settings

    partition_from_settings(part, datamodule, confusion=None)  # overlap needs the trained generalist: not here


def check_budget_is_reachable(routing: RoutingConfig, profile, generalist_config: dict, datamodule) -> None:
    """The cheapest operating point answers everything on the edge: a budget below it can never be met."""
    from askexpert.collab.costs import CostModel, model_cost

    limits = {"budget": routing.budget_dict(), "constrained": routing.constrained_dict()}
    if not any({"latency_ms", "energy_mj"} & set(budget) for budget in limits.values()):
        return
    model_name = generalist_config["model"]["init_args"]["model_name"]
    size = datamodule.hparams.image_size
    edge = CostModel(profile, (3, size, size)).on_edge(model_cost(profile, model_name, datamodule.num_classes, size))
    for name, budget in limits.items():
        for key, cheapest in (("latency_ms", edge.latency_ms), ("energy_mj", edge.edge_energy_mj)):
            if key in budget and budget[key] < cheapest:
                raise UserError(
                    f"--routing.{name}.{key} {budget[key]} cannot be met: answering on the edge alone already costs "
                    f"{cheapest:.3g} with this profile"
                )


def routing_config(namespace) -> RoutingConfig:
    from jsonargparse import Namespace

    if not isinstance(namespace, Namespace):
        raise UserError(f"'routing' must be a mapping of options, got {namespace!r}")
    values = namespace.as_dict()
    limits = {}
    for key in ("budget", "constrained"):
        found = values.get(key) or {}
        if not isinstance(found, dict):
            raise UserError(f"'routing.{key}' must be a mapping (offload_ratio, latency_ms, energy_mj), got {found!r}")
        limits[key] = Budget(**found)
    return RoutingConfig(**{**values, **limits})


@dataclass
class PreparedRun:
    """A pipeline run checked and planned, with nothing written yet."""

    settings: Any
    layout: RunLayout
    routing: RoutingConfig
    stages: list[Stage]
    record: dict
    stale: list[str]
    settings_yaml: str
    profile_copy: tuple[str, bytes] | None = None  # (path in the run, content) of the run's own device profile


def prepare(
    settings,
    overwrite: bool,
    cache: dict | None = None,
    explicit_data: set[str] = frozenset(),
    dry_run: bool = False,
    own_files: tuple[str, ...] = (),
) -> PreparedRun:
    """Check everything that can be checked without training and plan the stages; writes nothing.
    `explicit_data`: the data keys the pipeline config or command line set (`explicit_data_keys`); `dry_run`:
    build no GPU trainer and accept a changed config (the plan says what would retrain); `own_files`: files of
    the caller that may sit in the run folder (an ablation's cell record)."""
    for section in ("data", "generalist", "base", "partition", "experts"):
        section_of(settings, section)
    if settings.get("parallel_experts", 1) < 1:
        raise UserError(f"--parallel_experts must be at least 1, got {settings.parallel_experts}")
    layout = RunLayout(settings.out)
    # the cheap checks first, then every stage's arguments
    if os.path.exists(layout.root) and not os.path.isdir(layout.root):
        raise UserError(f"--out {layout.root} is a file, not a folder")
    record = load_record(layout)
    settings.profile = find_profile(settings.profile, layout.root)
    profile = load_profile(settings.profile)
    routing = routing_config(settings.routing)
    datamodule = ImageDataModule(**settings.data.as_dict())
    routing.check(datamodule.num_classes)
    calibrated = datamodule.hparams.val_fraction > 0 or datamodule.hparams.calib_fraction > 0
    if routing.needs_calibration() and not calibrated:
        raise UserError(NO_CALIBRATION_SPLIT)
    check_partition_settings(settings, datamodule)
    for family in expert_families(settings.specialization, settings.static_baseline):
        strategies.class_path(family)  # unknown names fail here, listing the known ones
    stages = plan_stages(settings, layout, cache, set(explicit_data), cpu_trainer=dry_run)
    check_budget_is_reachable(routing, profile, stages[0].config, datamodule)
    stale = check_out_folder(layout, stages, record, overwrite or dry_run, own_files)
    # pipeline.yaml names the run's own copy of the profile, relative to the run: the run can move
    copy = os.path.join(PROFILE_DIR, os.path.basename(settings.profile))
    try:
        with open(settings.profile, "rb") as handle:
            content = handle.read()
    except OSError as err:
        raise UserError(f"cannot read device profile {settings.profile}: {err.strerror}") from None
    saved = settings.clone()
    saved.profile = copy
    settings_yaml = parser().dump(saved, skip_none=False)
    return PreparedRun(settings, layout, routing, stages, record, stale, settings_yaml, (copy, content))


# -- running the stages -------------------------------------------------------------------------------------
def _start_stage(run_: PreparedRun, stage: Stage, header: str, store) -> bool | None:
    """Get a stage's folder ready and record it as started; returns whether it resumes, or None when it is
    already done (and is skipped)."""
    layout, record = run_.layout, run_.record
    entry = record.get(stage.name, {})
    local = _stage_path(layout, stage.name)
    folder = local if store is None else store.path(stage)
    done_here = entry.get("identity") == stage.identity and entry.get("done")
    artefact = folder if stage.fit_args is None else layout.best(folder)
    done = (store.is_done(stage) if store is not None else done_here) and os.path.exists(artefact)
    broken = _broken_artefact(stage, artefact) if done else None
    if broken is not None:
        print(f"{header}: {broken}; {'building' if stage.fit_args is None else 'training'} it again", flush=True)
    elif done:
        if store is not None:
            store.link(folder, local)
            if not done_here:
                record[stage.name] = {"identity": stage.identity, "done": True, "config": stage.config}
                save_record(layout, record)
        print(f"{header}: done, config unchanged, skipped", flush=True)
        return None
    if store is None and os.path.islink(local):  # a stage shared from an ablation's store: train our own
        os.unlink(local)
    same = store is not None or entry.get("identity") == stage.identity
    resume = broken is None and stage.fit_args is not None and same and _can_resume(folder, header)
    if store is not None:
        store.mark_not_done(stage)  # not done while it trains, whatever happens to this process
    if not resume:
        check_not_in_use(folder)  # e.g. an expert process of a killed pipeline, still training there
        _remove(folder)
    if store is not None:
        _remove(local)
        if stage.fit_args is not None:
            os.makedirs(folder, exist_ok=True)
            store.link(folder, local)
    print(f"{header}: {'resuming from its last checkpoint' if resume else 'running'} ({folder})", flush=True)
    # `started`: wall-clock start of the process run that trains it; a resumed stage's `seconds` count from its
    # resume only (the time before an interruption is not known), so it says it resumed
    record[stage.name] = {"identity": stage.identity, "done": False, "config": stage.config, "started": time.time()}
    if resume:
        record[stage.name]["resumed"] = True
    save_record(layout, record)
    return resume


def _finish_stage(run_: PreparedRun, stage: Stage, store) -> None:
    if store is not None:
        store.mark_done(stage)
    entry = run_.record[stage.name]
    entry["done"] = True
    if "started" in entry:  # the minutes a stage costs, for the docs' "minutes per seed" (stages.json)
        entry["seconds"] = round(time.time() - entry["started"], 1)
    save_record(run_.layout, run_.record)


def _diverged(run_: PreparedRun, stage: Stage, err: DivergenceError) -> DivergenceError:
    """Record a diverged stage (not done; a new config may replace it) and the error that stops the pipeline."""
    run_.record[stage.name]["diverged"] = {"step": err.step, "epoch": err.epoch, "last_good": err.last_good}
    save_record(run_.layout, run_.record)
    message = f"stage {stage.name} diverged, so nothing was evaluated: {err}"
    return DivergenceError(message, step=err.step, epoch=err.epoch, last_good=err.last_good, stage=stage.name)


def execute(run_: PreparedRun, store=None) -> None:
    """Run (or skip, or resume) every stage of a prepared run. With a `store` (an ablation's
    `askexpert.ablation.store.StageStore`), each stage lives in the store under its identity and the run
    folder links to it, so runs that share a stage train it once. A diverged stage raises `DivergenceError`
    (with its `stage`) after it is recorded; nothing after it runs."""
    layout, record, stages = run_.layout, run_.record, run_.stages
    if run_.stale:  # --overwrite: forget what changed and everything that depends on it
        planned = {s.name for s in stages}
        dropped = set(run_.stale)
        for stage in stages:
            if any(d in dropped for d in stage.depends_on):
                dropped.add(stage.name)
        for name in dropped:
            _remove(_stage_path(layout, name))
            record.pop(name, None)
            if name not in planned:
                print(f"{name}: removed (not part of this config)", flush=True)
    os.makedirs(layout.root, exist_ok=True)
    if run_.profile_copy:  # before pipeline.yaml, which names it
        atomic_write_bytes(os.path.join(layout.root, run_.profile_copy[0]), run_.profile_copy[1])
    atomic_write_text(layout.settings, run_.settings_yaml)
    if store is not None:
        os.makedirs(store.logits, exist_ok=True)
        store.link(store.logits, layout.logits)
    parallel = int(run_.settings.get("parallel_experts") or 1)
    deferred: list[tuple[Stage, bool]] = []  # experts to train side by side once everything before them is done
    for number, stage in enumerate(stages, 1):
        resume = _start_stage(run_, stage, f"[{number}/{len(stages)}] {stage.name}", store)
        if resume is None:
            continue
        if stage.fit_args is None:
            folder = _stage_path(layout, stage.name) if store is None else store.path(stage)
            run_partition(run_.settings, layout, folder)
            if store is not None:
                store.link(folder, _stage_path(layout, stage.name))
        elif parallel > 1 and stage.name.startswith("experts/"):
            deferred.append((stage, resume))
            continue
        else:
            try:
                run_fit(stage, layout, resume)
            except DivergenceError as err:
                raise _diverged(run_, stage, err) from None
        _finish_stage(run_, stage, store)
    if deferred:
        _run_side_by_side(run_, deferred, parallel, store)


def _run_side_by_side(run_: PreparedRun, stages: list[tuple[Stage, bool]], parallel: int, store) -> None:
    """Train expert stages `parallel` at a time on each device, each as its own `fit` process (logs in
    `<stage>/fit.log`): exactly the training each would get alone, while a large GPU runs several at once."""
    import sys

    from askexpert.commands.experts import Job, device_slots, last_line, launch_jobs, visible_gpus

    by_name = {stage.name: stage for stage, _ in stages}
    for stage, _ in stages:  # their `seconds` count from this batch's start: queueing and overlap included
        run_.record[stage.name]["side_by_side"] = parallel
    save_record(run_.layout, run_.record)
    jobs = []
    for stage, resume in stages:
        command = [sys.executable, "-m", "askexpert", *stage.fit_args, *(["--ckpt_path", "last"] if resume else [])]
        jobs.append(Job(stage.name, command, os.path.join(_stage_path(run_.layout, stage.name), "fit.log")))
    resolved = {stage.name: stage.config for stage in run_.stages}
    first = stages[0][0].config
    trainer = resolved.get(first.get("same_as"), first).get("trainer", {})  # experts i > 0 point at expert 0
    devices = visible_gpus() if trainer.get("accelerator") in ("gpu", "cuda", "auto") else []
    diverged: list[DivergenceError] = []
    no_checkpoint: list[Job] = []

    def done(job: Job, code: int) -> None:
        stage = by_name[job.name]
        if code == 0:
            if not os.path.isfile(run_.layout.best(_stage_path(run_.layout, stage.name))):
                no_checkpoint.append(job)
                return
            _finish_stage(run_, stage, store)
        elif code == DivergenceError.exit_status:
            line = last_line(job.log)
            found = re.search(r"at step (\d+) \(epoch (\d+)", line)
            step, epoch = (int(found[1]), int(found[2])) if found else (-1, -1)
            diverged.append(_diverged(run_, stage, DivergenceError(line, step=step, epoch=epoch, last_good=None)))

    codes = launch_jobs(jobs, device_slots(devices, parallel), on_done=done)
    if diverged:
        raise diverged[0]
    if no_checkpoint:
        job = no_checkpoint[0]
        raise UserError(f"stage {job.name} finished without a best checkpoint (log: {job.log})")
    failed = [job for job in jobs if codes.get(job.name, 0) != 0]
    if failed:
        raise UserError(f"stage {failed[0].name} failed: {last_line(failed[0].log)} (log: {failed[0].log})")


def describe_plan(run_: PreparedRun) -> str:
    """The dry run's table: every stage's essentials as resolved, and what a real run would do with it."""
    first = {}
    rows = [("stage", "model", "batch", "lr", "warm-up", "epochs", "precision", "device", "clip", "status")]
    for stage in run_.stages:
        entry = run_.record.get(stage.name, {})
        if entry.get("identity") == stage.identity and entry.get("done"):
            status = "done (skipped)"
        elif entry.get("diverged"):
            status = "diverged before: retrains" if entry.get("identity") != stage.identity else "diverged before"
        elif entry and entry.get("identity") != stage.identity:
            status = "changed: retrains" if run_.settings.overwrite else "changed: needs --overwrite"
        else:
            status = "resumes" if entry else "to train"
        if stage.fit_args is None:
            part = run_.settings.partition
            rows.append((stage.name, f"{part.method}, {part.num_experts} experts", *["-"] * 7, status))
            continue
        config = stage.config if "same_as" not in stage.config else first[stage.config["same_as"]]
        first[stage.name] = config
        rows.append((stage.name, *_essentials(config), status))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(value).ljust(width) for value, width in zip(row, widths, strict=True)) for row in rows]
    data = run_.settings.data
    sizes = ""
    if data.source == "synthetic":
        sizes = f" ({data.synthetic_train_per_class} train / {data.synthetic_test_per_class} test per class)"
    head = f"pipeline {run_.layout.root}: data {data.source}{sizes}, val_fraction {data.val_fraction}, "
    head += f"seed {run_.settings.seed}"
    return "\n".join([head, *lines, "dry run: nothing was trained or written"])


def _essentials(config: dict) -> tuple[str, ...]:
    model, trainer, data = config.get("model", {}), config.get("trainer", {}), config.get("data", {})
    init = model.get("init_args", {})
    name = f"{model.get('class_path', '?').rsplit('.', 1)[-1]} {init.get('model_name', '?')}"
    epochs = str(trainer.get("max_epochs"))
    if trainer.get("max_steps") not in (None, -1):
        epochs += f" (max {trainer['max_steps']} steps)"
    limit = trainer.get("limit_train_batches")
    if limit not in (None, 1.0):
        epochs += f" x {limit:g} batches" if isinstance(limit, (int, float)) else f" x {limit} batches"
    device = f"{trainer.get('accelerator')}:{trainer.get('devices')}"
    clip = trainer.get("gradient_clip_val")
    return (
        name,
        str(data.get("batch_size")),
        f"{init.get('lr', '?'):g}" if isinstance(init.get("lr"), float) else str(init.get("lr")),
        str(init.get("warmup_epochs")),
        epochs,
        str(trainer.get("precision") or "32-true"),
        device,
        "none" if clip in (None, 0) else f"{clip:g}",
    )


def run(argv: list[str]) -> dict:
    settings = parser().parse_args(argv)
    prepared = prepare(settings, settings.overwrite, explicit_data=explicit_data_keys(argv), dry_run=settings.dry_run)
    if settings.dry_run:
        print(describe_plan(prepared), flush=True)
        return {}
    # One writer per run (askexpert/runs/lock.py); its in-process stages and expert processes are covered.
    with locked(prepared.layout.root):
        if load_record(prepared.layout) != prepared.record:  # written by another pipeline since it was read
            raise UserError(f"--out {prepared.layout.root} changed while this pipeline was planned; run it again")
        execute(prepared)
        # evaluated with the run's own copy of the profile, as `evaluate --run` will: the same report either way
        settings.profile = recorded_profile(prepared.layout.root, prepared.profile_copy[0])
        return evaluate_and_report(settings, prepared.layout, prepared.routing)


def evaluate_and_report(settings, layout: RunLayout, routing: RoutingConfig, out_dir: str | None = None) -> dict:
    """Evaluate a finished run and write its report files; prints the headline table."""
    print(f"evaluation: running every model once on val and test (cached in {layout.logits})", flush=True)
    report = evaluate_run(
        layout,
        settings.data.as_dict(),
        settings.specialization,
        settings.static_baseline,
        routing,
        settings.profile,
        settings.seed,
        num_experts=len(settings.partition.experts) if settings.partition.experts else settings.partition.num_experts,
    )
    paths = write_report(report, out_dir or layout.root)
    if settings.get("wandb_project"):
        from askexpert.collab.report import log_to_wandb

        log_to_wandb(report, paths, out_dir or layout.root, settings.wandb_project)
    print_headline(report, paths)
    return report


def print_headline(report: dict, paths: dict[str, str]) -> None:
    from askexpert.collab.report import findings_lines  # the sanity findings come before any number

    print("\n" + "\n".join(findings_lines(report)))
    data = report["data"]
    label = "STAND-IN synthetic data, not CIFAR-100" if data["stand_in"] else f"{data['source']} data"
    sel = report["selected"]
    print(f"\nCollaborative inference on {data['test_size']} test images ({label}):\n")
    print(headline_table(report))
    print(
        f"\nthreshold {sel['threshold']:.2f} chosen on {sel['chosen_on']}; report: {paths['report.md']}, "
        f"{paths['report.json']}, {paths['pareto.png']}"
    )
