"""A run's records damaged or at odds with each other (issue 27, items 2-5): stages.json and pipeline.yaml are
checked where they are read, a damaged stages.json is repaired by `--overwrite true` (the command its error names),
and a full disk names the file it could not write."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import yaml
from helpers.cli import one_line, run_main

from askexpert.errors import one_line_for_user
from askexpert.files import atomic
from askexpert.files.atomic import naming_errors, write_json
from askexpert.pipeline.finished_run import read_settings


def records_of(run: Path, folder: Path) -> Path:
    """A copy of a run's two records (pipeline.yaml, stages.json): all that opening a run reads first."""
    folder.mkdir()
    for name in ("pipeline.yaml", "stages.json"):
        shutil.copy(run / name, folder / name)
    return folder


def commands_that_open(run: Path, tmp_path: Path) -> list[list[str]]:
    """Every command that reads a finished run, each with arguments that parse."""
    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    return [
        ["evaluate", "--run", str(run), "--out", str(tmp_path / "report")],
        ["route", "--run", str(run), "--images", str(images), "--out", str(tmp_path / "routes.csv")],
        ["export", "--run", str(run), "--out", str(tmp_path / "export")],
        ["profile", "--run", str(run), "--out", str(tmp_path / "profile.yaml")],
    ]


# -- stages.json ----------------------------------------------------------------------------------------------
DAMAGED_STAGES = {
    "not JSON": "{not json",
    "half of a file": '{"generalist": {"done": tr',
    "not UTF-8": b'{"generalist": {"done": true, "identity": "\xff"}}',
    "a list": "[1, 2]",
    "an entry that is a string": '{"generalist": "done"}',
    "done as a string": '{"generalist": {"done": "yes", "identity": "x"}}',
    "no done": '{"generalist": {"identity": "x"}}',
    "identity as a number": '{"generalist": {"done": true, "identity": 7}}',
    "seconds as a bool": '{"generalist": {"done": true, "seconds": true}}',
    "negative seconds": '{"generalist": {"done": true, "seconds": -3}}',
    "NaN seconds": '{"generalist": {"done": true, "seconds": NaN}}',
    "config as a list": '{"generalist": {"done": true, "config": []}}',
}


@pytest.mark.parametrize("damage", DAMAGED_STAGES)
def test_a_damaged_stages_json_names_the_command_that_repairs_it(tiny_pipeline_run, tmp_path, capsys, damage):
    config, run = tiny_pipeline_run
    copy = records_of(run, tmp_path / "run")
    text = DAMAGED_STAGES[damage]
    (copy / "stages.json").write_bytes(text if isinstance(text, bytes) else text.encode())
    for command in (["evaluate", "--run", str(copy)], ["pipeline", "--config", str(config), "--out", str(copy)]):
        code, _, err = run_main(command, capsys)
        one_line(code, err, f"{copy / 'stages.json'} is damaged", "--overwrite true", "`pipeline`")


def test_the_repair_is_not_refused_when_the_file_is_read(tiny_pipeline_run, tmp_path, capsys):
    """The issue's case: `--overwrite` was refused too, because stages.json was read before it was considered. A
    dry run with it plans every stage as new."""
    config, run = tiny_pipeline_run
    copy = records_of(run, tmp_path / "run")
    (copy / "stages.json").write_text("{not json")
    argv = ["pipeline", "--config", str(config), "--out", str(copy), "--dry_run", "true"]
    code, _, err = run_main(argv, capsys)
    one_line(code, err, "is damaged; use --overwrite true")
    code, stdout, err = run_main([*argv, "--overwrite", "true"], capsys)
    assert code == 0, err
    planned = [line for line in stdout.splitlines() if line.startswith(("generalist ", "base ", "experts/"))]
    assert len(planned) == 6 and all(line.rstrip().endswith("to train") for line in planned), stdout
    assert (copy / "stages.json").read_text() == "{not json"  # a dry run writes nothing


