"""Nothing a user hands in runs code: planted checkpoints and caches through every path that reads them.

A planted file is a real checkpoint with one extra object whose unpickling runs `touch MARKER` (what a full
`torch.load(weights_only=False)` does with it is shown first). Each path must refuse it in one line (exit 2)
and leave the marker uncreated. Real checkpoints, including one written by an earlier revision, still load.
"""

from __future__ import annotations

import importlib
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, TINY_ARGS, run_subprocess_env
from helpers.cli import assert_clean_failure, run_main

import askexpert.modules
from askexpert.cli import cli_main
from askexpert.collab import logits as logits_module
from askexpert.errors import UserError
from askexpert.files.checkpoint_io import AtomicCheckpointIO
from askexpert.files.checkpoints import ALLOWED_CLASS_PATHS, MODULE_CLASSES, check_class_path, load_checkpoint
from askexpert.modules import loading
from askexpert.modules.loading import load_classifier
from datamodules.datamodule import ImageDataModule

UNSAFE = "could run code when loaded"
# a revision from before safe loading (issue 13), whose checkpoints must still load
OLD_REVISION = "b857ce3"


class RunsCode:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def plant(source: Path, target: Path, marker: Path) -> Path:
    """A copy of the checkpoint `source` carrying an object that runs code when fully unpickled."""
    checkpoint = torch.load(source, weights_only=True)
    checkpoint["hyper_parameters"]["note"] = RunsCode(marker)
    torch.save(checkpoint, target)
    return target


def with_entries(source: Path, target: Path, **entries) -> Path:
    """A copy of `source` with top-level or (`hyper_parameters__KEY`) hyper-parameter entries replaced."""
    checkpoint = torch.load(source, weights_only=True)
    for key, value in entries.items():
        if key.startswith("hyper_parameters__"):
            checkpoint["hyper_parameters"][key.split("__", 1)[1]] = value
        else:
            checkpoint[key] = value
    torch.save(checkpoint, target)
    return target


@pytest.fixture
def run(tiny_generalist_run) -> Path:
    """The session's tiny generalist run (1 epoch: last.ckpt with optimizer, schedulers, loops and callback
    states); read-only."""
    return tiny_generalist_run


@pytest.fixture
def planted(run, tmp_path) -> tuple[Path, Path]:
    marker = tmp_path / "MARKER"
    return plant(run / "checkpoints" / "last.ckpt", tmp_path / "planted.ckpt", marker), marker


def test_the_planted_file_runs_code_when_fully_unpickled(run, tmp_path):
    """The control: what every path below must avoid really happens with a plain `torch.load`."""
    marker = tmp_path / "control"
    path = plant(run / "checkpoints" / "last.ckpt", tmp_path / "control.ckpt", marker)
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("command", ["fit", "validate", "test", "predict"])
def test_ckpt_path(command, planted, tmp_path, capsys):
    path, marker = planted
    run_dir = tmp_path / "run"
    args = [command, *TINY_ARGS, "--trainer.default_root_dir", str(run_dir), "--ckpt_path", str(path)]
    code, _, err = run_main(args, capsys)
    assert_clean_failure(code, err, run_dir, UNSAFE, str(path), "posix.system")
    assert not marker.exists()


def test_lightning_own_reads_are_weights_only(planted, tmp_path, capsys, monkeypatch):
    """What Lightning resolves itself (`--ckpt_path hpc` here) goes through AtomicCheckpointIO's safe read, even
    when the caller or the environment asks for a full unpickle."""
    path, marker = planted
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    os.replace(path, run_dir / "hpc_ckpt_1.ckpt")
    args = ["validate", *TINY_ARGS, "--trainer.default_root_dir", str(run_dir), "--ckpt_path", "hpc"]
    code, _, err = run_main(args, capsys)
    assert code == 2 and err.strip().splitlines()[-1].startswith("askexpert: error: refusing checkpoint")
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(UserError, match=UNSAFE):
        AtomicCheckpointIO().load_checkpoint(run_dir / "hpc_ckpt_1.ckpt", weights_only=False)
    assert not marker.exists()


def test_partition_generalist(planted, tmp_path, capsys):
    path, marker = planted
    out = tmp_path / "partition.json"
    args = ["partition", "--method", "confusion", "--generalist", str(path), "--out", str(out)]
    code, _, err = run_main(
        [*args, "--data.synthetic_train_per_class", "10", "--data.synthetic_test_per_class", "2"], capsys
    )
    assert_clean_failure(code, err, out, UNSAFE)
    assert not marker.exists()


