"""SLURM's tasks against the Trainer's devices x nodes (askexpert/lightning_cli/slurm.py), with made-up SLURM
variables: no cluster needed (tests/test_cluster_ddp.py runs the same under a real one, `pytest -m cluster`)."""

from __future__ import annotations

import pytest
from helpers.cli import one_line, run_main

from askexpert.errors import UserError
from askexpert.lightning_cli.slurm import check_slurm_tasks, slurm_task_problem

JOB = {"SLURM_JOB_ID": "17", "SLURM_JOB_NAME": "wrap", "SLURM_NNODES": "1", "SLURM_PROCID": "0"}
SRUN = {**JOB, "SLURM_STEP_ID": "0"}  # what srun adds to a task's environment (the batch script has no step id)


def cpu(devices, num_nodes: int = 1) -> dict:
    return {"accelerator": "cpu", "devices": devices, "num_nodes": num_nodes}


@pytest.mark.parametrize(
    ("environ", "trainer", "message"),
    [
        (  # sbatch --ntasks=2 + srun, devices 1: Lightning's RuntimeError in every task
            {**SRUN, "SLURM_NTASKS": "2"},
            cpu(1),
            "SLURM gives 2 tasks (--ntasks=2) but the trainer asks for 1 device x 1 node (one task per device; "
            "Lightning reads the tasks per node from --ntasks-per-node, not --ntasks): run the job with "
            "--ntasks-per-node=1 instead of --ntasks=2, or set --trainer.devices 2 and run it with --ntasks-per-node=2",
        ),
        (  # the right count, given the way Lightning cannot read
            {**SRUN, "SLURM_NTASKS": "2"},
            cpu(2),
            "SLURM gives 2 tasks (--ntasks=2) for 2 devices x 1 node but Lightning reads the tasks per node from "
            "--ntasks-per-node, not --ntasks: run the job with --ntasks-per-node=2 instead of --ntasks=2",
        ),
        (  # two tasks, each a whole one-device fit of the same run folder
            {**SRUN, "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2"},
            cpu(1),
            "SLURM gives 2 tasks (2 per node x 1 node) but the trainer asks for 1 device x 1 node (one task per "
            "device): set --trainer.devices 2 or run the job with --ntasks-per-node=1",
        ),
        (  # nodes: Lightning's ValueError from its DDP launcher
            {**SRUN, "SLURM_NNODES": "2", "SLURM_NTASKS": "8", "SLURM_NTASKS_PER_NODE": "4"},
            cpu(4),
            "SLURM gives 8 tasks (4 per node x 2 nodes) but the trainer asks for 4 devices x 1 node (one task per "
            "device): set --trainer.num_nodes 2 or run the job with --nodes=1 --ntasks-per-node=4",
        ),
        (  # a plain sbatch of one task, the trainer asking for 4 devices: Lightning would start no other process
            {**JOB, "SLURM_NTASKS": "1"},
            cpu(4),
            "SLURM gives 1 task but the trainer asks for 4 devices x 1 node (one task per device): set "
            "--trainer.devices 1 or run the job with --ntasks-per-node=4",
        ),
        (  # the right layout in the batch script itself, without srun: rank 0 would wait for rank 1 forever
            {**JOB, "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2"},
            cpu(2),
            "this process was not started by srun",
        ),
    ],
)
def test_a_layout_lightning_cannot_run_is_named_with_its_fix(environ, trainer, message):
    found = slurm_task_problem(trainer, environ)
    assert found is not None and message in found, found


@pytest.mark.parametrize(
    ("environ", "trainer"),
    [
        ({}, cpu(2)),  # no SLURM
        ({**JOB, "SLURM_NTASKS": "1"}, cpu(1)),  # a plain single-task sbatch fit
        ({**JOB, "SLURM_NTASKS": "1"}, {"accelerator": "cpu", "devices": "auto"}),
        ({**SRUN, "SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1"}, cpu("1")),  # srun of one task
        ({**SRUN, "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2"}, cpu(2)),  # one node x 2 tasks
        ({**SRUN, "SLURM_NNODES": "2", "SLURM_NTASKS": "8", "SLURM_NTASKS_PER_NODE": "4"}, cpu(4, 2)),
        ({**JOB, "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2"}, cpu(1)),  # one process of a 2-task job
        # Lightning does not use its SLURMEnvironment: an interactive job (`srun --pty bash`, salloc), torchrun
        ({**SRUN, "SLURM_JOB_NAME": "bash", "SLURM_NTASKS": "2"}, cpu(1)),
        ({**SRUN, "SLURM_JOB_NAME": "interactive", "SLURM_NTASKS": "4"}, cpu(2)),
        ({**SRUN, "SLURM_NTASKS": "2", "TORCHELASTIC_RUN_ID": "x"}, cpu(1)),
        ({**SRUN, "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2"}, {"accelerator": "gpu", "devices": 2}),
    ],
)
def test_layouts_lightning_runs_pass(environ, trainer):
    assert slurm_task_problem(trainer, environ) is None


def test_only_the_first_task_says_why(monkeypatch):
    environ = {**SRUN, "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2"}
    with pytest.raises(UserError, match="SLURM gives 2 tasks"):
        check_slurm_tasks(cpu(1), environ)
    with pytest.raises(SystemExit) as exit_:  # the other tasks leave quietly, with the same status
        check_slurm_tasks(cpu(1), {**environ, "SLURM_PROCID": "1"})
    assert exit_.value.code == 2


def test_fit_with_a_mismatched_layout_is_one_line_before_anything_is_written(tiny_args, tmp_path, monkeypatch, capsys):
    for name, value in {**SRUN, "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2", "SLURM_LOCALID": "0"}.items():
        monkeypatch.setenv(name, value)
    run = tmp_path / "run"
    code, _, err = run_main(["fit", *tiny_args, "--trainer.default_root_dir", str(run)], capsys)
    one_line(code, err, "SLURM gives 2 tasks (2 per node x 1 node)", "set --trainer.devices 2")
    assert not run.exists()
