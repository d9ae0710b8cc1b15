"""The `fit` command line of each training stage, the same one a user would type: its config files, the
pipeline's data settings, its overrides, then what the pipeline sets for every stage (seed, run folder).

Where a stage's `data` settings come from (the rule the `pipeline` command's docstring states for users):
the dataset keys (`DATASET_KEYS`) only from the pipeline, and a stage file that sets one to another value is
refused; every other key from lowest to highest precedence: the DataModule's defaults, the stage's files, a value
the pipeline config or command line sets explicitly, the stage's overrides.
"""

from __future__ import annotations

import json
import os
from typing import Any

import yaml

from askexpert.errors import UserError
from askexpert.pipeline.settings import DATASET_KEYS, FitStage

# Set by the pipeline for every stage: a stage's overrides may not set them.
PIPELINE_OWNED = ("trainer.default_root_dir", "seed_everything", "ckpt_path")


def cli_value(value: Any) -> str:
    """A value as one command-line word: strings as they are, everything else as JSON."""
    return value if isinstance(value, str) else json.dumps(value)


def same_value(a: Any, b: Any) -> bool:
    """Whether a stage file's dataset value is the pipeline's."""
    if isinstance(a, str) and "${" in a:  # an interpolation: resolved by the fit's parser, which sees our value
        return True
    if isinstance(a, str) and isinstance(b, str):  # paths: data/x, ./data/x, ~/x and /abs/data/x are one folder
        return os.path.abspath(os.path.expanduser(a)) == os.path.abspath(os.path.expanduser(b))
    return a == b


def read_yaml(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as handle:
            return yaml.safe_load(handle)
    except UnicodeDecodeError:
        raise UserError(f"cannot read config file {path}: not UTF-8 text (a YAML file is)") from None
    except (OSError, yaml.YAMLError, RecursionError) as err:  # RecursionError: YAML nested too deeply
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"cannot read config file {path}: {reason}") from None


def stage_file_data(paths: list[str]) -> dict[str, tuple[Any, str]]:
    """The `data` values a stage's config files set, each with the (last) file that set it. A `data:` that
    names a file of its own (jsonargparse's nested config) is read too."""
    found: dict[str, tuple[Any, str]] = {}
    for path in paths:
        loaded = read_yaml(path)
        section, source = loaded.get("data") if isinstance(loaded, dict) else None, path
        if isinstance(section, str):
            nested = section if os.path.isabs(section) else os.path.join(os.path.dirname(path), section)
            source = nested if os.path.isfile(nested) else section
            section = read_yaml(source) if os.path.isfile(source) else None
        if isinstance(section, dict):
            found.update({key: (value, source) for key, value in section.items()})
    return found


def _check_overrides(stage: FitStage, what: str) -> None:
    for key in stage.overrides:
        if key.startswith("data.") and key[5:] in DATASET_KEYS:
            raise UserError(f"{what}.overrides sets {key}; the dataset is the pipeline's: set it in its data section")
        if key in PIPELINE_OWNED:
            raise UserError(f"{what}.overrides sets {key}, which the pipeline sets for every stage")


def _check_stage_files(stage: FitStage, what: str, data: dict) -> None:
    """Every file exists, and none sets a dataset key to another value than the pipeline's."""
    for path in stage.config:
        if not os.path.isfile(path):
            raise UserError(f"{what}.config: file not found: {path}")
    for key, (value, path) in stage_file_data(stage.config).items():
        if key in DATASET_KEYS and not same_value(value, data.get(key)):
            raise UserError(
                f"{what}.config {path} sets data.{key} to {value!r} but the pipeline's is {data.get(key)!r}: every "
                "stage must see the same dataset, so set it only in the pipeline's data section"
            )


def fit_arguments(
    stage: FitStage, what: str, data: dict, explicit: set[str], seed: int, root: str, wandb_project: str | None
) -> list[str]:
    """The `fit` arguments of one stage: its files, the pipeline's data (the dataset keys, and the keys in
    `explicit`: those the pipeline config or command line set), its overrides, then what the pipeline sets for
    every stage. `what` names the stage's settings section in errors."""
    _check_overrides(stage, what)
    _check_stage_files(stage, what, data)
    args = ["fit"]
    for path in stage.config:
        args += ["--config", path]
    passed = {key: value for key, value in data.items() if key in DATASET_KEYS or key in explicit}
    args += [f"--data.{key}={cli_value(value)}" for key, value in passed.items()]
    args += [f"--{key}={cli_value(value)}" for key, value in stage.overrides.items()]
    if wandb_project:
        loggers = [
            {"class_path": "lightning.pytorch.loggers.WandbLogger", "init_args": {"project": wandb_project}},
            {"class_path": "askexpert.loggers.RunCSVLogger"},
        ]
        args.append(f"--trainer.logger={json.dumps(loggers)}")
    return args + [f"--seed_everything={seed}", "--trainer.default_root_dir", root]


def expert_arguments(
    partition_file: str, index: int, strategy: str, strategy_args: dict[str, Any], base_checkpoint: str
) -> list[str]:
    """What an expert stage adds to its `fit` arguments: its classes, strategy (with `strategy_args`, its
    parameters) and the base model it starts from."""
    args = ["--partition", partition_file, "--expert_index", str(index), "--specialization", strategy]
    args += [f"--specialization.{key}={cli_value(value)}" for key, value in strategy_args.items()]
    return args + ["--model.init_args.base_path", base_checkpoint]
