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
    "config as a list": '{"generalist": {"done": true, "config": []}}',
    "interrupted as a number": '{"generalist": {"done": false, "interrupted": 15}}',
    "diverged as a list": '{"generalist": {"done": false, "diverged": [1, 2]}}',
    "nested too deeply": "[" * 100_000,
    "a number of 5000 digits": '{"generalist": {"done": true, "seconds": ' + "1" * 5000 + "}}",
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


def test_a_time_askexpert_could_have_written_is_not_damage(tiny_pipeline_run, tmp_path, capsys):
    """A negative `seconds` (the wall clock stepped back while a stage trained, before they were clamped), a NaN or
    a text in a timing field is dropped when read: the repair a damaged file names would retrain every stage."""
    from askexpert.pipeline.record import load_record
    from askexpert.runs.layout import RunLayout

    config, run = tiny_pipeline_run
    copy = records_of(run, tmp_path / "run")
    record = json.loads((copy / "stages.json").read_text())
    bad = {"seconds": -3.2, "started": float("nan"), "side_by_side": True, "resumed": "yes"}
    for entry in record.values():
        entry.update(bad)
    (copy / "stages.json").write_text(json.dumps(record))
    read = load_record(RunLayout(str(copy)))
    assert all(not set(bad) & entry.keys() and entry["done"] for entry in read.values())
    assert read_settings(str(copy)).seed == 0
    argv = ["pipeline", "--config", str(config), "--out", str(copy), "--dry_run", "true"]
    code, _, err = run_main(argv, capsys)
    assert code == 0, err


def test_a_stage_time_is_never_negative_when_the_clock_steps_back(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from askexpert.ablation.store import StageStore
    from askexpert.pipeline import record

    entry = record.started_entry("abc", {}, resumed=False)
    monkeypatch.setattr(record.time, "time", lambda: entry["started"] - 60)  # NTP stepped back a minute
    record.mark_done(entry)
    assert entry["seconds"] == 0.0 and entry["done"] is True
    store = StageStore(str(tmp_path / "store"))
    stage = SimpleNamespace(name="generalist", identity="abc", config={})
    store.mark_done(stage, {"run": str(tmp_path), "started": entry["started"], "resumed": False})
    assert store.job_record(stage, str(tmp_path)) == {"seconds": 0.0}


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
        (lambda s: s["data"].update(seed=7), ["data.seed is 7 there", "0"]),
        (lambda s: s["data"].update(image_size=64), ["data.image_size is 64 there", "32"]),
        (lambda s: s["data"].update(synthetic_train_per_class=20), ["data.synthetic_train_per_class is 20 there"]),
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


@pytest.mark.parametrize(
    "key, value",
    [("root", "/mnt/elsewhere/data"), ("download", True), ("verify_checksums", False), ("max_memory_gb", 2.5)],
)
def test_a_run_copied_to_another_machine_with_its_data_root_edited_opens(tiny_pipeline_run, tmp_path, key, value):
    """Where the data lies on this machine and how it is loaded is not which data: docs/architecture.md's
    "Relocatable" (the keys that define the data are refused when changed, above)."""
    _, run = tiny_pipeline_run
    copy = changed_settings(run, tmp_path / "run", lambda s: s["data"].update({key: value}))
    assert read_settings(str(copy)).data.as_dict()[key] == value


def test_a_copied_run_with_its_data_root_edited_evaluates(tiny_pipeline_run, tmp_path, capsys):
    _, run = tiny_pipeline_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy, symlinks=True)
    settings = yaml.safe_load((copy / "pipeline.yaml").read_text())
    settings["data"]["root"] = str(tmp_path / "data elsewhere")
    (copy / "pipeline.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))
    code, _, err = run_main(["evaluate", "--run", str(copy), "--out", str(tmp_path / "report")], capsys)
    assert code == 0, err
    assert (tmp_path / "report" / "report.json").is_file()


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
        (b"data: {source: synthetic\n", "not valid YAML"),
        (b"\xff\xfe\x00garbage", "not UTF-8"),
        (b"a: " + b"[" * 5000, "not valid YAML: nested too deeply"),
        (b"seed: 2020-13-45\n", "not valid YAML: month must be in 1..12"),
        (b"seed: !!bool 3\n", "not valid YAML: a tagged value"),
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
    """A file really opened (the temporary file exists on disk, as it would) whose writes fail as a full disk's
    do: an OSError with an errno (`code`) and no file name."""

    code = errno.ENOSPC

    def __init__(self, *args, **kwargs) -> None:
        self.handle = open(*args, **kwargs)  # noqa: SIM115 (closed by __exit__, as `with open()` would)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.handle.close()

    def write(self, data) -> int:
        raise OSError(self.code, os.strerror(self.code))


def fail_like_a_full_disk(monkeypatch, where: str, code: int = errno.ENOSPC) -> None:
    """The write fails after the temporary file was created: in `write`, or (the data cached) in `fsync`."""
    if where == "write":
        monkeypatch.setattr(FullDisk, "code", code)
        monkeypatch.setattr(atomic, "open", FullDisk, raising=False)
    else:

        def fsync(fd):
            raise OSError(code, os.strerror(code))

        monkeypatch.setattr(atomic.os, "fsync", fsync)


@pytest.mark.parametrize("where", ["write", "fsync"])
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EFBIG])
def test_a_full_disk_names_the_file_being_written(tmp_path, monkeypatch, code, where):
    fail_like_a_full_disk(monkeypatch, where, code)
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


