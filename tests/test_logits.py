"""askexpert/collab/logits.py: the logits cache. A file is reused only for the same checkpoint content and the same
data split; a shared cache names files by checkpoint hash; caches of the pickle era (`*.pt`) are never opened.
(That a planted pickle or a damaged file cannot run code: tests/test_safe_loading.py.)"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from askexpert.collab import logits as logits_module
from askexpert.collab.logits import CACHE_VERSION, HEADER, cached_logits, read_cache_file
from askexpert.files.hashing import file_sha256
from datamodules.datamodule import ImageDataModule

TINY_DATA = {"source": "synthetic", "synthetic_train_per_class": 10, "synthetic_test_per_class": 2}


@pytest.fixture(scope="module")
def datamodule() -> ImageDataModule:
    """The data of the session's tiny generalist (conftest.TINY_ARGS)."""
    data = ImageDataModule(**TINY_DATA)
    data.setup()
    return data


@pytest.fixture
def checkpoint(tiny_generalist_run, tmp_path) -> str:
    """A copy of the session generalist's best.ckpt (read-only there)."""
    return str(shutil.copy(tiny_generalist_run / "checkpoints" / "best.ckpt", tmp_path / "generalist.ckpt"))


@pytest.fixture
def loads(monkeypatch) -> list[str]:
    """The checkpoints cached_logits loads a model from (a cache hit loads none)."""
    loaded, real = [], logits_module.load_classifier
    monkeypatch.setattr(logits_module, "load_classifier", lambda path, **kw: loaded.append(path) or real(path, **kw))
    return loaded


def write_cache(path, logits, labels, header) -> None:
    save_file({"logits": logits, "labels": labels}, str(path), metadata=header)


# -- one cache file ------------------------------------------------------------------------------------------
def test_a_cache_file_is_read_back_whole(tmp_path) -> None:
    logits, labels = torch.randn(5, 3), torch.tensor([0, 2, 1, 1, 0])
    header = {HEADER: json.dumps({"key": {"a": [1, 2]}, "meta": {"class": "X"}})}
    write_cache(tmp_path / "g_val.safetensors", logits, labels, header)
    saved = read_cache_file(str(tmp_path / "g_val.safetensors"))
    assert saved["key"] == {"a": [1, 2]} and saved["meta"] == {"class": "X"}
    assert torch.equal(saved["logits"], logits) and torch.equal(saved["labels"], labels)


@pytest.mark.parametrize(
    "logits, labels, header",
    [
        (torch.randn(5, 3), torch.zeros(4, dtype=torch.long), None),  # one label short
        (torch.randn(5), torch.zeros(5, dtype=torch.long), None),  # not (N, K)
        (torch.randn(5, 3), torch.zeros(5, 1, dtype=torch.long), None),
        (torch.randn(5, 3), torch.zeros(5, dtype=torch.long), {}),  # not ours: no header
        (torch.randn(5, 3), torch.zeros(5, dtype=torch.long), {HEADER: "{not json"}),
        (torch.randn(5, 3), torch.zeros(5, dtype=torch.long), {HEADER: json.dumps({"key": {}, "meta": []})}),
    ],
)
def test_a_cache_file_that_is_not_ours_or_not_whole_is_not_used(tmp_path, logits, labels, header) -> None:
    header = {HEADER: json.dumps({"key": {}, "meta": {}})} if header is None else header
    write_cache(tmp_path / "x.safetensors", logits, labels, header)
    assert read_cache_file(str(tmp_path / "x.safetensors")) is None
    assert read_cache_file(str(tmp_path / "absent.safetensors")) is None
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "x.safetensors").read_bytes()[:-3])
    assert read_cache_file(str(tmp_path / "cut.safetensors")) is None


