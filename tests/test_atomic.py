"""askexpert/files/atomic.py: every file is written whole or not at all, JSON one way, and what a killed writer
left behind is recognised and removed (only its own temporary files; a live writer's are left alone)."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from askexpert.files.atomic import (
    TEMPORARY,
    atomic_path,
    atomic_write_bytes,
    atomic_write_text,
    process_alive,
    remove_stale_temporaries,
    temporary_name,
    write_json,
)


def a_dead_pid() -> int:
    """A pid that no process has now."""
    return next(pid for pid in range(4242, 4_194_304) if not process_alive(pid))


# -- write_json ----------------------------------------------------------------------------------------------
def test_write_json_writes_these_bytes(tmp_path) -> None:
    path = tmp_path / "report.json"
    write_json(str(path), {"b": 1, "a": [1, 2.5], "text": "é"})
    assert path.read_bytes() == b'{\n  "b": 1,\n  "a": [\n    1,\n    2.5\n  ],\n  "text": "\\u00e9"\n}\n'
    assert json.loads(path.read_text()) == {"b": 1, "a": [1, 2.5], "text": "é"}


@pytest.mark.parametrize(
    "options, expected",
    [
        ({"indent": None}, '{"z": 1, "a": {"y": 2, "x": 3}}\n'),
        ({"indent": None, "sort_keys": True}, '{"a": {"x": 3, "y": 2}, "z": 1}\n'),
        ({"indent": 4, "sort_keys": True}, '{\n    "a": {\n        "x": 3,\n        "y": 2\n    },\n    "z": 1\n}\n'),
    ],
)
def test_write_json_options(tmp_path, options, expected) -> None:
    write_json(str(tmp_path / "x.json"), {"z": 1, "a": {"y": 2, "x": 3}}, **options)
    assert (tmp_path / "x.json").read_text() == expected


def test_write_json_default_and_a_value_it_cannot_write(tmp_path) -> None:
    path = tmp_path / "x.json"
    write_json(str(path), {"where": Path("/runs/a")}, indent=None, default=str)
    assert path.read_text() == '{"where": "/runs/a"}\n'
    with pytest.raises(TypeError, match="not JSON serializable"):
        write_json(str(path), {"where": object()})
    assert path.read_text() == '{"where": "/runs/a"}\n'  # the old file, untouched
    assert os.listdir(tmp_path) == ["x.json"]


# -- atomic writes -------------------------------------------------------------------------------------------
def test_a_write_creates_its_folder_and_replaces_the_old_file(tmp_path) -> None:
    path = tmp_path / "a" / "b" / "file.txt"
    atomic_write_text(str(path), "first é\n")
    atomic_write_bytes(str(path), b"second")
    assert path.read_bytes() == b"second"
    assert os.listdir(path.parent) == ["file.txt"]
    atomic_write_text(str(path), "first é\n")
    assert path.read_bytes() == "first é\n".encode()


def test_a_file_gets_the_mode_of_the_umask(tmp_path) -> None:
    """Not mkstemp's owner-only mode: a checkpoint or report is as readable as any file the user creates."""
    old = os.umask(0o027)
    try:
        atomic_write_text(str(tmp_path / "f"), "x")
    finally:
        os.umask(old)
    assert (tmp_path / "f").stat().st_mode & 0o777 == 0o640


def test_a_failed_rename_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch) -> None:
    path = tmp_path / "f.json"
    atomic_write_text(str(path), "old")

    def no_rename(src, dst):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "replace", no_rename)
    with pytest.raises(OSError, match="cross-device"):
        write_json(str(path), {"new": 1})
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["f.json"]


def test_an_error_names_the_file_not_its_temporary(tmp_path) -> None:
    path = tmp_path / "f.bin"
    with pytest.raises(OSError) as raised, atomic_path(str(path)) as tmp:
        raise OSError(errno.ENOSPC, "No space left on device", tmp)
    assert raised.value.filename == str(path) and raised.value.errno == errno.ENOSPC
    # an error about another file is passed on as it is
    with pytest.raises(OSError) as raised, atomic_path(str(path)):
        raise OSError(errno.EACCES, "Permission denied", "/elsewhere")
    assert raised.value.filename == "/elsewhere"
    assert os.listdir(tmp_path) == []


def test_a_full_disk_at_fsync_names_the_file(tmp_path, monkeypatch) -> None:
    path = tmp_path / "f.bin"

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError) as raised:
        atomic_write_bytes(str(path), b"data")
    assert raised.value.filename == str(path) and raised.value.errno == errno.ENOSPC
    assert os.listdir(tmp_path) == []


def test_a_folder_in_the_way_is_said_of_the_path(tmp_path) -> None:
    (tmp_path / "report.json").mkdir()
    with pytest.raises(IsADirectoryError) as raised:
        write_json(str(tmp_path / "report.json"), {})
    assert raised.value.filename == str(tmp_path / "report.json")
    assert os.listdir(tmp_path) == ["report.json"]


def test_a_temporary_name_is_in_the_same_folder_and_recognised(tmp_path) -> None:
    name = temporary_name(str(tmp_path / "last.ckpt"))
    assert os.path.dirname(name) == str(tmp_path)  # the rename never crosses file systems
    assert os.path.basename(name).startswith(f".last.ckpt.{os.getpid()}.") and name.endswith(".tmp")
    assert TEMPORARY.search(os.path.basename(name))
    assert name != temporary_name(str(tmp_path / "last.ckpt"))


# -- what killed writers leave behind ------------------------------------------------------------------------
def test_stale_temporaries_are_removed_and_everything_else_is_kept(tmp_path) -> None:
    dead, alive = a_dead_pid(), os.getpid()
    stale = [
        f".report.json.{dead}.0123abcd.tmp",  # ours, its writer gone
        ".tmp-k2j3h4",  # mkstemp's
        "sub/last.ckpt.tmp",  # an older strip_training_state's
        f"sub/deeper/.best.ckpt.{dead}.89abcdef.tmp",
    ]
    kept = [
        f".report.json.{alive}.0123abcd.tmp",  # a writer that still runs
        "report.json",
        ".hidden",
        "notes.tmp",
        f"sub/.x.{dead}.0123ABCD.tmp",  # not eight lower-case hex digits: not a name we make
    ]
    for name in stale + kept:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    remove_stale_temporaries(str(tmp_path))
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert left == sorted(kept)


def test_links_to_other_folders_are_not_followed(tmp_path) -> None:
    """A store's stage folders are linked into run folders; the store's own lock cleans them."""
    store = tmp_path / "store" / "generalist-abc"
    store.mkdir(parents=True)
    theirs = store / f".last.ckpt.{a_dead_pid()}.0123abcd.tmp"
    theirs.write_text("x")
    run = tmp_path / "run"
    run.mkdir()
    (run / "generalist").symlink_to(store, target_is_directory=True)
    remove_stale_temporaries(str(run))
    assert theirs.exists()
    remove_stale_temporaries(str(tmp_path / "store"))
    assert not theirs.exists()


def test_process_alive() -> None:
    assert process_alive(os.getpid())
    assert process_alive(1)  # exists, whoever owns it
    assert not process_alive(a_dead_pid())
