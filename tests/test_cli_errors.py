"""Every bad input of the foundation: one clear line on stderr, exit status 2, nothing written to disk."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from helpers.cli import assert_clean_failure, run_main
from helpers.datasets import make_folder, write_cifar

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def fail(tmp_path, capsys, tiny_args):
    """Run `fit` with extra arguments into a fresh run folder and check it fails cleanly."""

    def check(extra: list[str], *fragments: str, command: str = "fit") -> None:
        run_dir = tmp_path / "run"
        code, _, err = run_main([command, *tiny_args, "--trainer.default_root_dir", str(run_dir), *extra], capsys)
        assert_clean_failure(code, err, run_dir, *fragments)

    return check


def test_missing_root(fail, tmp_path):
    fail(["--data.source", "cifar100", "--data.root", str(tmp_path / "nowhere")], "nowhere", "does not exist")
    fail(["--data.source", "imagefolder", "--data.root", str(tmp_path / "nowhere")], "nowhere")


def test_source_that_needs_a_root_without_one(fail):
    fail(["--data.source", "imagefolder"], "needs --data.root")


def test_cifar100_checksum_failure(fail, tmp_path):
    write_cifar(tmp_path / "cifar")
    fail(["--data.source", "cifar100", "--data.root", str(tmp_path / "cifar")], "checksum mismatch", "verify_checksums")


def test_imagefolder_class_missing_from_test(fail, tmp_path):
    root = make_folder(tmp_path / "images")
    for image in (root / "test" / "zebra").iterdir():
        image.unlink()
    (root / "test" / "zebra").rmdir()
    fail(["--data.source", "imagefolder", "--data.root", str(root)], "zebra", "not in test")


def test_imagefolder_without_images(fail, tmp_path):
    root = tmp_path / "images"
    (root / "train" / "cat").mkdir(parents=True)
    (root / "test" / "cat").mkdir(parents=True)
    fail(["--data.source", "imagefolder", "--data.root", str(root)], "no .png/.jpg/.jpeg images")


def test_imagefolder_unreadable_image_is_named(fail, tmp_path):
    root = make_folder(tmp_path / "images")
    (root / "train" / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    fail(["--data.source", "imagefolder", "--data.root", str(root)], "broken.png")


def test_unknown_model_lists_known_ones(fail):
    fail(["--model.model_name", "vit_gigantic"], "unknown model 'vit_gigantic'", "vit_edge_patch4_32")


def test_unknown_source_lists_known_ones(fail):
    fail(["--data.source", "mnist"], "data.source", "cifar100", "imagefolder", "synthetic")


def test_pretrained_without_weights(fail):
    fail(["--model.pretrained", "true"], "timm publishes no pretrained weights", "--model.pretrained_path FILE")


def test_unknown_option_and_missing_config(fail, tmp_path):
    fail(["--data.colour", "red"], "--data.colour")
    fail(["--config", str(tmp_path / "missing.yaml")], "missing.yaml")


@pytest.fixture(scope="module")
def broken_checkpoints(tmp_path_factory, tiny_generalist_run):
    """A truncated and a bit-flipped copy of a real checkpoint."""
    root = tmp_path_factory.mktemp("broken")
    data = (tiny_generalist_run / "checkpoints" / "last.ckpt").read_bytes()
    truncated, corrupt = root / "truncated.ckpt", root / "corrupt.ckpt"
    truncated.write_bytes(data[: len(data) // 3])
    middle = len(data) // 2
    corrupt.write_bytes(data[:middle] + bytes(b ^ 0x5A for b in data[middle : middle + 256]) + data[middle + 256 :])
    return {"truncated": truncated, "corrupt": corrupt}


@pytest.mark.parametrize("damage", ["truncated", "corrupt"])
@pytest.mark.parametrize("command", ["fit", "test", "predict"])
def test_broken_checkpoint(fail, broken_checkpoints, damage, command):
    path = broken_checkpoints[damage]
    fail(["--ckpt_path", str(path)], f"checkpoint {path} is {damage}", command=command)


def test_missing_checkpoint_and_missing_last(fail, tmp_path):
    fail(["--ckpt_path", str(tmp_path / "nope.ckpt")], "checkpoint not found", command="test")
    fail(["--ckpt_path", "last"], "no last.ckpt", command="test")


def test_console_entry_point_prints_no_traceback(tmp_path, cli_env):
    """The real process, as a user runs it: status 2, one line, no traceback."""
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "askexpert",
            "fit",
            "--model.model_name",
            "nope",
            "--trainer.default_root_dir",
            str(run_dir),
        ],
        capture_output=True,
        text=True,
        env=cli_env,
        cwd=REPO,
    )
    assert_clean_failure(result.returncode, result.stderr, run_dir, "unknown model 'nope'")
    assert "Traceback" not in result.stderr


def test_unknown_precision_lists_the_valid_ones(fail):
    fail(["--trainer.precision", "fp8"], "--trainer.precision must be one of:", "bf16-mixed", "32-true")


def test_unknown_compile_mode_is_refused(fail):
    fail(
        ["--model.compile", "true", "--model.compile_mode", "fastest"], "unknown compile_mode 'fastest'", "max-autotune"
    )


@pytest.mark.parametrize("extra", [["--trainer.precision", "bf16-mixed"], ["--model.compile", "true"]])
def test_precision_and_compile_settings_are_accepted(extra, tiny_args, capsys):
    """Accepted and resolved (not run: compiling costs ~50 s per model on 2 cores)."""
    code, out, err = run_main(["fit", *tiny_args, *extra, "--print_config"], capsys)
    assert code == 0, err
    key, value = extra[0].rsplit(".", 1)[1], extra[1]
    assert f"{key}: {value}" in out


def test_compiling_keeps_checkpoint_keys(tiny_args):
    """`configure_model` compiles in place, so compiled and eager runs write the same state-dict keys."""
    from askexpert.modules import GeneralistModule

    model = GeneralistModule(model_name="vit_micro_patch8_32", num_classes=10, compile=True)
    keys = list(model.state_dict())
    model.configure_model()
    assert model._compiled and list(model.state_dict()) == keys


@pytest.mark.parametrize("where", [0.0, 0.01, 0.5, 0.9, 0.995, 1.0])
def test_damage_anywhere_in_a_checkpoint_is_one_clear_error(tiny_generalist_run, tmp_path, where):
    """Bytes flipped in a local header, a member, or the central directory at the end (names that are no longer
    UTF-8, wrong offsets, ...): always a UserError naming the file, never a parser's own exception."""
    from askexpert.errors import UserError
    from askexpert.files.checkpoints import check_checkpoint_file

    data = (tiny_generalist_run / "checkpoints" / "best.ckpt").read_bytes()
    start = min(int(len(data) * where), len(data) - 64)
    damaged = tmp_path / "damaged.ckpt"
    damaged.write_bytes(data[:start] + bytes(b ^ 0xA5 for b in data[start : start + 64]) + data[start + 64 :])
    with pytest.raises(UserError, match=f"{damaged}"):
        check_checkpoint_file(str(damaged))
