"""An ablation's grid: which pipeline keys vary, over which values, for which seeds.

A grid key is a pipeline option by its dotted name (`specialization`, `partition.method`, `routing.top_k`,
see `python -m askexpert pipeline --help`) or an option of one kind of training stage, written
`<generalist|base|experts>.overrides.<fit option>` (e.g. `experts.overrides.model.init_args.init`), which sets
that stage's override. Every combination of values is a cell; every cell runs once per seed.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import dataclass
from typing import Any

from askexpert.errors import UserError

FIT_STAGES = ("generalist", "base", "experts")
# set by the ablation itself (seeds, folders) or meaningless per cell
RESERVED = ("config", "out", "overwrite", "seed")


def pipeline_keys() -> list[str]:
    from askexpert.pipeline.settings import parser

    # the launcher is where a cell's stages run, not a setting of the cell (the ablation's own --launcher)
    return [key for key in parser().get_defaults().keys() if key not in RESERVED and not key.startswith("launcher.")]


def split_override(key: str) -> tuple[str, str] | None:
    """(stage, fit option) for `<stage>.overrides.<fit option>`, else None."""
    stage, sep, option = key.partition(".overrides.")
    return (stage, option) if sep and stage in FIT_STAGES and option else None


def check_keys(keys: list[str], what: str) -> None:
    valid = pipeline_keys()
    for key in keys:
        if key in valid or split_override(key):
            continue
        if key in RESERVED:
            raise UserError(f"{what} key {key!r} is set by the ablation itself (seeds: the `seeds` list)")
        shown = [k for k in valid if not k.startswith("data.") or k in ("data.source", "data.root")]
        raise UserError(
            f"unknown {what} key {key!r}; valid keys: {', '.join(shown)}, data.* (the DataModule's options) and "
            f"<{'|'.join(FIT_STAGES)}>.overrides.<fit option> (e.g. experts.overrides.model.init_args.init)"
        )


def column(key: str) -> str:
    """A grid key's column in the results: `experts.overrides.model.init_args.init` -> `experts.init`."""
    found = split_override(key)
    return f"{found[0]}.{found[1].rsplit('.', 1)[-1]}" if found else key


@dataclass(frozen=True)
class Cell:
    """One combination of grid values (in the grid's key order)."""

    values: tuple[tuple[str, Any], ...]

    @property
    def name(self) -> str:
        """A folder name made of the values, e.g. `specialization=full_experts.init=base`."""
        if not self.values:
            return "default"
        raw = "_".join(f"{column(k)}={_value_text(v)}" for k, v in self.values)
        text = re.sub(r"[^A-Za-z0-9._=+-]+", "-", raw).strip("-")
        if text != raw or len(text) > 80:  # values that are not plain names: a hash keeps the folders apart
            digest = hashlib.sha256(json.dumps(self.values, default=str).encode()).hexdigest()[:8]
            text = f"{text[:70]}-{digest}"
        return text

    def columns(self) -> dict[str, Any]:
        return {column(k): _value_text(v) for k, v in self.values}


def _value_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def expand(grid: dict[str, list[Any]]) -> list[Cell]:
    """Every combination of the grid's values, the first key varying slowest."""
    check_grid(grid)
    keys = list(grid)
    return [Cell(tuple(zip(keys, combo, strict=True))) for combo in itertools.product(*(grid[k] for k in keys))]


def check_grid(grid: dict[str, list[Any]]) -> None:
    if not isinstance(grid, dict):
        raise UserError(f"the grid must map keys to lists of values, got {grid!r}")
    check_keys(list(grid), "grid")
    columns = [column(k) for k in grid]
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise UserError(f"grid key {key!r} needs a non-empty list of values, got {values!r}")
        texts = [json.dumps(v, sort_keys=True, default=str) for v in values]
        if len(set(texts)) != len(texts):
            raise UserError(f"grid key {key!r} lists a value twice: {values}")
        if columns.count(column(key)) > 1:
            raise UserError(f"grid keys {[k for k in grid if column(k) == column(key)]} would share a column")


def check_seeds(seeds: list[int]) -> None:
    if not seeds:
        raise UserError("--seeds needs at least one seed")
    if len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds lists a seed twice: {seeds}")


def cell_arguments(cell_values: dict[str, Any]) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """Pipeline command-line arguments for the plain keys, and {stage: {fit option: value}} for overrides."""
    args, overrides = [], {}
    for key, value in cell_values.items():
        found = split_override(key)
        if found:
            overrides.setdefault(found[0], {})[found[1]] = value
        else:
            args.append(f"--{key}={_value_text(value)}")
    return args, overrides
