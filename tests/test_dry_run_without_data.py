"""A dry run plans a CIFAR-100 config on a machine without the dataset (a GPU config checked on a laptop): the
official classes stand in for the missing files and the plan says so; a real run still refuses in one line."""

from __future__ import annotations

from conftest import REPO
from helpers.cli import one_line, run_main


def test_a_cifar100_dry_run_needs_no_data_and_says_so(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)  # the shipped config names its stage files relative to the checkout
    missing = tmp_path / "no_cifar"
    args = ["pipeline", "--config", "configs/pipeline/cifar100.yaml", "--out", str(tmp_path / "run")]
    args += ["--data.root", str(missing), "--static_baseline", "false"]
    code, stdout, err = run_main([*args, "--dry_run", "true"], capsys)
    assert code == 0, err
    assert f"data: no CIFAR-100 under {missing}; planned with the official 100 classes and 20 superclasses" in stdout
    assert "experts/progressive/0" in stdout and not (tmp_path / "run").exists()
    code, _, err = run_main(args, capsys)  # the real run needs the files
    one_line(code, err, f"CIFAR-100 root {str(missing)!r} does not exist")
    assert not (tmp_path / "run").exists()
