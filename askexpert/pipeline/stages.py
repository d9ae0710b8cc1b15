"""The stages of a pipeline run, planned before anything trains: generalist, base, partition, then the experts of
the run's strategy and the static experts of the baseline. Each has a kind, the stages it depends on, its
resolved config and its identity.

A stage's identity is the SHA-256 of its resolved config (as `_identity_config` sees it, the run folder's path
replaced by `$OUT`) and its upstream stages' identities. It decides what a rerun skips, what `--overwrite`
retrains and which stages an ablation's cells share, so nothing may be added to what is hashed: every finished
run and store would retrain.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import strategies
from askexpert.errors import UserError
from askexpert.pipeline.resolve import resolve_fit_cached
from askexpert.pipeline.settings import DATASET_KEYS, FORMER_MODEL_DEFAULTS, LATER_DATA_DEFAULTS, LATER_MODEL_DEFAULTS
from askexpert.pipeline.stage_arguments import expert_arguments, fit_arguments
from askexpert.runs.layout import RunLayout, expert_families


class StageKind(Enum):
    """What a stage makes; the value is the first part of its name (its folder under the run)."""

    GENERALIST = "generalist"
    BASE = "base"
    PARTITION = "partition"  # a JSON file, built in this process; every other kind is a `fit`
    EXPERT = "experts"


@dataclass
class Stage:
    name: str  # also its folder under --out (partition: the JSON file)
    kind: StageKind
    config: dict  # what identifies it (resolved fit config, or the partition settings)
    depends_on: list[str]
    fit_args: list[str] = field(default_factory=list)  # its `fit` command line (none for the partition)
    identity: str = ""

    @property
    def trains(self) -> bool:
        """Whether it is a `fit` (with a checkpoint to resume from and a best.ckpt when done)."""
        return self.kind is not StageKind.PARTITION

    def fit_command(self, resume: bool) -> list[str]:
        """Its `fit` arguments, resuming from the last checkpoint when `resume`."""
        return [*self.fit_args, *(["--ckpt_path", "last"] if resume else [])]


@dataclass
class _Planner:
    """What planning every stage of one run needs (see `plan_stages` for the arguments)."""

    settings: Any
    layout: RunLayout
    cache: dict | None
    explicit: set[str]
    cpu_trainer: bool

    def arguments(self, section: str, root: str) -> list[str]:
        s = self.settings
        data = s.data.as_dict()
        return fit_arguments(s[section], section, data, self.explicit, s.seed, root, s.wandb_project)

    def resolve(self, args: list[str], what: str) -> dict:
        return resolve_fit_cached(args, what, self.layout.root, self.cache, self.cpu_trainer)

    def fit_stage(self, kind: StageKind) -> Stage:
        """The generalist or the base model."""
        name = kind.value
        args = self.arguments(name, self.layout.stage_dir(name))
        return Stage(name, kind, self.resolve(args, name), [], args)

    def partition_stage(self) -> Stage:
        part = self.settings.partition
        reads_generalist = part.method == "confusion" or part.overlap > 0
        dataset = {key: self.settings.data.as_dict()[key] for key in DATASET_KEYS}
        config = {"partition": part.as_dict(), "data": dataset}
        return Stage("partition", StageKind.PARTITION, config, ["generalist"] if reads_generalist else [])

    def expert_stages(self, family: str, strategy_args: dict) -> list[Stage]:
        """The experts of one strategy (`family`), with that strategy's parameters."""
        strategy = strategies.class_path(family)  # unknown names fail here, listing the known ones
        base_checkpoint = self.layout.best(self.layout.stage_dir("base"))
        first = f"experts/{family}/0"
        stages = []
        for i in range(self.settings.partition.num_experts):
            args = self.arguments("experts", self.layout.expert_dir(family, i))
            args += expert_arguments(self.layout.partition, i, strategy, strategy_args, base_checkpoint)
            # experts of one family differ only in index and folder: resolve the first, derive the others
            if i == 0:
                config, depends = self.resolve(args, first), ["base", "partition"]
            else:
                config, depends = {"same_as": first, "expert_index": i}, [first]
            stages.append(Stage(f"experts/{family}/{i}", StageKind.EXPERT, config, depends, args))
        return stages


def plan_stages(
    settings, layout: RunLayout, cache: dict | None = None, explicit: set[str] = frozenset(), cpu_trainer: bool = False
) -> list[Stage]:
    """Every stage of a run, in the order they run, with its resolved config and identity. `cache`: see
    `resolve_fit_cached`; `explicit`: the data keys the pipeline set (`explicit_data_keys`); `cpu_trainer`: see
    `resolve_fit`."""
    planner = _Planner(settings, layout, cache, set(explicit), cpu_trainer)
    stages = [
        planner.fit_stage(StageKind.GENERALIST),
        planner.fit_stage(StageKind.BASE),
        planner.partition_stage(),
    ]
    strategy_args = settings.get("specialization_args") or {}
    if not isinstance(strategy_args, dict):
        raise UserError(f"specialization_args must map the strategy's parameters to values, got {strategy_args!r}")
    # the experts of the run's strategy, then the static experts of the baseline (which keep their defaults)
    for family in expert_families(settings.specialization, settings.static_baseline):
        stages += planner.expert_stages(family, strategy_args if family == settings.specialization else {})
    _set_identities(stages, layout.root)
    return stages


def _set_identities(stages: list[Stage], root: str) -> None:
    identities: dict[str, str] = {}
    for stage in stages:
        upstream = [identities[name] for name in stage.depends_on]
        text = json.dumps({"config": _identity_config(stage.config), "upstream": upstream}, sort_keys=True, default=str)
        # the run folder's own path is not part of a stage's identity: a moved or copied run still resumes
        for folder in sorted({os.path.abspath(root), root}, key=len, reverse=True):
            text = text.replace(json.dumps(folder)[1:-1], "$OUT")
        stage.identity = identities[stage.name] = hashlib.sha256(text.encode()).hexdigest()[:16]


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