def test_expert_base_path(planted, tiny_pipeline_run, tmp_path, capsys):
    path, marker = planted
    partition = tiny_pipeline_run[1] / "partition.json"  # read-only
    run_dir = tmp_path / "expert"
    args = ["fit", *TINY_ARGS, "--model", "askexpert.modules.ExpertModule", "--model.base_path", str(path)]
    args += ["--partition", str(partition), "--expert_index", "0", "--trainer.default_root_dir", str(run_dir)]
    code, _, err = run_main(args, capsys)
    assert_clean_failure(code, err, run_dir, UNSAFE)
    assert not marker.exists()


def test_pretrained_path(run, tmp_path, capsys):
    """`--model.pretrained_path` is read by askexpert's safe loader (weights_only=True) before timm sees it."""
    marker = tmp_path / "MARKER"
    state = {k[len("net.") :]: v for k, v in torch.load(run / "checkpoints" / "best.ckpt")["state_dict"].items()}
    state["note"] = RunsCode(marker)
    torch.save(state, tmp_path / "weights.pth")
    run_dir = tmp_path / "run"
    args = ["fit", *TINY_ARGS, "--model.pretrained", "true", "--model.pretrained_path", str(tmp_path / "weights.pth")]
    code, _, err = run_main([*args, "--trainer.default_root_dir", str(run_dir)], capsys)
    assert_clean_failure(code, err, run_dir, "refusing checkpoint", "weights.pth", "could run code")
    assert not marker.exists()


@pytest.mark.parametrize(
    "entries",
    [
        {"askexpert_class": "os.system"},
        {"askexpert_class": "this.s"},  # importing `this` prints the Zen of Python: an import runs code
        {"hyper_parameters___class_path": "subprocess.Popen"},  # what LightningCLI builds for --ckpt_path
    ],
    ids=["askexpert_class-function", "askexpert_class-other-module", "_class_path"],
)
def test_classes_named_in_a_checkpoint_are_only_our_modules(entries, run, tmp_path, capsys):
    path = with_entries(run / "checkpoints" / "best.ckpt", tmp_path / "named.ckpt", **entries)
    named = next(iter(entries.values()))
    with pytest.raises(UserError, match=f"names the class '{named}', which is not an askexpert module"):
        load_classifier(str(path))
    run_dir = tmp_path / "run"
    args = ["validate", *TINY_ARGS, "--trainer.default_root_dir", str(run_dir), "--ckpt_path", str(path)]
    code, _, err = run_main(args, capsys)
    assert_clean_failure(code, err, run_dir, named, "not an askexpert module")
    assert "this" not in sys.modules


def test_the_allow_list_names_exactly_our_modules():
    """MODULE_CLASSES is data (checkpoints.py must not import the modules): it has to follow askexpert.modules."""
    assert list(MODULE_CLASSES) == list(askexpert.modules.__all__)  # same names, same order as the refusal lists
    for name, defined in MODULE_CLASSES.items():
        cls = getattr(askexpert.modules, name)
        module, _, attribute = defined.rpartition(".")
        assert getattr(importlib.import_module(module), attribute) is cls, defined
        # what a checkpoint records as `askexpert_class` (ClassifierModule.on_save_checkpoint)
        assert f"{cls.__module__}.{cls.__qualname__}" == defined
    public = {f"askexpert.modules.{name}" for name in askexpert.modules.__all__}
    assert ALLOWED_CLASS_PATHS == public | set(MODULE_CLASSES.values())
    for path in ALLOWED_CLASS_PATHS:
        assert check_class_path(path, "x.ckpt") == path


@pytest.mark.parametrize(
    "class_path",
    [
        "this.s",
        "askexpert.modules.classifier.torch",  # a module of ours, but not one of its classes
        "askexpert.modules.ExpertModule.__init__",
        "askexpert.modules.expert.ExpertModule ",
        ["askexpert.modules.ExpertModule"],
    ],
)
def test_a_class_outside_the_list_is_refused_before_anything_is_imported(class_path, tmp_path, monkeypatch):
    imported = []
    monkeypatch.setattr(importlib, "import_module", lambda name, *args: imported.append(name))
    path = tmp_path / "named.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {}, "askexpert_class": class_path}, path)
    refusal = f"checkpoint {path} names the class {class_path!r}, which is not an askexpert module"
    for read in (load_checkpoint, load_classifier, lambda name: loading.module_class(class_path, name)):
        with pytest.raises(UserError, match=f"^{re.escape(refusal)} .*; refusing to load it$"):
            read(str(path))
    assert imported == []


