"""The three top-level packages import from this repository, not from same-named packages elsewhere."""

import importlib
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("package", ["askexpert", "strategies", "datamodules"])
def test_package_imports_from_this_repo(package):
    module = importlib.import_module(package)
    assert Path(module.__file__).resolve().is_relative_to(REPO / package)


def test_pyproject_lists_the_packages_explicitly():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    packages = config["tool"]["setuptools"]["packages"]
    assert {"askexpert", "strategies", "datamodules"} <= set(packages)
    assert not any("torch>" in dep and "2.15" in dep for dep in config["project"]["dependencies"])


def test_every_python_subpackage_is_declared():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    declared = set(config["tool"]["setuptools"]["packages"])
    on_disk = {
        ".".join(init.parent.relative_to(REPO).parts)
        for top in ("askexpert", "strategies", "datamodules")
        for init in (REPO / top).rglob("__init__.py")
    }
    assert on_disk <= declared, f"sub-packages missing from pyproject.toml: {sorted(on_disk - declared)}"