# -- cached_logits -------------------------------------------------------------------------------------------
def test_logits_are_computed_once_and_read_back(checkpoint, datamodule, tmp_path, loads) -> None:
    cache = tmp_path / "logits"
    first = cached_logits("generalist", checkpoint, datamodule, ("val", "test"), str(cache))
    assert loads == [checkpoint]
    assert sorted(p.name for p in cache.iterdir()) == ["generalist_test.safetensors", "generalist_val.safetensors"]
    for split in ("val", "test"):
        labels = datamodule.tensors(split)[1]
        assert first["logits"][split].shape == (len(labels), datamodule.num_classes)
        assert torch.equal(first["labels"][split], labels)
    meta = first["meta"]
    assert (meta["class"], meta["model_name"], meta["num_classes"], meta["num_outputs"]) == (
        "GeneralistModule",
        "vit_micro_patch8_32",
        datamodule.num_classes,
        datamodule.num_classes,
    )
    saved = read_cache_file(str(cache / "generalist_val.safetensors"))
    assert saved["key"]["version"] == CACHE_VERSION
    assert saved["key"]["checkpoint"]["sha256"] == file_sha256(checkpoint)
    assert saved["key"]["data"]["split"] == "val" and saved["key"]["data"]["size"] == len(first["labels"]["val"])

    again = cached_logits("generalist", checkpoint, datamodule, ("test", "val"), str(cache))
    assert loads == [checkpoint]  # no model loaded: both splits came from the files
    assert again["meta"] == meta
    for split in ("val", "test"):
        assert torch.equal(again["logits"][split], first["logits"][split])


def test_the_cache_is_keyed_by_checkpoint_content_not_path(checkpoint, datamodule, tmp_path, loads) -> None:
    cache = str(tmp_path / "logits")
    cached_logits("generalist", checkpoint, datamodule, ("val",), cache)
    moved = str(shutil.copy(checkpoint, tmp_path / "moved.ckpt"))  # a run folder moved or copied
    cached_logits("generalist", moved, datamodule, ("val",), cache)
    assert loads == [checkpoint]

    retrained = torch.load(checkpoint, weights_only=True)  # another checkpoint under the same name
    retrained["state_dict"] = {k: v + 0.01 for k, v in retrained["state_dict"].items()}
    torch.save(retrained, checkpoint)
    changed = cached_logits("generalist", checkpoint, datamodule, ("val",), cache)
    assert loads == [checkpoint, checkpoint]
    assert read_cache_file(f"{cache}/generalist_val.safetensors")["key"]["checkpoint"]["sha256"] == file_sha256(
        checkpoint
    )
    assert changed["logits"]["val"].shape[0] == len(datamodule.tensors("val")[1])


def test_other_data_is_another_key(checkpoint, datamodule, tmp_path, loads) -> None:
    cache = str(tmp_path / "logits")
    cached_logits("generalist", checkpoint, datamodule, ("test",), cache)
    other = ImageDataModule(**{**TINY_DATA, "synthetic_test_per_class": 3})
    other.setup()
    result = cached_logits("generalist", checkpoint, other, ("test",), cache)
    assert loads == [checkpoint, checkpoint]
    assert len(result["logits"]["test"]) == len(other.tensors("test")[1]) != len(datamodule.tensors("test")[1])


def test_a_shared_cache_names_files_by_checkpoint_hash(checkpoint, datamodule, tmp_path, loads) -> None:
    """An ablation's store: one name (`generalist`) has a checkpoint per cell, each keeps its own files."""
    cache = tmp_path / "logits"
    other = tmp_path / "other.ckpt"
    state = torch.load(checkpoint, weights_only=True)
    state["state_dict"] = {k: v * 0.5 for k, v in state["state_dict"].items()}
    torch.save(state, other)
    for path in (checkpoint, str(other), checkpoint, str(other)):
        cached_logits("generalist", path, datamodule, ("val",), str(cache), by_checkpoint=True)
    assert loads == [checkpoint, str(other)]
    expected = sorted(f"generalist-{file_sha256(p)[:16]}_val.safetensors" for p in (checkpoint, str(other)))
    assert sorted(p.name for p in cache.iterdir()) == expected


def test_an_old_pickle_cache_is_never_opened(checkpoint, datamodule, tmp_path, loads, monkeypatch, capsys) -> None:
    cache = tmp_path / "logits"
    cache.mkdir()
    for split in ("val", "test"):
        (cache / f"generalist_{split}.pt").write_bytes(b"not even a pickle")
    monkeypatch.setattr(logits_module, "_noted_old_caches", set())
    opened = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda f, *a, **k: opened.append(str(f)) or real_load(f, *a, **k))
    cached_logits("generalist", checkpoint, datamodule, ("val", "test"), str(cache))
    assert not [path for path in opened if path.endswith(".pt")]
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note: ")]
    assert notes == [
        f"note: {cache} holds logits cached by an earlier askexpert as pickles (*.pt), which are never loaded (a "
        "pickle can run code); recomputing them as .safetensors files (the *.pt files can be deleted)"
    ]  # one line per folder, not one per file
    assert loads == [checkpoint] and (cache / "generalist_val.pt").exists()