@pytest.mark.slow  # ~40 s: every stage of the tiny pipeline trains again
def test_overwrite_repairs_a_damaged_stages_json(tiny_pipeline_run, tmp_path, capsys):
    config, run = tiny_pipeline_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "stages.json").write_text("{not json")
    code, _, err = run_main(["pipeline", "--config", str(config), "--out", str(copy), "--overwrite", "true"], capsys)
    assert code == 0, err
    record = json.loads((copy / "stages.json").read_text())
    assert record.keys() == json.loads((run / "stages.json").read_text()).keys()
    assert all(entry["done"] for entry in record.values())
    code, _, err = run_main(["evaluate", "--run", str(copy), "--out", str(tmp_path / "again")], capsys)
    assert code == 0, err


# -- pipeline.yaml --------------------------------------------------------------------------------------------
def changed_settings(run: Path, folder: Path, change) -> Path:
    """`records_of(run)` with its pipeline.yaml changed by `change(settings)` (a dict, in place)."""
    copy = records_of(run, folder)
    settings = yaml.safe_load((copy / "pipeline.yaml").read_text())
    change(settings)
    (copy / "pipeline.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))
    return copy


def test_a_deleted_data_key_is_refused_not_filled_with_its_default(tiny_pipeline_run, tmp_path, capsys):
    """The issue's case: without `synthetic_test_per_class` the report used 10 000 test images instead of 300."""
    _, run = tiny_pipeline_run
    copy = changed_settings(run, tmp_path / "run", lambda s: s["data"].pop("synthetic_test_per_class"))
    for command in commands_that_open(copy, tmp_path):
        code, _, err = run_main(command, capsys)
        one_line(code, err, str(copy / "pipeline.yaml"), "data.synthetic_test_per_class is missing")
    assert not (tmp_path / "report").exists() and not (tmp_path / "export").exists()


@pytest.mark.parametrize(
    "change, fragments",
    [
        (lambda s: s["data"].update(synthetic_test_per_class=100), ["data.synthetic_test_per_class is 100 there", "3"]),
        (lambda s: s["data"].update(source="cifar100"), ["data.source is 'cifar100' there", "'synthetic'"]),
        (lambda s: s["data"].update(val_fraction=0.5), ["data.val_fraction is 0.5 there", "0.2"]),
        (lambda s: s["partition"].update(num_experts=4), ["partition.num_experts is 4 there", "2"]),
        (lambda s: s["partition"].update(method="random"), ["partition.method is 'random' there", "'superclass'"]),
        (lambda s: s.update(seed=5), ["seed is 5 there", "0"]),
        (lambda s: s.update(specialization="dustbin"), ["stage experts/progressive/0 is not one of", "'dustbin'"]),
        (lambda s: s.update(static_baseline=False), ["stage experts/static/0 is not one of"]),
    ],
)
def test_pipeline_yaml_at_odds_with_stages_json_is_refused(tiny_pipeline_run, tmp_path, capsys, change, fragments):
    _, run = tiny_pipeline_run
    copy = changed_settings(run, tmp_path / "run", change)
    code, _, err = run_main(["evaluate", "--run", str(copy)], capsys)
    one_line(code, err, f"{copy / 'pipeline.yaml'} does not match {copy / 'stages.json'}", *fragments)


@pytest.mark.parametrize("cut", [0.25, 0.5, 0.75, 0.95])
def test_a_truncated_pipeline_yaml_says_so(tiny_pipeline_run, tmp_path, capsys, cut):
    """Not "device profile missing" (the default profile the parser filled in), whatever part was lost."""
    _, run = tiny_pipeline_run
    copy = records_of(run, tmp_path / "run")
    text = (copy / "pipeline.yaml").read_bytes()
    (copy / "pipeline.yaml").write_bytes(text[: int(len(text) * cut)])
    code, _, err = run_main(["evaluate", "--run", str(copy)], capsys)
    line = one_line(code, err, f"{copy / 'pipeline.yaml'} is damaged")
    assert "device profile" not in line


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"data: {source: synthetic\n", "not YAML"),
        (b"\xff\xfe\x00garbage", "not UTF-8"),
        (b"# nothing\n", "empty"),
        (b"- a list\n", "empty, or not a mapping"),
    ],
)
def test_pipeline_yaml_that_askexpert_did_not_write(tiny_pipeline_run, tmp_path, capsys, content, reason):
    _, run = tiny_pipeline_run
    copy = records_of(run, tmp_path / "run")
    (copy / "pipeline.yaml").write_bytes(content)
    code, _, err = run_main(["evaluate", "--run", str(copy)], capsys)
    one_line(code, err, f"{copy / 'pipeline.yaml'} is damaged ({reason}")


