"""configs/sweeps/ holds only W&B sweep files, each valid as a sweep config.

W&B's sweep config JSON schema ships in its `sweeps` package (`sweeps.schema_violations_from_proposed_config`),
which the installed `wandb` wheel does not include (and which pins an old numpy), and `jsonschema` is not
installed: this test checks the structure W&B documents instead (docs.wandb.ai, "Sweep configuration options").
"""

from __future__ import annotations

import pytest
import yaml
from conftest import REPO

SWEEP_FILES = sorted((REPO / "configs" / "sweeps").glob("*.yaml"))
TOP_LEVEL = {"program", "entity", "project", "description", "name", "method", "metric", "parameters",
             "early_terminate", "command", "run_cap"}  # fmt: skip
DISTRIBUTIONS = {
    "constant",
    "categorical",
    "int_uniform",
    "uniform",
    "q_uniform",
    "log_uniform",
    "log_uniform_values",
    "q_log_uniform",
    "q_log_uniform_values",
    "inv_log_uniform",
    "inv_log_uniform_values",
    "normal",
    "q_normal",
    "log_normal",
    "q_log_normal",
    "beta",
    "q_beta",
}


def test_every_file_in_configs_sweeps_is_a_sweep():
    assert SWEEP_FILES
    for path in SWEEP_FILES:
        assert "program" in yaml.safe_load(path.read_text()), f"{path} is not a sweep file"


def _check_parameter(name: str, spec) -> None:
    assert isinstance(spec, dict) and spec, f"parameter {name}: {spec!r}"
    if "parameters" in spec:  # nested parameters
        for sub, value in spec["parameters"].items():
            _check_parameter(f"{name}.{sub}", value)
        return
    if "value" in spec:
        return
    if "values" in spec:
        assert isinstance(spec["values"], list) and spec["values"], f"parameter {name}: empty values"
        if "probabilities" in spec:
            assert len(spec["probabilities"]) == len(spec["values"])
        return
    distribution = spec.get("distribution")
    assert distribution is None or distribution in DISTRIBUTIONS, f"parameter {name}: {distribution}"
    if distribution in (None, "int_uniform", "uniform") or "uniform" in distribution:
        assert {"min", "max"} <= set(spec) and spec["min"] < spec["max"], f"parameter {name}: {spec}"
    else:
        assert {"mu", "sigma"} & set(spec) or {"a", "b"} & set(spec), f"parameter {name}: {spec}"


@pytest.mark.parametrize("path", SWEEP_FILES, ids=lambda p: p.stem)
def test_sweep_file_follows_wandbs_sweep_config_structure(path):
    sweep = yaml.safe_load(path.read_text())
    assert set(sweep) <= TOP_LEVEL, set(sweep) - TOP_LEVEL
    assert sweep["method"] in ("grid", "random", "bayes")
    assert isinstance(sweep.get("program"), str) or isinstance(sweep.get("command"), list)
    if sweep["method"] == "bayes" or "metric" in sweep:
        metric = sweep["metric"]
        assert isinstance(metric.get("name"), str) and metric.get("goal", "minimize") in ("minimize", "maximize")
    assert isinstance(sweep["parameters"], dict) and sweep["parameters"]
    for name, spec in sweep["parameters"].items():
        _check_parameter(name, spec)
    if sweep["method"] == "grid":  # a grid needs a finite set of values
        assert all("value" in s or "values" in s for s in sweep["parameters"].values())
    if "command" in sweep:
        assert all(isinstance(chunk, str) for chunk in sweep["command"]) and "${args}" in sweep["command"]
