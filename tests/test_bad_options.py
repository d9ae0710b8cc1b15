"""Issue 27's options that were silently ignored or wrong: each is refused in one line (exit status 2, nothing
written), or, where the input is valid, accepted. Trainer hardware options, a resume with other model settings, a
base checkpoint of the wrong kind, an overlap out of range, GPUs that do not exist, an askexpert checkpoint as
pretrained weights; and what trying more wrong options by hand found (a half-precision network, ddp_spawn)."""

from __future__ import annotations

import json
import pickle
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import TINY_ARGS
from helpers.cli import assert_clean_failure, one_line, run_main
from helpers.pipelines import write_configs

from askexpert.errors import UserError
from askexpert.files.checkpoints import load_checkpoint
from askexpert.modules import GeneralistModule  # Lightning imported at collection: its log handlers on the real stderr

NO_GPU = torch.cuda.device_count() == 0


@pytest.fixture(scope="module")
def trained(tiny_generalist_run, tiny_pipeline_run):
    """The session's tiny generalist run and pipeline run (both read-only)."""
    _, run = tiny_pipeline_run
    return {
        "generalist_run": tiny_generalist_run,
        "generalist": tiny_generalist_run / "checkpoints" / "best.ckpt",
        "base": run / "base" / "checkpoints" / "best.ckpt",
        "expert": run / "experts" / "progressive" / "0" / "checkpoints" / "best.ckpt",
        "partition": run / "partition.json",
    }


def fit_args(run_dir: Path, *extra: str) -> list[str]:
    return ["fit", *TINY_ARGS, *extra, "--trainer.default_root_dir", str(run_dir)]


# -- 11: the Trainer's hardware options ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("extra", "fragments"),
    [
        (["--trainer.accelerator", "quantum"], ["--trainer.accelerator 'quantum' is not one of: auto, gpu, cpu, cuda"]),
        (["--trainer.devices", "abc"], ["--trainer.devices 'abc': on the CPU it is a number of processes"]),
        (["--trainer.devices", "0"], ["--trainer.devices '0': on the CPU it is a number of processes"]),
        (["--trainer.strategy", "nonsense"], ["--trainer.strategy 'nonsense' is not one of: auto, ddp,", "fsdp"]),
        (["--trainer.precision", "17"], ["--trainer.precision must be one of:", "bf16-mixed"]),
        (["--trainer.num_nodes", "0"], ["--trainer.num_nodes must be 1 or more, got 0"]),
        # what only Lightning's own reader can tell, said in one line
        (["--trainer.strategy", "fsdp"], ["hardware options cannot run", "`fsdp` requires a GPU accelerator"]),
    ],
)
def test_wrong_trainer_hardware_options_are_one_line(extra, fragments, tmp_path, capsys):
    run_dir = tmp_path / "run"
    code, _, err = run_main(fit_args(run_dir, *extra), capsys)
    assert_clean_failure(code, err, run_dir, *fragments)


@pytest.mark.skipif(not NO_GPU, reason="this machine has a GPU")
@pytest.mark.parametrize("accelerator", ["gpu", "cuda", "tpu"])
def test_an_accelerator_this_machine_lacks_is_one_line(accelerator, tmp_path, capsys):
    run_dir = tmp_path / "run"
    code, _, err = run_main(fit_args(run_dir, "--trainer.accelerator", accelerator), capsys)
    assert_clean_failure(code, err, run_dir, f"--trainer.accelerator {accelerator}: this machine has no", "auto, cpu")


def test_only_lightnings_own_refusals_lose_their_traceback():
    from askexpert.lightning_cli.trainer_options import lightning_hardware_refusals

    with pytest.raises(ValueError, match="a bug"), lightning_hardware_refusals():
        raise ValueError("a bug")  # not raised inside Lightning's accelerator connector: stays a bug


# -- 12: resuming with other model settings -----------------------------------------------------------------------
@pytest.fixture
def interrupted_run(trained, tmp_path) -> Path:
    """A copy of the session's generalist run, whose last.ckpt (one epoch, with its optimizer state) can resume."""
    run = tmp_path / "run"
    shutil.copytree(trained["generalist_run"], run)
    return run


