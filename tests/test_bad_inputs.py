"""Issue 13's bad inputs: each gives exactly one `askexpert: error:` line, no traceback, exit status 2, and
writes nothing. OSErrors (a read-only folder, a full disk, a file or folder in the wrong place), a checkpoint
of another class set, a partition that contradicts itself, a confusion partition from the wrong checkpoint or
data, a damaged pipeline.yaml, a wrong-kind expert in a run, and the parsers' hints.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import TINY_ARGS
from helpers.cli import assert_clean_failure, one_line, run_main
from helpers.datasets import make_folder

from askexpert.errors import os_error_message

AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0  # root ignores file permissions: chmod proves nothing


@pytest.fixture(scope="module")
def trained(tiny_generalist_run, tiny_pipeline_run):
    """The session's tiny generalist, and the 2-expert superclass partition and first progressive expert of the
    session's tiny pipeline (all read-only)."""
    _, run = tiny_pipeline_run
    return {
        "generalist": tiny_generalist_run / "checkpoints" / "best.ckpt",
        "expert": run / "experts" / "progressive" / "0" / "checkpoints" / "best.ckpt",
        "partition": run / "partition.json",
    }


def files_under(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# -- OSErrors: read-only folders, a full disk, files and folders in the wrong place ----------------------------
def partition_args(out: Path) -> list[str]:
    return ["partition", "--num_experts", "2", "--data.synthetic_train_per_class", "10", "--out", str(out)]


@pytest.mark.skipif(AS_ROOT, reason="root ignores permissions (covered by the monkeypatched tests below)")
def test_a_read_only_folder_is_one_line(tmp_path, capsys):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        code, _, err = run_main(partition_args(folder / "p.json"), capsys)
        one_line(code, err, f"--out {folder / 'p.json'}: no permission to write in {folder}")
        code, _, err = run_main(["fit", *TINY_ARGS, "--trainer.default_root_dir", str(folder / "run")], capsys)
        one_line(code, err, f"no permission to write in {folder}")
        assert list(folder.iterdir()) == []
    finally:
        folder.chmod(0o755)


def deny_writes_in(monkeypatch, folder: Path) -> None:
    """What a read-only `folder` looks like to a process (as root too): no write access, EACCES on creation."""
    real_access, real_makedirs = os.access, os.makedirs

    def access(path, mode, *args, **kwargs):
        if os.path.abspath(path) == str(folder) and mode & os.W_OK:
            return False
        return real_access(path, mode, *args, **kwargs)

    def makedirs(name, *args, **kwargs):
        if os.path.dirname(os.path.abspath(name)) == str(folder) and not os.path.isdir(name):
            raise PermissionError(errno.EACCES, "Permission denied", name)
        return real_makedirs(name, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)
    monkeypatch.setattr(os, "makedirs", makedirs)


def test_a_read_only_folder_is_refused_before_anything_runs(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "ro"
    folder.mkdir()
    deny_writes_in(monkeypatch, folder)
    code, _, err = run_main(partition_args(folder / "p.json"), capsys)
    one_line(code, err, f"--out {folder / 'p.json'}: no permission to write in {folder}")
    code, _, err = run_main(["fit", *TINY_ARGS, "--trainer.default_root_dir", str(folder / "run")], capsys)
    one_line(code, err, "--trainer.default_root_dir", f"no permission to write in {folder}")
    code, _, err = run_main(
        ["profile", "--models", "vit_micro_patch8_32", "--out", str(folder / "p.yaml"), "--min_run_time", "0.01"],
        capsys,
    )
    one_line(code, err, f"no permission to write in {folder}")
    assert list(folder.iterdir()) == []


def test_a_denied_write_the_checks_could_not_foresee_is_one_line(tmp_path, capsys, monkeypatch):
    """The EACCES itself (a folder that turned read-only after the check, an ACL, a sandbox): main names the folder."""
    folder = tmp_path / "ro"
    folder.mkdir()
    real_makedirs = os.makedirs

    def makedirs(name, *args, **kwargs):
        if os.path.dirname(os.path.abspath(name)) == str(folder):
            raise PermissionError(errno.EACCES, "Permission denied", name)
        return real_makedirs(name, *args, **kwargs)

    monkeypatch.setattr(os, "makedirs", makedirs)
    code, _, err = run_main(partition_args(folder / "sub" / "p.json"), capsys)
    assert one_line(code, err) == f"askexpert: error: cannot write in {folder}: Permission denied"
    assert list(folder.iterdir()) == []


def test_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)  # where a full disk shows up at the latest: the data is flushed
    out = tmp_path / "out"
    code, _, err = run_main(partition_args(out / "p.json"), capsys)
    one_line(code, err, "No space left on device", "free some space")
    assert files_under(tmp_path) == {}


@pytest.mark.parametrize(
    "error, expected",
    [
        (OSError(errno.ENOSPC, "No space left on device", "/d/x.ckpt"), "cannot write /d/x.ckpt: No space left"),
        (OSError(errno.EROFS, "Read-only file system", "/d/x"), "cannot write /d/x: Read-only file system"),
        (IsADirectoryError(errno.EISDIR, "Is a directory", "/d/x.csv"), "cannot use /d/x.csv: Is a directory"),
        (NotADirectoryError(errno.ENOTDIR, "Not a directory", "/d/f/x"), "cannot use /d/f/x: Not a directory"),
        (FileExistsError(errno.EEXIST, "File exists", "/d/run"), "cannot use /d/run: File exists"),
        (OSError(errno.EXDEV, "Invalid cross-device link", "/a", None, "/b"), "cannot use /a -> /b: Invalid cross"),
    ],
)
def test_os_errors_name_their_path(error, expected):
    assert os_error_message(error).startswith(expected)
    wrapped = ValueError("jsonargparse wrapped it")
    wrapped.__cause__ = error
    assert os_error_message(wrapped).startswith(expected)


def test_bugs_keep_their_traceback(monkeypatch, capsys):
    import askexpert.cli as cli

    for bug in (KeyError("bug"), ConnectionResetError(errno.ECONNRESET, "reset"), OSError("no errno")):

        def broken(bug=bug):
            raise bug

        monkeypatch.setattr(cli, "cli_main", broken)
        with pytest.raises(type(bug)):
            run_main(["fit"], capsys)
    # a bug raised while handling an OSError is still a bug (its OSError is only the context)
    try:
        try:
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", "x")
        except OSError:
            raise KeyError("bug") from None
    except KeyError as err:
        assert os_error_message(err) is None


def test_outputs_in_the_wrong_place(trained, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("mine")
    folder = tmp_path / "folder"
    folder.mkdir()
    before = files_under(tmp_path)
    for args, fragments in (
        (partition_args(folder), [f"--out {folder} is a folder; give a file name"]),
        (partition_args(afile / "p.json"), [f"{afile} is a file, not a folder"]),
        (["profile", "--models", "vit_micro_patch8_32", "--out", str(folder)], ["is a folder"]),
        (["profile", "--models", "vit_micro_patch8_32", "--out", str(afile / "p.yaml")], ["is a file, not a folder"]),
        (["fit", *TINY_ARGS, "--trainer.default_root_dir", str(afile)], [f"{afile} is a file; give a folder"]),
        (["fit", *TINY_ARGS, "--trainer.default_root_dir", str(afile / "run")], ["is a file, not a folder"]),
        (
            [
                "predict",
                *TINY_ARGS,
                "--ckpt_path",
                str(trained["generalist"]),
                "--prediction_writer.output",
                str(folder),
                "--trainer.default_root_dir",
                str(tmp_path / "run"),
            ],
            ["--prediction_writer.output", "is a folder"],
        ),
    ):
        code, _, err = run_main(args, capsys)
        one_line(code, err, *fragments)
    assert files_under(tmp_path) == before and list(folder.iterdir()) == []


# -- a checkpoint of another class set in validate / test / predict -----------------------------------------------
@pytest.mark.parametrize("command", ["validate", "test", "predict"])
def test_a_checkpoint_of_another_class_count(trained, tmp_path, capsys, command):
    images = make_folder(tmp_path / "images")  # 3 classes; the checkpoint knows 100
    run_dir = tmp_path / "run"
    args = [command, *TINY_ARGS, "--data.source", "imagefolder", "--data.root", str(images), "--data.val_fraction", "0"]
    code, _, err = run_main(
        [*args, "--ckpt_path", str(trained["generalist"]), "--trainer.default_root_dir", str(run_dir)], capsys
    )
    assert_clean_failure(code, err, run_dir, "was trained on 100 classes", "(3 classes)")


# -- partition files that contradict themselves --------------------------------------------------------------
def damaged_partitions(raw: dict) -> list[tuple[dict, str]]:
    cases = []

    def case(change, message):
        copy = json.loads(json.dumps(raw))
        change(copy)
        cases.append((copy, message))

    case(lambda p: p.update(num_classes=99), "num_classes is 99 but class_names lists 100 classes")
    case(lambda p: p["experts"][1].update(index=0), "expert 1 says index 0")
    first = raw["experts"][0]["classes"][0]
    case(lambda p: p["experts"][0]["names"].__setitem__(0, "zebra_x"), f"expert 0 names class {first} 'zebra_x'")
    case(lambda p: p["experts"][0]["names"].pop(), "expert 0 lists")
    case(lambda p: p.update(details=[1]), "details must be a mapping")
    case(lambda p: p["class_names"].__setitem__(3, 7), "class_names texts")
    return cases


def test_a_partition_that_contradicts_itself(trained, tmp_path, capsys):
    raw = json.loads(trained["partition"].read_text())
    for i, (damaged, message) in enumerate(damaged_partitions(raw)):
        path = tmp_path / f"p{i}.json"
        path.write_text(json.dumps(damaged))
        run_dir = tmp_path / "run"
        if i < 2:  # an expert's `fit` (a full CLI parse: slower) and the `experts` command read the same loader
            args = ["fit", *TINY_ARGS, "--model", "askexpert.modules.ExpertModule", "--model.init", "scratch"]
            args += ["--partition", str(path), "--trainer.default_root_dir", str(run_dir)]
        else:
            args = ["experts", "--partition", str(path), "--root", str(run_dir), "--devices", "cpu"]
        code, _, err = run_main(args, capsys)
        assert_clean_failure(code, err, run_dir, message)


# -- confusion partitions: the generalist's data, never an expert -----------------------------------------------
def confusion_args(checkpoint: Path, out: Path, *extra: str) -> list[str]:
    return ["partition", "--method", "confusion", "--num_experts", "2", "--generalist", str(checkpoint), "--out",
            str(out), *extra]  # fmt: skip


def test_a_confusion_partition_uses_the_generalists_validation_split(trained, tmp_path, capsys, monkeypatch):
    import askexpert.commands.partition as command

    seen = {}
    real = command.validation_confusion

    def spy(checkpoint, datamodule):
        seen.update(datamodule.hparams)
        seen["val_images"] = datamodule.split_sizes()["val"]
        return real(checkpoint, datamodule)

    monkeypatch.setattr(command, "validation_confusion", spy)
    out = tmp_path / "p.json"
    code, stdout, err = run_main(confusion_args(trained["generalist"], out, "--data.batch_size", "32"), capsys)
    assert code == 0, err
    # the generalist trained on 10 images per class with 10 % held out: those 100 images, not the defaults' 5 000
    assert seen["synthetic_train_per_class"] == 10 and seen["val_images"] == 100
    assert seen["batch_size"] == 32  # loader settings stay the user's
    assert "synthetic_train_per_class=10" in stdout and json.loads(out.read_text())["method"] == "confusion"


def test_a_confusion_partition_refuses_contradicting_data_and_experts(trained, tmp_path, capsys):
    out = tmp_path / "p.json"
    for checkpoint, extra, fragments in (
        (trained["generalist"], ["--data.val_fraction", "0.2"], ["--data.val_fraction 0.2 (the generalist's: 0.1)"]),
        (
            trained["generalist"],
            ["--data.synthetic_train_per_class", "500", "--data.seed", "3"],
            ["synthetic_train_per_class 500 (the generalist's: 10)", "--data.seed 3 (the generalist's: 0)"],
        ),
        (trained["expert"], [], ["is an expert's checkpoint", "needs the generalist's"]),
        (trained["expert"], ["--method", "superclass", "--overlap", "1"], ["is an expert's checkpoint"]),
    ):
        code, _, err = run_main(confusion_args(checkpoint, out, *extra), capsys)
        one_line(code, err, *fragments)
        assert not out.exists()


# -- run folders: a damaged pipeline.yaml, a wrong-kind expert ---------------------------------------------------
@pytest.mark.parametrize("text", ["out: [unclosed\n", "", "- a list\n", "data: {source: synthetic}\n"])
def test_a_damaged_pipeline_yaml(tmp_path, capsys, text):
    run = tmp_path / "run"
    run.mkdir()
    (run / "pipeline.yaml").write_text(text)
    before = files_under(tmp_path)
    for args in (["evaluate", "--run", str(run)], ["profile", "--run", str(run), "--out", str(tmp_path / "p.yaml")]):
        code, _, err = run_main(args, capsys)
        line = one_line(code, err, f"{run / 'pipeline.yaml'} is damaged")
        assert "arguments are required" not in line.split("(")[0] and "--help" not in line
    assert files_under(tmp_path) == before


def fake_run(trained, folder: Path, expert_checkpoint: Path) -> Path:
    """A run layout holding the shared generalist (as generalist and base) and `expert_checkpoint` as expert 0."""
    for stage in ("generalist", "base"):
        (folder / stage / "checkpoints").mkdir(parents=True)
        shutil.copy(trained["generalist"], folder / stage / "checkpoints" / "best.ckpt")
    for i in range(2):
        (folder / "experts" / "progressive" / str(i) / "checkpoints").mkdir(parents=True)
        shutil.copy(expert_checkpoint, folder / "experts" / "progressive" / str(i) / "checkpoints" / "best.ckpt")
    shutil.copy(trained["partition"], folder / "partition.json")
    return folder


def test_evaluate_refuses_a_wrong_kind_checkpoint_before_computing_logits(trained, tmp_path):
    from askexpert.collab.evaluation import evaluate_run
    from askexpert.collab.system import RoutingConfig
    from askexpert.errors import UserError
    from askexpert.runs.layout import RunLayout

    run = fake_run(trained, tmp_path / "run", trained["expert"])  # expert 1 holds expert 0's classes
    data = {"source": "synthetic", "synthetic_train_per_class": 10, "synthetic_test_per_class": 2}
    profile = Path(__file__).resolve().parent.parent / "configs" / "profiles" / "pi4_wifi_orin.yaml"
    expert_0 = run / "experts" / "progressive" / "0" / "checkpoints" / "best.ckpt"
    # one run folder, changed between the cases (the generalist's logits are computed once and stay cached)
    for kind, change, message, wrong in (
        ("expert as base", (trained["expert"], run / "base" / "checkpoints" / "best.ckpt"), "is an expert's", "base"),
        ("generalist as expert", (trained["generalist"], expert_0), "is not an expert's", "progressive_0"),
        ("other classes", (trained["expert"], expert_0), "progressive_1 was trained on other classes", "progressive_1"),
    ):
        shutil.copy(*change)
        with pytest.raises(UserError, match=message):
            evaluate_run(
                RunLayout(str(run)), data, "progressive", False, RoutingConfig(), str(profile), seed=0, num_experts=2
            )
        cached = sorted(p.name for p in (run / "logits").iterdir()) if (run / "logits").exists() else []
        assert not [name for name in cached if name.startswith(wrong)], (kind, cached)
        if kind == "expert as base":
            shutil.copy(trained["generalist"], run / "base" / "checkpoints" / "best.ckpt")


# -- profile: times keyed by model, head and input size; this machine's name ------------------------------------
def test_profile_keys_times_by_head_and_names_this_machine(tmp_path, capsys):
    from askexpert.collab.costs import load_profile, model_cost
    from askexpert.commands.profile import machine_name

    out = tmp_path / "p.yaml"
    args = ["profile", "--models", "vit_micro_patch8_32", "--num_classes", "101", "--role", "near_edge"]
    code, _, err = run_main([*args, "--out", str(out), "--min_run_time", "0.01"], capsys)
    assert code == 0, err
    raw = yaml.safe_load(out.read_text())
    assert set(raw["near_edge"]["measured_ms"]) == {"vit_micro_patch8_32/101/32"}
    assert raw["near_edge"]["name"] == machine_name("cpu") and "Raspberry Pi 4" in raw["edge"]["name"]
    assert "near_edge was 'NVIDIA Jetson AGX Orin'" in out.read_text().splitlines()[0]
    profile = load_profile(str(out))
    dustbin, plain = model_cost(profile, "vit_micro_patch8_32", 101), model_cost(profile, "vit_micro_patch8_32", 100)
    assert dustbin.near_edge_source == "measured" and plain.near_edge_source == "flops"
    # a profile written before the keys had heads: its time is used and the report says how it was keyed
    raw["near_edge"]["measured_ms"] = {"vit_micro_patch8_32": 7.0}
    out.write_text(yaml.safe_dump(raw))
    legacy = model_cost(load_profile(str(out)), "vit_micro_patch8_32", 100)
    assert (legacy.near_edge_ms, legacy.near_edge_source) == (7.0, "measured (any head)")


# -- hints name the command ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args, fragments",
    [
        (["test", "--model.foo", "1"], ["Parser key \"model\": Option 'foo' is not accepted", "askexpert test --help"]),
        (["fit", "--model.init_args.foo", "1"], ["Option 'foo' is not accepted", "`python -m askexpert fit --help`"]),
        (["fit", "--specialization.foo", "1"], ["Option 'foo' is not accepted", "askexpert fit --help"]),
        (["fit", "--model", "vit"], ['Parser key "model": Expected a path but vit', "askexpert fit --help"]),
        (["predict", "--nope", "1"], ["unrecognized arguments: --nope 1", "askexpert predict --help"]),
    ],
)
def test_hints_name_the_command(args, fragments, capsys):
    code, _, err = run_main(args, capsys)
    line = one_line(code, err, *fragments)
    assert "__main__" not in line


def test_more_bad_inputs_are_one_line(trained, tmp_path, capsys):
    """Found by trying bad inputs by hand: Lightning's own refusals, a zip that is no checkpoint, an impossible
    image size, and an output file that cannot be created (named, not its temporary file)."""
    import zipfile

    run = ["fit", *TINY_ARGS, "--trainer.default_root_dir", str(tmp_path / "run")]
    code, _, err = run_main([*run, "--trainer.max_epochs", "-5"], capsys)
    one_line(code, err, "`max_epochs` must be a non-negative integer or -1")
    empty = tmp_path / "empty.ckpt"
    zipfile.ZipFile(empty, "w").close()
    code, _, err = run_main([*run, "--ckpt_path", str(empty)], capsys)
    one_line(code, err, f"{empty} is a zip archive but not a torch checkpoint")
    code, _, err = run_main([*run, "--data.image_size", "0"], capsys)
    one_line(code, err, "--data.image_size must be a positive number of pixels, got 0")
    assert not (tmp_path / "run").exists()
    missing = tmp_path / "no_such_folder_parent"
    missing.write_text("a file where a folder should be")
    output = ["--prediction_writer.output", str(missing / "p.csv")]
    code, _, err = run_main(["predict", *TINY_ARGS, "--ckpt_path", str(trained["generalist"]), *output], capsys)
    one_line(code, err, str(missing))
    assert ".tmp" not in err