@pytest.mark.parametrize("section", ["data", "partition", "routing"])
def test_a_section_that_is_not_a_mapping(tiny_pipeline_run, tmp_path, capsys, section):
    _, run = tiny_pipeline_run
    copy = changed_settings(run, tmp_path / "run", lambda s: s.update({section: 3}))
    code, _, err = run_main(["evaluate", "--run", str(copy)], capsys)
    one_line(code, err, f"{copy / 'pipeline.yaml'} is damaged ({section} is not a mapping")


def test_the_command_a_damaged_pipeline_yaml_names_repairs_it(tiny_pipeline_run, tmp_path, capsys):
    """ "run the pipeline again with the run's config and --out": nothing trains, pipeline.yaml is written anew."""
    config, run = tiny_pipeline_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "pipeline.yaml").write_bytes((run / "pipeline.yaml").read_bytes()[:100])
    code, _, err = run_main(["evaluate", "--run", str(copy)], capsys)
    one_line(code, err, "is damaged", "run the pipeline again with the run's config and --out")
    code, stdout, err = run_main(["pipeline", "--config", str(config), "--out", str(copy)], capsys)
    assert code == 0, err
    assert stdout.count("done, config unchanged, skipped") == 7
    written, original = (yaml.safe_load((folder / "pipeline.yaml").read_text()) for folder in (copy, run))
    assert written.pop("out") == str(copy) and original.pop("out") == str(run) and written == original
    code, _, err = run_main(["evaluate", "--run", str(copy)], capsys)
    assert code == 0, err


def test_the_run_as_written_reads_back(tiny_pipeline_run, tmp_path):
    """The control for the tests above: the records unchanged (and a run without stages.json yet) read."""
    _, run = tiny_pipeline_run
    copy = records_of(run, tmp_path / "run")
    assert read_settings(str(copy)).data.synthetic_test_per_class == 3
    (copy / "stages.json").unlink()
    assert read_settings(str(copy)).partition.num_experts == 2


# -- a full disk ------------------------------------------------------------------------------------------------
class FullDisk:
    """An open file whose writes fail as a full disk's do: an OSError with an errno (`code`) and no file name."""

    code = errno.ENOSPC

    def __init__(self, *args, **kwargs) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None

    def write(self, data) -> int:
        raise OSError(self.code, os.strerror(self.code))


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EFBIG])
def test_a_full_disk_names_the_file_being_written(tmp_path, monkeypatch, code):
    monkeypatch.setattr(FullDisk, "code", code)
    monkeypatch.setattr(atomic, "open", FullDisk, raising=False)
    target = tmp_path / "report.json"
    with pytest.raises(OSError) as raised:
        write_json(str(target), {"a": 1})
    message, status = one_line_for_user(raised.value)
    assert message == f"cannot write {target}: {os.strerror(code)} (free some space and run again)" and status == 2
    assert not target.exists() and list(tmp_path.iterdir()) == []  # nor its temporary file
    # an append to a file that is not written atomically (metrics.csv) names its file the same way
    with pytest.raises(OSError) as raised, naming_errors(str(target)):
        raise OSError(code, "full")
    assert one_line_for_user(raised.value)[0].startswith(f"cannot write {target}: ")
    # an OSError that names another file keeps that name
    with pytest.raises(OSError) as raised, naming_errors(str(target)):
        raise OSError(errno.ENOENT, "gone", "/elsewhere")
    assert raised.value.filename == "/elsewhere"


def test_a_full_disk_is_one_line_naming_the_file_from_the_cli(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(atomic, "open", FullDisk, raising=False)
    out = tmp_path / "partition.json"
    argv = ["partition", "--num_experts", "2", "--out", str(out), "--data.synthetic_train_per_class", "2"]
    code, _, err = run_main([*argv, "--data.synthetic_test_per_class", "1"], capsys)
    one_line(code, err, f"cannot write {out}: No space left on device (free some space and run again)")
    assert list(tmp_path.iterdir()) == []