@pytest.mark.parametrize("how", ["last", "file"])
@pytest.mark.parametrize(
    ("extra", "fragments"),
    [
        (
            ["--model.model_name", "vit_edge_patch4_32"],
            ["holds a model with model_name 'vit_micro_patch8_32' but --model.model_name is 'vit_edge_patch4_32'"],
        ),
        (
            ["--model", "askexpert.modules.BaseModule"],
            ["holds a GeneralistModule but this run's model is a BaseModule"],
        ),
        (["--data.image_size", "64"], ["was trained on 32 px images but --data.image_size is 64"]),
        (["--model.lr", "0.01"], ["continues a run with lr 0.001 but --model.lr is 0.01"]),
        (["--model.head_lr", "0.01"], ["continues a run with head_lr None but --model.head_lr is 0.01"]),
        (
            ["--model.schedule", "constant"],
            ["continues a run with schedule 'cosine' but --model.schedule is 'constant'"],
        ),
    ],
)
def test_a_resume_with_other_model_settings_is_refused(interrupted_run, how, extra, fragments, capsys):
    """Before: the checkpoint's model trained silently (a file), or a size-mismatch traceback after config.yaml was
    rewritten (`last`); other optimizer settings were ignored or failed to restore with a traceback."""
    last = interrupted_run / "checkpoints" / "last.ckpt"
    before = {p.name: p.read_bytes() for p in interrupted_run.rglob("*") if p.is_file()}
    ckpt = "last" if how == "last" else str(last)
    args = fit_args(interrupted_run, "--trainer.max_epochs", "2", *extra, "--ckpt_path", ckpt)
    code, _, err = run_main(args, capsys)
    one_line(code, err, f"checkpoint {last}", *fragments)
    assert {p.name: p.read_bytes() for p in interrupted_run.rglob("*") if p.is_file()} == before


def test_a_resume_from_a_file_with_the_same_settings_continues(interrupted_run, capsys):
    last = interrupted_run / "checkpoints" / "last.ckpt"
    code, _, err = run_main(fit_args(interrupted_run, "--trainer.max_epochs", "2", "--ckpt_path", str(last)), capsys)
    assert code == 0, err
    assert load_checkpoint(str(last))["epoch"] == 1  # the second epoch, continued from the first


def test_an_expert_checkpoint_evaluated_as_another_expert_is_refused(trained, tmp_path, capsys):
    run_dir = tmp_path / "eval"
    args = ["test", *TINY_ARGS, "--model", "askexpert.modules.ExpertModule", "--ckpt_path", str(trained["expert"])]
    args += ["--partition", str(trained["partition"]), "--expert_index", "1"]
    args += ["--trainer.default_root_dir", str(run_dir)]
    code, _, err = run_main(args, capsys)
    assert_clean_failure(code, err, run_dir, "holds expert 0 of", "--expert_index 1 gives this run other classes")


# -- 13: a base checkpoint of the wrong kind ---------------------------------------------------------------------
def test_a_base_path_that_is_another_experts_checkpoint_is_refused(trained, tmp_path, capsys):
    run_dir = tmp_path / "run"
    args = ["--model", "askexpert.modules.ExpertModule", "--model.base_path", str(trained["expert"])]
    args += ["--partition", str(trained["partition"]), "--expert_index", "0"]
    code, _, err = run_main(fit_args(run_dir, *args), capsys)
    expected = f"--model.base_path {trained['expert']} is an expert's checkpoint"
    assert_clean_failure(code, err, run_dir, expected, "not an all-class model's")


def test_the_base_kind_check_reads_what_the_checkpoint_records(trained):
    from askexpert.modules.expert import check_base_kind

    check_base_kind(load_checkpoint(str(trained["base"]), mmap=True), "base.ckpt")  # the pipeline's base: accepted
    # the generalist is an all-class model too (experiments/strategy_table.py starts experts from it): accepted
    check_base_kind(load_checkpoint(str(trained["generalist"]), mmap=True), "generalist.ckpt")
    foreign = {"hyper_parameters": {"model_name": "vit_micro_patch8_32", "num_classes": 100}}
    with pytest.raises(UserError, match="foreign.ckpt records no askexpert module, so it is not an all-class model's"):
        check_base_kind(foreign, "foreign.ckpt")


# -- 14: an overlap out of range ---------------------------------------------------------------------------------
def test_an_overlap_that_would_give_an_expert_every_class_is_refused(trained, tmp_path, capsys):
    """Before: clamped silently to the classes left, giving 4 identical all-class experts."""
    out = tmp_path / "p.json"
    args = ["partition", "--generalist", str(trained["generalist"]), "--out", str(out)]
    code, _, err = run_main([*args, "--overlap", "500"], capsys)
    one_line(code, err, "--overlap must be between 0 and 74, got 500", "the largest expert has 25 of the 100 classes")
    assert not out.exists()
    code, _, err = run_main([*args, "--overlap", "74"], capsys)  # the top of the range: each expert lacks one class
    assert code == 0, err
    sizes = [len(expert["classes"]) for expert in json.loads(out.read_text())["experts"]]
    assert sizes == [99, 99, 99, 99]


