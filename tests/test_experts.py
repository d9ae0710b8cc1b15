"""Training experts from the command line: partition file, strategies, inits, checkpoints and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers.cli import assert_clean_failure, run_main

from askexpert.cli import cli_main
from askexpert.modules import ExpertModule
from askexpert.modules.loading import load_classifier

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def setup_dir(tmp_path_factory):
    """A tiny all-class base model and a 4-expert superclass partition, shared by the tests below."""
    from conftest import TINY_ARGS

    root = tmp_path_factory.mktemp("experts")
    base = root / "base"
    cli_main(["fit", *TINY_ARGS, "--model", "askexpert.modules.BaseModule", "--trainer.default_root_dir", str(base)])
    partition = root / "partition.json"
    cli_main(["partition", "--method", "superclass", "--out", str(partition), "--data.synthetic_train_per_class", "10"])
    return {"base": base / "checkpoints" / "best.ckpt", "partition": partition, "root": root}


def expert_args(setup_dir, tiny_args, run_dir, *extra):
    return [
        "fit",
        *tiny_args,
        "--model",
        "askexpert.modules.ExpertModule",
        "--model.base_path",
        str(setup_dir["base"]),
        "--partition",
        str(setup_dir["partition"]),
        "--trainer.default_root_dir",
        str(run_dir),
        *extra,
    ]


@pytest.mark.parametrize("name", ["full", "static", "dustbin", "progressive"])
def test_every_strategy_trains_an_expert_from_the_cli(setup_dir, tiny_args, tmp_path, name):
    run_dir = tmp_path / name
    cli = cli_main(expert_args(setup_dir, tiny_args, run_dir, "--expert_index", "2", "--specialization", name))
    partition = json.loads(setup_dir["partition"].read_text())
    model = cli.model
    assert isinstance(model, ExpertModule)
    assert model.hparams.subset == partition["experts"][2]["classes"]
    assert model.specialization in cli.trainer.callbacks and model.specialization.name == name
    assert model.net.head.out_features == 100 + (name == "dustbin")
    header = (run_dir / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"val/subset_acc", "val/acc", "specialization/out_share_epoch"} <= set(header)
    # weights-only copies: best always, last once the run finished
    for which in ("best", "last"):
        checkpoint = torch.load(run_dir / "checkpoints" / f"{which}.ckpt", weights_only=True)
        assert "optimizer_states" not in checkpoint
    reloaded = load_classifier(str(run_dir / "checkpoints" / "best.ckpt"))
    assert isinstance(reloaded, ExpertModule) and reloaded.hparams.subset == model.hparams.subset


def test_the_default_specialization_is_progressive(setup_dir, tiny_args, tmp_path):
    cli = cli_main(expert_args(setup_dir, tiny_args, tmp_path / "run"))
    assert type(cli.model.specialization).name == "progressive"
    assert "strategies.progressive.ProgressiveSpecialization" in (tmp_path / "run" / "config.yaml").read_text()


def test_init_base_starts_from_the_base_weights(setup_dir):
    base = load_classifier(str(setup_dir["base"]))
    expert = ExpertModule(
        subset=[0, 1], init="base", base_path=str(setup_dir["base"]), model_name="vit_micro_patch8_32", num_classes=100
    )
    assert not torch.equal(expert.net.head.weight, base.net.head.weight)
    expert.prepare_initial_weights()
    expert.net.load_state_dict(expert._initial_state[0])
    for key, value in base.net.state_dict().items():
        assert torch.equal(expert.net.state_dict()[key], value), key


def test_a_dustbin_expert_starts_with_the_base_and_a_zero_other_output(setup_dir):
    base = load_classifier(str(setup_dir["base"]))
    expert = ExpertModule(
        subset=[0, 1],
        init="base",
        base_path=str(setup_dir["base"]),
        model_name="vit_micro_patch8_32",
        num_classes=100,
        other_output=True,
    )
    expert.prepare_initial_weights()
    state = expert._initial_state[0]
    assert torch.equal(state["head.weight"][:100], base.net.head.weight)
    assert not state["head.weight"][100].any() and state["head.bias"][100] == 0


def test_an_other_answer_counts_as_wrong_in_every_metric():
    expert = ExpertModule(
        subset=[0, 1], init="scratch", model_name="vit_micro_patch8_32", num_classes=5, other_output=True
    )
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, 9.0], [5.0, 0.0, 0.0, 0.0, 0.0, 1.0]])
    labels = torch.tensor([0, 0])
    scores = expert.answer_logits(logits, labels)
    assert scores.shape == (2, 5)
    assert scores[0].argmax() != 0 and scores[0].argsort()[0] == 0  # "other": wrong, the label ranks last
    assert scores[1].argmax() == 0


def test_a_finished_expert_cannot_be_resumed(setup_dir, tiny_args, tmp_path, capsys):
    run_dir = tmp_path / "run"
    cli_main(expert_args(setup_dir, tiny_args, run_dir, "--specialization", "static"))
    code, _, err = run_main(expert_args(setup_dir, tiny_args, run_dir, "--ckpt_path", "last"), capsys)
    assert code == 2 and "holds weights only" in err


# -- bad input ----------------------------------------------------------------------------------------
@pytest.fixture
def expert_fail(setup_dir, tmp_path, capsys, tiny_args):
    def check(extra: list[str], *fragments: str, base: bool = True) -> None:
        run_dir = tmp_path / "run"
        args = expert_args(setup_dir, tiny_args, run_dir, *extra)
        if not base:
            i = args.index("--model.base_path")
            del args[i : i + 2]
        code, _, err = run_main(args, capsys)
        assert_clean_failure(code, err, run_dir, *fragments)

    return check


def test_unknown_specialization_lists_the_known_ones(expert_fail):
    expert_fail(["--specialization", "greedy"], "unknown specialization 'greedy'", "dustbin, full, progressive, static")


def test_expert_index_out_of_range(expert_fail):
    expert_fail(["--expert_index", "4"], "expert index 4 is out of range: the partition has 4 experts")


def test_missing_partition_file(expert_fail, tmp_path):
    expert_fail(["--partition", str(tmp_path / "nope.json")], "partition file not found")


def test_partition_of_another_class_set(expert_fail, tmp_path):
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"class_names": ["a", "b"], "experts": [{"classes": [0]}, {"classes": [1]}]}))
    expert_fail(["--partition", str(other)], "the partition was built for 2 classes", "has 100 classes")


def test_base_checkpoint_of_the_wrong_architecture(expert_fail):
    expert_fail(["--model.model_name", "vit_edge_patch8_32"], "is a 'vit_micro_patch8_32' model", "vit_edge_patch8_32")


def test_init_base_without_a_base_checkpoint(expert_fail):
    expert_fail([], "init: base needs the all-class base checkpoint", base=False)


def test_distillation_without_a_base_checkpoint(expert_fail):
    expert_fail(
        ["--model.init", "scratch", "--specialization", "progressive", "--specialization.distill_weight", "0.5"],
        "distillation",
        "needs the base model",
        base=False,
    )


def test_a_floor_above_the_natural_share(expert_fail):
    expert_fail(["--specialization", "progressive", "--specialization.floor", "0.9"], "exceeds its start")


def test_a_floor_above_an_explicit_start(expert_fail):
    expert_fail(
        ["--specialization", "progressive", "--specialization.start", "0.2", "--specialization.floor", "0.4"],
        "floor (0.4) exceeds its start (0.2)",
    )


def test_partition_with_a_generalist_is_refused(setup_dir, tiny_args, tmp_path, capsys):
    run_dir = tmp_path / "run"
    code, _, err = run_main(
        ["fit", *tiny_args, "--partition", str(setup_dir["partition"]), "--trainer.default_root_dir", str(run_dir)],
        capsys,
    )
    assert_clean_failure(code, err, run_dir, "--partition and --specialization train experts")


def test_an_expert_without_a_partition(setup_dir, tiny_args, tmp_path, capsys):
    run_dir = tmp_path / "run"
    args = expert_args(setup_dir, tiny_args, run_dir)
    i = args.index("--partition")
    del args[i : i + 2]
    code, _, err = run_main(args, capsys)
    assert_clean_failure(code, err, run_dir, "an expert needs its classes: --partition FILE --expert_index I")


# -- the partition command ----------------------------------------------------------------------------
def test_partition_command_confusion_with_a_generalist(setup_dir, tmp_path):
    out = tmp_path / "confusion.json"
    cli_main(
        [
            "partition",
            "--method",
            "confusion",
            "--num_experts",
            "4",
            "--generalist",
            str(setup_dir["base"]),
            "--data.synthetic_train_per_class",
            "10",
            "--overlap",
            "2",
            "--out",
            str(out),
        ]
    )
    raw = json.loads(out.read_text())
    assert raw["method"] == "confusion" and len(raw["experts"]) == 4
    assert all(len(e["classes"]) == 27 for e in raw["experts"])  # 25 + 2 overlapping classes
    assert sorted({c for e in raw["experts"] for c in e["classes"]}) == list(range(100))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--method", "kmeans"], "unknown partition method 'kmeans'"),
        (["--method", "confusion"], "--method confusion needs a trained generalist"),
        (["--num_experts", "0"], "--num_experts must be at least 1"),
        (["--method", "explicit", "--experts", "[[0, 1], [2]]"], "97 classes belong to no expert"),
    ],
)
def test_partition_command_bad_input(tmp_path, capsys, args, message):
    out = tmp_path / "p.json"
    code, _, err = run_main(["partition", *args, "--out", str(out)], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_partition_command_generalist_of_another_class_set(tmp_path, capsys, setup_dir):
    from helpers.datasets import make_folder

    folder = make_folder(tmp_path / "images")
    code, _, err = run_main(
        [
            "partition",
            "--method",
            "confusion",
            "--generalist",
            str(setup_dir["base"]),
            "--data.source",
            "imagefolder",
            "--data.root",
            str(folder),
            "--num_experts",
            "2",
            "--out",
            str(tmp_path / "p.json"),
        ],
        capsys,
    )
    # the data settings come from the generalist's checkpoint: another source contradicts them
    assert code == 2 and "--data.source 'imagefolder' (the generalist's: 'synthetic')" in err


# -- training all experts -----------------------------------------------------------------------------
@pytest.mark.slow  # ~30 s; the job runner itself is tested below, and pipelines run experts in processes too
def test_experts_command_trains_each_expert_in_its_own_folder(setup_dir, tiny_args, tmp_path):
    root = tmp_path / "experts"
    fit_args = [*tiny_args, "--model", "askexpert.modules.ExpertModule", "--model.base_path", str(setup_dir["base"])]
    cli_main(
        [
            "experts",
            "--partition",
            str(setup_dir["partition"]),
            "--root",
            str(root),
            "--experts",
            "[1, 3]",
            "--devices",
            "cpu",
            "--",
            *fit_args,
            "--specialization",
            "static",
        ]
    )
    assert sorted(p.name for p in root.iterdir() if p.name != ".lock") == ["expert1", "expert3"]
    for i in (1, 3):
        expert = load_classifier(str(root / f"expert{i}" / "checkpoints" / "best.ckpt"))
        assert expert.hparams.expert_index == i
        assert "Trainer.fit` stopped" in (root / f"expert{i}" / "fit.log").read_text()


def test_jobs_run_one_per_device_and_failures_are_reported(tmp_path, capsys):
    import sys

    from askexpert.errors import UserError
    from askexpert.pipeline.launcher import Job, run_jobs

    script = "import os, sys; print('gpu', os.environ.get('CUDA_VISIBLE_DEVICES')); sys.exit(int(sys.argv[1]))"
    jobs = [Job(f"job{i}", [sys.executable, "-c", script, "0"], str(tmp_path / f"job{i}.log")) for i in range(4)]
    run_jobs(jobs, ["0", "1"], poll_seconds=0.05)
    seen = sorted((tmp_path / f"job{i}.log").read_text().split()[1] for i in range(4))
    assert seen == ["0", "0", "1", "1"]
    bad = [
        Job("ok", [sys.executable, "-c", script, "0"], str(tmp_path / "ok.log")),
        Job("broken", [sys.executable, "-c", script, "3"], str(tmp_path / "broken.log")),
    ]
    with pytest.raises(UserError, match=r"training failed for broken \(log: .*broken.log\)"):
        run_jobs(bad, [], poll_seconds=0.05)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--devices", "gpu0"], "--devices must be auto, cpu or GPU ids"),
        (["--experts", "[7]"], "expert index 7 is out of range"),
        (["--", "--expert_index", "1"], "--expert_index is set by `experts`"),
        (["--config", "configs/expert_demo.yaml"], "the arguments of each expert's `fit` go after `--`"),
        (["--", "--specialization", "greedy"], "unknown specialization 'greedy'"),
        (["--experts", "[1, 1]"], "lists an expert more than once"),
    ],
)
def test_experts_command_bad_input(setup_dir, tmp_path, capsys, args, message):
    root = tmp_path / "experts"
    own = [a for a in args if args.index("--") > args.index(a)] if "--" in args else args
    rest = args[len(own) :]
    code, _, err = run_main(
        ["experts", "--partition", str(setup_dir["partition"]), "--root", str(root), *own, *rest], capsys
    )
    assert code == 2 and message in err and not root.exists()


def test_init_pretrained_loads_a_local_state_dict(tmp_path):
    source = ExpertModule(subset=[0], init="scratch", model_name="vit_micro_patch8_32", num_classes=100)
    path = tmp_path / "weights.pth"
    torch.save(source.net.state_dict(), path)
    expert = ExpertModule(
        subset=[0], init="pretrained", pretrained_path=str(path), model_name="vit_micro_patch8_32", num_classes=100
    )
    assert not torch.equal(expert.net.blocks[0].attn.qkv.weight, source.net.blocks[0].attn.qkv.weight)
    expert.prepare_initial_weights()
    for name, value in source.net.state_dict().items():
        assert torch.equal(expert.net.state_dict()[name], value), name


@pytest.mark.slow  # ~25 s; tests/test_run_safety.py resumes a pipeline killed inside an expert in the default run
def test_killed_expert_resumes_without_its_base_and_follows_the_schedule(setup_dir, tmp_path, cli_env):
    """The schedule spans epochs (Lightning's epoch reaches the batch sampler), a killed expert resumes from
    last.ckpt even after its base file moved, and the finished run keeps weights only."""
    import csv
    import shutil
    import subprocess
    import sys

    from conftest import TINY_ARGS

    base = tmp_path / "base.ckpt"
    shutil.copy(setup_dir["base"], base)
    killer = tmp_path / "killer.yaml"
    killer.write_text(
        "trainer:\n  callbacks:\n    - class_path: killer.KillAtEpoch\n      init_args:\n        epoch: 2\n"
    )
    root = tmp_path / "run"
    args = [sys.executable, "-m", "askexpert", *expert_args({**setup_dir, "base": base}, TINY_ARGS, root)]
    args += ["--specialization", "progressive", "--specialization.schedule", "linear"]
    args += ["--specialization.decay_end", "1.0", "--trainer.max_epochs", "4"]
    first = subprocess.run([*args, "--config", str(killer)], env=cli_env, capture_output=True, text=True, cwd=REPO)
    assert first.returncode == -9, first.stderr[-2000:]
    base.unlink()  # a resumed expert must not need its base any more
    second = subprocess.run([*args, "--ckpt_path", "last"], env=cli_env, capture_output=True, text=True, cwd=REPO)
    assert second.returncode == 0, second.stderr[-2000:]
    rows = [r for r in csv.DictReader(open(root / "metrics.csv")) if r.get("specialization/out_share_epoch")]
    shares = [float(r["specialization/out_share_epoch"]) for r in rows]
    assert [r["epoch"] for r in rows] == ["0", "1", "2", "3"]
    # linear decay from the natural share (0.75) to 0.05 over the run: each epoch draws less from outside
    assert all(a - b > 0.08 for a, b in zip(shares, shares[1:], strict=False)), shares
    assert shares[0] > 0.55 and shares[-1] < 0.25, shares
    assert "optimizer_states" not in torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)


def test_evaluating_a_dustbin_expert_with_a_generic_config(setup_dir, tiny_args, tmp_path, capsys):
    """`test` reads the subset and the "other" output from the checkpoint when the config does not say."""
    run_dir = tmp_path / "dustbin"
    cli_main(expert_args(setup_dir, tiny_args, run_dir, "--specialization", "dustbin"))
    code, out, err = run_main(
        [
            "test",
            *tiny_args,
            "--model",
            "askexpert.modules.ExpertModule",
            "--trainer.default_root_dir",
            str(tmp_path / "eval"),
            "--ckpt_path",
            str(run_dir / "checkpoints" / "best.ckpt"),
        ],
        capsys,
    )
    assert code == 0, err
    assert "on the images of its 25 classes" in out


def test_per_device_runs_that_many_jobs_at_once_on_each_device(tmp_path):
    import sys

    from askexpert.pipeline.launcher import Job, device_slots, run_jobs

    assert device_slots(["0", "1"], 2) == ["0", "0", "1", "1"] and device_slots([], 3) == [None, None, None]
    # each job waits for the other to have started: one after another, the first would time out and fail
    script = (
        "import os, sys, time, pathlib; me, other = sys.argv[1:]; pathlib.Path(me).touch(); end = time.time() + 60\n"
        "while not os.path.exists(other) and time.time() < end: time.sleep(0.05)\n"
        "sys.exit(0 if os.path.exists(other) else 1)"
    )
    marks = [str(tmp_path / f"started{i}") for i in range(2)]
    commands = [[sys.executable, "-c", script, marks[i], marks[1 - i]] for i in range(2)]
    jobs = [Job(f"job{i}", commands[i], str(tmp_path / f"{i}.log")) for i in range(2)]
    run_jobs(jobs, [], poll_seconds=0.05, per_device=2)


def test_jobs_still_running_are_stopped_when_the_launcher_fails(tmp_path):
    import os
    import sys

    from askexpert.pipeline.launcher import Job, launch_jobs

    pid_file = tmp_path / "sleeper.pid"
    sleeper = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(120)"
    quick = f"import os, time\nwhile not os.path.exists({str(pid_file)!r}): time.sleep(0.05)"
    jobs = [
        Job("sleeper", [sys.executable, "-c", sleeper], str(tmp_path / "sleeper.log")),
        Job("quick", [sys.executable, "-c", quick], str(tmp_path / "quick.log")),
    ]

    def fail(job, code):
        raise RuntimeError("the launcher broke")

    with pytest.raises(RuntimeError, match="the launcher broke"):
        launch_jobs(jobs, [None, None], poll_seconds=0.05, on_done=fail)
    pid = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):  # terminated and reaped: no orphan trains on
        os.kill(pid, 0)
