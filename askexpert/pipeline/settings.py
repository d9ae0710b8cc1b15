"""What a pipeline run is given: the `pipeline` command's options (also the schema of a pipeline config and of
a run's pipeline.yaml), how they are parsed, and `normalise_settings`, the one step that settles what the user
wrote (a profile's path, an explicit partition's size) before any check reads it.

The constants below are part of every stage's identity or of pipeline.yaml: changing one retrains finished runs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import strategies
from askexpert.collab.second_expert import SecondExpert
from askexpert.collab.system import Budget, RoutingConfig
from askexpert.errors import UserError
from askexpert.pipeline.launcher_settings import add_launcher_arguments, launcher_shorthand

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
LATER_MODEL_DEFAULTS: dict[str, Any] = {
    "img_size": None,
    "head_lr": None,
    "layer_decay": None,
    "random_erase": 0.0,
    "ema_decay": None,
    "ema_warmup": False,
}
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
        "--wandb_entity", type=str | None, default=None, help="W&B entity (user or team) of those runs (default: yours)"
    )
    p.add_argument(
        "--parallel_experts", type=int, default=1, help="experts trained at once per device, as separate processes"
    )
    p.add_argument(
        "--dry_run", type=bool, default=False, help="print every stage's resolved essentials; train and write nothing"
    )
    add_launcher_arguments(p)
    return p


def explicit_data_keys(argv: list[str]) -> set[str]:
    """The `data` keys that the pipeline's config files or command line set (as opposed to defaults)."""
    from jsonargparse import Namespace

    given = parser().parse_args(argv, defaults=False).get("data")
    return set(given.keys()) if isinstance(given, Namespace) else set()


def parse_settings(argv: list[str]):
    """(the settings, the data keys they set explicitly) of a pipeline command line. jsonargparse tells which
    keys were given only when parsing without defaults, hence the second parse (see `explicit_data_keys`)."""
    argv = launcher_shorthand(argv)
    return parser().parse_args(argv), explicit_data_keys(argv)


def section_of(settings, name: str):
    """A settings section, which must be a mapping (a config file may have set it to a plain value)."""
    from jsonargparse import Namespace

    value = settings.get(name)
    if not isinstance(value, Namespace):
        raise UserError(f"{name!r} must be a mapping of options, got {value!r}")
    return value


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
    second = values.get("second_expert") or {}
    if not isinstance(second, dict):
        raise UserError(f"'routing.second_expert' must be a mapping (enabled, margin, fusion), got {second!r}")
    return RoutingConfig(**{**values, **limits, "second_expert": SecondExpert(**second)})


def expert_count(partition) -> int:
    """How many experts a partition section makes: an explicit partition's class lists say, else `num_experts`."""
    return len(partition.experts) if partition.experts else partition.num_experts


def normalise_settings(settings, run_dir: str) -> None:
    """Settle what the user wrote into what the run uses, before any check reads it: the device profile's path
    (`find_profile`; it is copied into the run and pipeline.yaml names the copy), and an explicit partition's
    `num_experts` (its class lists decide it; stage identities and pipeline.yaml hold the settled value)."""
    settings.profile = find_profile(settings.profile, run_dir)
    part = settings.partition
    if part.method == "explicit" and part.experts:
        part.num_experts = len(part.experts)


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