@pytest.mark.parametrize(
    ("extra", "most"), [([], 49), (["--partition.method", "confusion", "--partition.num_experts", "3"], 65)]
)
def test_a_pipeline_overlap_out_of_range_is_refused_before_training(extra, most, tmp_path, capsys):
    """The tiny pipeline's 2 superclass experts have 50 of the 100 classes each; 3 confusion experts at most 34."""
    out = tmp_path / "run"
    args = ["pipeline", "--config", str(write_configs(tmp_path)), "--out", str(out), *extra]
    code, _, err = run_main([*args, "--partition.overlap", "500"], capsys)
    assert_clean_failure(code, err, out, f"--partition.overlap must be between 0 and {most}, got 500")


def test_add_overlap_refuses_more_classes_than_an_expert_lacks():
    from datamodules.partitions import add_overlap

    confusion = torch.ones(6, 6)
    assert [len(g) for g in add_overlap([[0, 1, 2], [3, 4, 5]], confusion, 2)] == [5, 5]
    with pytest.raises(UserError, match="--overlap must be between 0 and 2, got 3"):
        add_overlap([[0, 1, 2], [3, 4, 5]], confusion, 3)


# -- 15: GPUs that do not exist ----------------------------------------------------------------------------------
def test_experts_refuses_gpus_this_machine_lacks(trained, tmp_path, capsys, monkeypatch):
    """Before: "training on GPU 7", and the expert trained on the CPU."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)  # as on this CPU machine, wherever the test runs
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    root = tmp_path / "experts"
    args = ["experts", "--partition", str(trained["partition"]), "--root", str(root), "--devices", "7,8"]
    code, _, err = run_main([*args, "--", *TINY_ARGS, "--model", "askexpert.modules.ExpertModule"], capsys)
    assert_clean_failure(code, err, root, "--devices 7,8: this machine has no GPU; use --devices cpu")


def test_the_gpu_check_uses_the_visible_gpus(monkeypatch):
    from askexpert.commands.experts import check_gpus_exist

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    check_gpus_exist(["0", "1"])
    with pytest.raises(UserError, match=r"--devices 1,7: no GPU 7 here; the GPUs this process can use are 0,1"):
        check_gpus_exist(["1", "7"])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")  # a scheduler's allotment: ids as CUDA_VISIBLE_DEVICES names them
    check_gpus_exist(["3"])
    with pytest.raises(UserError, match="no GPU 0 here; the GPUs this process can use are 2,3"):
        check_gpus_exist(["0"])


# -- 16: an askexpert checkpoint as pretrained weights -----------------------------------------------------------
@pytest.mark.parametrize("kind", ["generalist", "expert"])
def test_an_askexpert_checkpoint_is_valid_pretrained_weights(trained, kind):
    """Before: refused, its metric buffers (`val_metrics.*`) defeating the `net.` prefix strip."""
    saved = load_checkpoint(str(trained[kind]))
    weights = {k[len("net.") :]: v for k, v in saved["state_dict"].items() if k.startswith("net.")}
    name = saved["hyper_parameters"]["model_name"]
    model = GeneralistModule(model_name=name, pretrained_path=str(trained[kind]))
    model.prepare_initial_weights()
    loaded = model.net.state_dict()
    assert loaded.keys() == weights.keys()
    assert all(torch.equal(loaded[key], weights[key]) for key in weights)


# -- found by trying more wrong options --------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_a_network_in_another_float_type_takes_uint8_images(dtype):
    """`--trainer.precision 16-true` / `bf16-true` / `64-true` convert the module, not the images: the input was
    float32 and a half-precision network refused it with a RuntimeError."""
    model = GeneralistModule(model_name="vit_micro_patch8_32").to(dtype).eval()
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    assert model(images).dtype == dtype


def test_the_config_saver_survives_pickling():
    """`--trainer.strategy ddp_spawn` pickles the Trainer with its callbacks: the atomic config saver recursed
    endlessly when unpickled."""
    from askexpert.callbacks import _AtomicSaving

    copy = pickle.loads(pickle.dumps(_AtomicSaving(SimpleNamespace(prog="fit"))))
    assert copy.prog == "fit"


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [  # each divided by zero in the first epoch (a traceback, the run folder written) or was silently ignored
        (["--trainer.val_check_interval", "0"], "--trainer.val_check_interval must be a number of batches"),
        (["--trainer.accumulate_grad_batches", "0"], "--trainer.accumulate_grad_batches must be a whole number of 1"),
        (["--trainer.check_val_every_n_epoch", "0"], "--trainer.check_val_every_n_epoch must be a whole number of 1"),
        (["--trainer.gradient_clip_val", "-1"], "--trainer.gradient_clip_val must be 0 (off) or more, got -1.0"),
        (["--trainer.num_sanity_val_steps", "-5"], "--trainer.num_sanity_val_steps must be a whole number of -1"),
        (["--trainer.min_epochs", "5"], "--trainer.min_epochs 5 is more than --trainer.max_epochs 1"),
        (["--model.drop_path_rate", "2"], "--model.drop_path_rate must be in [0, 1), got 2.0"),
        (["--model.mixup_alpha", "-1"], "--model.mixup_alpha must be 0 (off) or more, got -1.0"),
        (["--model.weight_decay", "-1"], "--model.weight_decay must be 0 or more, got -1.0"),
        (["--model.min_lr_ratio", "2"], "--model.min_lr_ratio must be in [0, 1], got 2.0"),
        (["--model.num_classes", "5"], "--model.num_classes is set from the data's classes"),
        (["--model.image_size", "64"], "--model.image_size is set from --data.image_size, not by the model"),
    ],
)
def test_loop_and_recipe_options_out_of_range_are_one_line(extra, fragment, tmp_path, capsys):
    run_dir = tmp_path / "run"
    code, _, err = run_main(fit_args(run_dir, *extra), capsys)
    assert_clean_failure(code, err, run_dir, fragment)


def test_an_empty_run_folder_is_refused(tmp_path, capsys, monkeypatch):
    """Before: the run was split between the current folder (config.yaml, best.ckpt, .lock) and runs/default."""
    monkeypatch.chdir(tmp_path)
    code, _, err = run_main(["fit", *TINY_ARGS, "--trainer.default_root_dir", ""], capsys)
    one_line(code, err, "--trainer.default_root_dir is empty; give the run's folder")
    assert list(tmp_path.iterdir()) == []


def test_experts_refuses_repeated_gpus_and_gpus_for_a_cpu_trainer(trained, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    root = tmp_path / "experts"
    args = ["experts", "--partition", str(trained["partition"]), "--root", str(root)]
    fit = ["--", *TINY_ARGS, "--model", "askexpert.modules.ExpertModule", "--model.init", "scratch"]
    code, _, err = run_main([*args, "--devices", "0,0", *fit], capsys)
    assert_clean_failure(code, err, root, "--devices 0,0 names a GPU twice", "--per_device N")
    code, _, err = run_main([*args, "--devices", "0,1", *fit], capsys)  # TINY_ARGS: --trainer.accelerator cpu
    assert_clean_failure(code, err, root, "--devices 0,1 names GPUs but the experts' --trainer.accelerator is 'cpu'")


def test_a_negative_overlap_names_the_range_without_a_generalist(tmp_path, capsys):
    out = tmp_path / "p.json"
    code, _, err = run_main(["partition", "--overlap", "-1", "--out", str(out)], capsys)
    one_line(code, err, "--overlap must be between 0 and 74, got -1")
    assert not out.exists()


@pytest.mark.parametrize(
    ("saved", "fragment"),
    [
        ({"other_output": True}, "holds an expert with an 'other' output (dustbin) but this run's expert has no"),
        ({"subset": [5, 6], "expert_index": 1}, "holds expert 1 of 2 classes but --partition --expert_index 0"),
    ],
)
def test_an_expert_checkpoint_must_be_the_same_expert(saved, fragment):
    """A resumed expert with another strategy's head, or another expert's classes, is refused before it loads."""
    from askexpert.lightning_cli.ckpt_path import check_same_model
    from askexpert.modules import ExpertModule

    expert = ExpertModule(subset=[0, 1, 2], init="scratch", model_name="vit_micro_patch8_32", num_classes=100)
    record = {"_class_path": "askexpert.modules.ExpertModule", "model_name": "vit_micro_patch8_32", "subset": [0, 1, 2]}
    check_same_model(record, expert, "checkpoint e.ckpt", resuming=True)  # the same expert: accepted
    with pytest.raises(UserError, match=re.escape(fragment)):
        check_same_model({**record, **saved}, expert, "checkpoint e.ckpt", resuming=True)