@pytest.mark.parametrize("where", ["write", "fsync"])
def test_a_full_disk_is_one_line_naming_the_file_from_the_cli(tmp_path, monkeypatch, capsys, where):
    fail_like_a_full_disk(monkeypatch, where)
    out = tmp_path / "partition.json"
    argv = ["partition", "--num_experts", "2", "--out", str(out), "--data.synthetic_train_per_class", "2"]
    code, _, err = run_main([*argv, "--data.synthetic_test_per_class", "1"], capsys)
    one_line(code, err, f"cannot write {out}: No space left on device (free some space and run again)")
    assert list(tmp_path.iterdir()) == []


# -- a signal at a stage's start or finish -------------------------------------------------------------------
@pytest.mark.parametrize("at", ["_ready_folder", "save_record"])
def test_a_signal_while_a_stage_starts_records_it_interrupted(tiny_pipeline_run, tmp_path, monkeypatch, capsys, at):
    """SIGTERM while the stage's folder is made ready, or its record written, and not only while it trains: the
    stage is recorded as interrupted and the pipeline exits 143."""
    from askexpert.interrupts import Interrupted
    from askexpert.pipeline import runner

    config, run = tiny_pipeline_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy, symlinks=True)
    record = json.loads((copy / "stages.json").read_text())
    record["generalist"]["done"] = False  # so that the pipeline starts it again (a resume)
    (copy / "stages.json").write_text(json.dumps(record))
    real = getattr(runner, at)

    def signalled(*args, **kwargs):
        monkeypatch.setattr(runner, at, real)  # once: the record of the interruption is written after it
        raise Interrupted(15)

    monkeypatch.setattr(runner, at, signalled)
    code, _, err = run_main(["pipeline", "--config", str(config), "--out", str(copy)], capsys)
    assert code == 143, err
    assert json.loads((copy / "stages.json").read_text())["generalist"]["interrupted"] == "SIGTERM"


# -- the same reader for every record ---------------------------------------------------------------------------
def test_every_record_nested_too_deeply_is_one_line(tiny_pipeline_run, tiny_export, tmp_path, capsys):
    """JSON and YAML nested past the parser's recursion (a RecursionError inside json or PyYAML) through every
    reader: the run's report, an export's manifest."""
    from askexpert.collab.report_file import read_report
    from askexpert.deploy.bundle import load_bundle
    from askexpert.errors import UserError

    _, run = tiny_pipeline_run
    copy = records_of(run, tmp_path / "run")
    (copy / "report.json").write_text("[" * 100_000)
    with pytest.raises(UserError, match=r"report.json is damaged \(not valid JSON: nested too deeply\); write it"):
        read_report(str(copy))
    export = tmp_path / "export"
    shutil.copytree(tiny_export[0], export)
    (export / "manifest.json").write_text('{"a": ' + "[" * 100_000)
    with pytest.raises(UserError, match=r"not an askexpert manifest \(not valid JSON: nested too deeply\); export"):
        load_bundle(str(export))
