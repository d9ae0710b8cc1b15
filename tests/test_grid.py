"""askexpert/ablation/grid.py: grid keys (pipeline options or per-stage overrides), their result columns, cell
folder names and the command line of a cell. (Expansion order and refused grids: tests/test_ablate.py.)"""

from __future__ import annotations

import re

import pytest

from askexpert.ablation.grid import (
    FIT_STAGES,
    RESERVED,
    Cell,
    cell_arguments,
    check_grid,
    check_keys,
    check_seeds,
    column,
    expand,
    pipeline_keys,
    split_override,
)
from askexpert.errors import UserError


@pytest.mark.parametrize(
    "key, found",
    [
        ("experts.overrides.model.init_args.init", ("experts", "model.init_args.init")),
        ("generalist.overrides.trainer.max_epochs", ("generalist", "trainer.max_epochs")),
        ("base.overrides.x", ("base", "x")),
        ("experts.overrides.", None),  # no option
        ("models.overrides.trainer.max_epochs", None),  # not a kind of training stage
        ("partition.method", None),
        ("experts.config", None),
    ],
)
def test_split_override(key, found) -> None:
    assert split_override(key) == found


@pytest.mark.parametrize(
    "key, name",
    [
        ("experts.overrides.model.init_args.init", "experts.init"),
        ("base.overrides.trainer.max_epochs", "base.max_epochs"),
        ("partition.num_experts", "partition.num_experts"),  # a pipeline option is its own column
    ],
)
def test_column(key, name) -> None:
    assert column(key) == name


def test_the_pipeline_keys_are_the_pipeline_options_less_the_reserved() -> None:
    keys = pipeline_keys()
    assert {"specialization", "partition.method", "partition.num_experts", "routing.top_k", "data.source"} <= set(keys)
    assert not set(RESERVED) & set(keys)
    check_keys(["specialization", "data.root", *(f"{stage}.overrides.model.init_args.lr" for stage in FIT_STAGES)], "x")


def test_an_unknown_key_is_refused_with_the_keys_a_user_can_give() -> None:
    with pytest.raises(UserError) as raised:
        check_keys(["routing.top_k", "specialisation"], "base")
    message = str(raised.value)
    assert message.startswith("unknown base key 'specialisation'; valid keys: ")
    shown = message.split("valid keys: ")[1].split(", data.*")[0].split(", ")
    assert "specialization" in shown and "data.source" in shown and "data.root" in shown
    assert not [key for key in shown if key.startswith("data.") and key not in ("data.source", "data.root")]
    assert message.endswith(
        "data.* (the DataModule's options) and <generalist|base|experts>.overrides.<fit option> "
        "(e.g. experts.overrides.model.init_args.init)"
    )
    with pytest.raises(UserError, match=r"^grid key 'out' is set by the ablation itself \(seeds: the `seeds` list\)$"):
        check_keys(["out"], "grid")


def test_cell_names() -> None:
    assert Cell(()).name == "default"
    cell = Cell((("routing.top_k", 2), ("experts.overrides.model.init_args.init", "base"), ("x.flag", True)))
    assert cell.name == "routing.top_k=2_experts.init=base_x.flag=true"
    assert cell.columns() == {"routing.top_k": "2", "experts.init": "base", "x.flag": "true"}


@pytest.mark.parametrize(
    "values",
    [
        (("experts.config", ["configs/a.yaml", "configs/b.yaml"]),),  # characters a folder name should not hold
        (("data.root", "x" * 90),),  # too long
    ],
)
def test_a_name_that_had_to_be_changed_carries_a_hash(values) -> None:
    name = Cell(values).name
    assert re.fullmatch(r"[A-Za-z0-9._=+-]{1,70}-[0-9a-f]{8}", name), name
    assert Cell(values).name == name  # stable: a resumed ablation finds its folders again
    other = tuple((key, f"{value}!") if isinstance(value, str) else (key, [*value, "c"]) for key, value in values)
    assert Cell(other).name != name


def test_check_grid_refuses_a_grid_that_is_not_a_mapping_or_whose_columns_collide() -> None:
    with pytest.raises(UserError, match=r"^the grid must map keys to lists of values, got \['a'\]$"):
        check_grid(["a"])
    grid = {"experts.overrides.trainer.max_epochs": [1], "experts.overrides.other.max_epochs": [2]}
    with pytest.raises(UserError, match="would share a column"):
        check_grid(grid)
    with pytest.raises(UserError, match=r"grid key 'routing.top_k' lists a value twice: \[\{'a': 1\}, \{'a': 1\}\]"):
        check_grid({"routing.top_k": [{"a": 1}, {"a": 1}]})
    check_grid({"routing.top_k": [1, 2], "experts.overrides.trainer.max_epochs": [1]})


def test_expand_multiplies_the_value_lists() -> None:
    grid = {"routing.top_k": [1, 2, 3], "partition.num_experts": [2, 4], "specialization": ["full_experts"]}
    cells = expand(grid)
    assert len(cells) == 3 * 2 * 1 and len({cell.name for cell in cells}) == 6
    assert [dict(cell.values)["routing.top_k"] for cell in cells] == [1, 1, 2, 2, 3, 3]  # the first key slowest
    assert expand({}) == [Cell(())]


@pytest.mark.parametrize(
    "seeds, message",
    [([], "--seeds needs at least one seed"), ([0, 1, 0], r"--seeds lists a seed twice: \[0, 1, 0\]")],
)
def test_check_seeds(seeds, message) -> None:
    with pytest.raises(UserError, match=f"^{message}$"):
        check_seeds(seeds)


def test_check_seeds_accepts_distinct_seeds() -> None:
    check_seeds([3, 1, 2])


def test_cell_arguments_write_values_as_the_command_line_reads_them() -> None:
    args, overrides = cell_arguments(
        {
            "experts.config": ["a.yaml", "b.yaml"],
            "routing.top_k": 2,
            "data.root": "/data/x y",
            "base.overrides.model.init_args.lr": 0.001,
            "base.overrides.trainer.max_epochs": 3,
        }
    )
    assert args == ['--experts.config=["a.yaml", "b.yaml"]', "--routing.top_k=2", "--data.root=/data/x y"]
    assert overrides == {"base": {"model.init_args.lr": 0.001, "trainer.max_epochs": 3}}