def test_cached_logits_are_never_unpickled(run, tmp_path, capsys, monkeypatch):
    """`evaluate` reads a run's logits cache through `cached_logits`: an old-format pickle (here a planted one)
    is never opened, a damaged safetensors file is recomputed, and the new cache is read back without the model."""
    marker = tmp_path / "MARKER"
    cache = tmp_path / "logits"
    cache.mkdir()
    torch.save({"key": {}, "logits": RunsCode(marker)}, cache / "generalist_test.pt")
    (cache / "generalist_val.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    datamodule = ImageDataModule(source="synthetic", synthetic_train_per_class=10, synthetic_test_per_class=2)
    datamodule.setup()
    monkeypatch.setattr(logits_module, "_noted_old_caches", set())
    best = str(run / "checkpoints" / "best.ckpt")
    first = logits_module.cached_logits("generalist", best, datamodule, ("val", "test"), str(cache))
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "pickles (*.pt), which are never loaded" in notes[0]
    assert not marker.exists()

    def no_model(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(logits_module, "load_classifier", no_model)
    again = logits_module.cached_logits("generalist", best, datamodule, ("val", "test"), str(cache))
    for split in ("val", "test"):
        assert torch.equal(first["logits"][split], again["logits"][split])
        assert torch.equal(again["labels"][split], datamodule.tensors(split)[1])
    assert again["meta"]["class"] == "GeneralistModule"
    assert (cache / "generalist_test.pt").exists()  # the user's file is left alone (the note says it can go)


def test_our_checkpoints_hold_nothing_but_tensors_and_plain_values(run):
    """What keeps the allow-list empty: a new object in a checkpoint (a callback's state, ...) fails here first."""
    for name in ("last.ckpt", "best.ckpt"):
        assert torch.serialization.get_unsafe_globals_in_checkpoint(str(run / "checkpoints" / name)) == []
    assert load_checkpoint(str(run / "checkpoints" / "last.ckpt"))["optimizer_states"]


def test_real_checkpoints_resume_evaluate_and_load(run, tmp_path, capsys):
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    folder = ["--trainer.default_root_dir", str(resumed)]
    cli_main(["fit", *TINY_ARGS, *folder, "--trainer.max_epochs", "2", "--ckpt_path", "last"])
    assert load_checkpoint(str(resumed / "checkpoints" / "last.ckpt"))["epoch"] == 1
    best = resumed / "checkpoints" / "best.ckpt"
    code, out, _ = run_main(["test", *TINY_ARGS, *folder, "--ckpt_path", str(best)], capsys)
    assert code == 0 and "GeneralistModule test accuracy" in out
    model = load_classifier(str(best))
    assert type(model).__name__ == "GeneralistModule" and not model.training


def _old_revision_source(tmp_path: Path) -> Path:
    """The package as it was at OLD_REVISION (from this clone's history), or skip where the history is absent."""
    try:
        subprocess.run(
            ["git", "-C", str(REPO), "cat-file", "-e", f"{OLD_REVISION}^{{commit}}"], check=True, capture_output=True
        )
    except (OSError, subprocess.CalledProcessError):
        pytest.skip(f"revision {OLD_REVISION} is not in this clone's history")
    folder = tmp_path / "old"
    folder.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", OLD_REVISION, "askexpert", "datamodules", "strategies"],
        check=True,
        capture_output=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder


@pytest.mark.slow  # ~20 s of CPU: a second Python process importing torch, Lightning and timm
def test_a_checkpoint_of_an_earlier_revision_still_loads_and_resumes(tmp_path):
    """Written by OLD_REVISION's own code: it loads through the safe loader as it is (no migration needed)."""
    old = _old_revision_source(tmp_path)
    folder = ["--trainer.default_root_dir", str(tmp_path / "old_run")]
    env = {**run_subprocess_env(), "PYTHONPATH": str(old)}
    subprocess.run([sys.executable, "-m", "askexpert", "fit", *TINY_ARGS, *folder], env=env, cwd=old, check=True)
    checkpoints = tmp_path / "old_run" / "checkpoints"
    assert load_classifier(str(checkpoints / "best.ckpt")).hparams.model_name == "vit_micro_patch8_32"
    cli_main(["fit", *TINY_ARGS, *folder, "--trainer.max_epochs", "2", "--ckpt_path", "last"])
    assert load_checkpoint(str(checkpoints / "last.ckpt"))["epoch"] == 1
