"""askexpert/ablation/store.py: a stage kept once under its identity, its done marker, and the relative links that
put it into each run folder. (Two ablations on one store: tests/test_ablate.py.)"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from askexpert.ablation.store import StageStore
from askexpert.pipeline.stages import Stage, StageKind


def stage(name: str, identity: str = "0123abcd", **config) -> Stage:
    """A planned stage as the store sees it (its kind is the first part of its name)."""
    return Stage(name, StageKind(name.split("/")[0]), config, [], identity=identity)


def test_where_each_kind_of_stage_is_kept(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    store = StageStore("store")
    assert store.root == str(tmp_path / "store")  # absolute: runs in other folders link to it
    assert store.path(stage("generalist")) == str(tmp_path / "store" / "generalist-0123abcd")
    assert store.path(stage("experts/1", "ff")) == str(tmp_path / "store" / "experts-1-ff")
    assert store.path(stage("partition", "9a")) == str(tmp_path / "store" / "partition-9a.json")
    assert store.logits == str(tmp_path / "store" / "logits")
    assert store.path(stage("base", "a")) != store.path(stage("base", "b"))


def test_a_stage_is_done_only_between_mark_done_and_mark_not_done(tmp_path) -> None:
    store = StageStore(str(tmp_path))
    base = stage("experts/0", "beef", lr=0.1, root=Path("/data"))
    assert not store.is_done(base)
    store.mark_not_done(base)  # nothing to remove: not an error
    store.mark_done(base)
    assert store.is_done(base) and not store.is_done(stage("experts/0", "other"))
    marker = tmp_path / "experts-0-beef.done"
    assert json.loads(marker.read_text()) == {
        "name": "experts/0",
        "identity": "beef",
        "config": {"lr": 0.1, "root": "/data"},
    }
    assert marker.read_text().endswith("}\n") and "\n" not in marker.read_text()[:-1]
    store.mark_not_done(base)
    assert not store.is_done(base) and sorted(os.listdir(tmp_path)) == []


def test_a_link_is_relative_so_the_folder_can_move(tmp_path) -> None:
    store = StageStore(str(tmp_path / "ablation" / "store"))
    target = Path(store.path(stage("generalist")))
    target.mkdir(parents=True)
    (target / "best.ckpt").write_text("weights")
    link = tmp_path / "ablation" / "runs" / "cell" / "seed_0" / "generalist"
    store.link(str(target), str(link))
    assert os.readlink(link) == "../../../store/generalist-0123abcd"
    shutil.move(tmp_path / "ablation", tmp_path / "moved")
    assert (tmp_path / "moved" / "runs" / "cell" / "seed_0" / "generalist" / "best.ckpt").read_text() == "weights"


def test_linking_again_changes_nothing_or_replaces_what_is_there(tmp_path) -> None:
    store = StageStore(str(tmp_path / "store"))
    first, second = Path(store.path(stage("base", "1"))), Path(store.path(stage("base", "2")))
    first.mkdir(parents=True)
    second.mkdir()
    link = tmp_path / "run" / "base"
    store.link(str(first), str(link))
    made = os.lstat(link).st_ino
    store.link(str(first), str(link))
    assert os.lstat(link).st_ino == made  # the same link: left as it was
    store.link(str(second), str(link))
    assert link.resolve() == second.resolve()

    logits = tmp_path / "run" / "logits"  # a cache the run made before it joined the store
    logits.mkdir()
    (logits / "generalist_val.safetensors").write_text("x")
    store.link(store.logits, str(logits))
    assert logits.is_symlink() and os.readlink(logits) == "../store/logits"
    report = tmp_path / "run" / "partition.json"
    report.write_text("{}")
    store.link(store.path(stage("partition", "3")), str(report))
    assert report.is_symlink() and os.readlink(report) == "../store/partition-3.json"


def test_a_link_made_through_a_linked_folder_still_points_right(tmp_path) -> None:
    """The run folder is reached through a symlink (`runs -> /big/disk/runs`): the relative path is computed
    between real paths, or it would count the wrong number of `..`."""
    (tmp_path / "disk" / "deep" / "runs").mkdir(parents=True)
    (tmp_path / "runs").symlink_to(tmp_path / "disk" / "deep" / "runs", target_is_directory=True)
    store = StageStore(str(tmp_path / "store"))
    target = Path(store.path(stage("generalist")))
    target.mkdir(parents=True)
    link = tmp_path / "runs" / "a" / "generalist"
    store.link(str(target), str(link))
    assert link.resolve() == target.resolve()


@pytest.mark.parametrize("name", ["generalist", "experts/0"])
def test_a_marker_sits_next_to_its_stage(tmp_path, name) -> None:
    store = StageStore(str(tmp_path))
    one = stage(name)
    store.mark_done(one)
    assert Path(store.path(one) + ".done").exists()
