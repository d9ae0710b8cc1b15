"""`python -m askexpert experts`: train every expert of a partition, one `fit` per expert.

    python -m askexpert experts --partition runs/partition.json --root runs/experts --devices auto \
        -- --config configs/expert_demo.yaml --specialization progressive --model.base_path BASE.ckpt

Everything after `--` goes to each expert's `python -m askexpert fit`, which adds `--partition`,
`--expert_index I` and `--trainer.default_root_dir ROOT/expert<I>`. Lightning has no launcher for N
different models, so with several GPUs every expert is its own subprocess pinned to one GPU
(`CUDA_VISIBLE_DEVICES`), one expert per GPU at a time; with one GPU or none they run one after another.
`--per_device N` runs N experts at once on each GPU (or on this machine): one medium expert leaves most of a
large GPU idle, and separate processes train exactly what each would alone. Each expert's output goes to
`ROOT/expert<I>/fit.log`; a diverged expert exits with status 3 and stops new ones from starting.
"""

from __future__ import annotations

import os

from askexpert.errors import UserError
from askexpert.pipeline.launcher import Job, fit_job, gpus_for, run_jobs, visible_gpus
from askexpert.pipeline.resolve import print_config
from askexpert.runs.lock import locked
from datamodules.partitions import Partition

RESERVED = ("--partition", "--expert_index", "--trainer.default_root_dir")
OWN_OPTIONS = ("--partition", "--root", "--devices", "--experts", "--per_device", "--help", "-h")


def parse_devices(spec: str) -> list[str]:
    """`auto` (every visible GPU, or none), `cpu`, or a comma-separated list of GPU ids."""
    if spec == "cpu":
        return []
    if spec == "auto":
        return visible_gpus()
    devices = [d.strip() for d in spec.split(",") if d.strip()]
    if not devices or not all(d.isdigit() for d in devices):
        raise UserError(f"--devices must be auto, cpu or GPU ids like 0,1; got {spec!r}")
    if len(set(devices)) != len(devices):
        raise UserError(f"--devices {spec} names a GPU twice; for several experts at once per GPU use --per_device N")
    check_gpus_exist(devices)
    return devices


def check_gpus_exist(devices: list[str]) -> None:
    """Refuse GPU ids this process cannot use: a child pinned to a GPU that is not there sees no GPU at all and
    trains on the CPU instead, while its line said "GPU 7". The ids are what a child's CUDA_VISIBLE_DEVICES gets,
    so they are checked against this process's own visible GPUs (`visible_gpus`)."""
    visible = visible_gpus()
    missing = [d for d in devices if d not in visible]
    if not missing:
        return
    if not visible:
        raise UserError(f"--devices {','.join(devices)}: this machine has no GPU; use --devices cpu (or auto)")
    raise UserError(
        f"--devices {','.join(devices)}: no GPU {','.join(missing)} here; the GPUs this process can use are "
        f"{','.join(visible)}"
    )


def chosen_experts(partition_file: str, indices: list[int] | None, fit_args: list[str]) -> list[int]:
    """The experts to train (default: every expert of the partition), checked against it."""
    partition = Partition.load(partition_file)
    for arg in fit_args:
        if arg.split("=")[0] in RESERVED:
            raise UserError(f"{arg.split('=')[0]} is set by `experts` for every expert; remove it")
    chosen = indices if indices is not None else list(range(partition.num_experts))
    if len(set(chosen)) != len(chosen):
        raise UserError("--experts lists an expert more than once")
    if not chosen:
        raise UserError("--experts is empty")
    for i in chosen:
        partition.classes_of(i)  # range check with the partition's own message
    return chosen


def expert_fit_arguments(fit_args: list[str], partition_file: str, index: int, folder: str) -> list[str]:
    """Expert `index`'s `fit` arguments: the user's, then its classes and its run folder."""
    args = ["fit", *fit_args, "--partition", partition_file, "--expert_index", str(index)]
    return args + ["--trainer.default_root_dir", folder]


def split_arguments(argv: list[str]) -> tuple[list[str], list[str]]:
    """(this command's arguments, each expert's `fit` arguments: those after `--`). A `fit` option before `--`
    is refused by name: jsonargparse would only call it unrecognized."""
    own, fit_args = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    for arg in own:
        option = arg.split("=")[0]
        if option.startswith("--") and option not in OWN_OPTIONS:
            raise UserError(
                f"unknown option {option} for `experts`; the arguments of each expert's `fit` go after `--`"
            )
    return own, fit_args


def parser():
    from askexpert.parsers import command_parser

    p = command_parser(
        "experts",
        "Train every expert of a partition (arguments after -- go to `fit`).",
        with_data=False,
        with_config=False,
    )
    p.add_argument("--partition", type=str, required=True, help="partition JSON")
    p.add_argument("--root", type=str, default="runs/experts", help="experts go to ROOT/expert<I>")
    p.add_argument("--devices", type=str, default="auto", help="auto, cpu, or GPU ids like 0,1")
    p.add_argument("--experts", type=list[int] | None, default=None, help="which experts (default: all)")
    p.add_argument("--per_device", type=int, default=1, help="experts trained at once on each GPU (separate processes)")
    return p


def run(argv: list[str]) -> list[Job]:
    own, fit_args = split_arguments(argv)
    args = parser().parse_args(own)
    if args.per_device < 1:
        raise UserError(f"--per_device must be at least 1, got {args.per_device}")
    devices = parse_devices(args.devices)
    chosen = chosen_experts(args.partition, args.experts, fit_args)
    folders = {i: os.path.join(args.root, f"expert{i}") for i in chosen}
    # resolved once in this process, so a typo fails here instead of once per expert in a subprocess
    config = print_config(expert_fit_arguments(fit_args, args.partition, chosen[0], folders[chosen[0]]))
    trainer = config.get("trainer") or {}
    given, devices = devices, gpus_for(trainer, lambda: devices)  # CPU experts share the cores: one at a time
    if given and not devices:  # GPU ids for experts whose Trainer does not run on CUDA: they would be ignored
        raise UserError(
            f"--devices {args.devices} names GPUs but the experts' --trainer.accelerator is "
            f"{trainer.get('accelerator')!r}; set --trainer.accelerator gpu (after --) or use --devices cpu"
        )
    concurrent = len(devices) > 1 or args.per_device > 1
    one_device = ["--trainer.devices", "1"] if concurrent and devices else []  # each subprocess sees one GPU
    jobs = [
        fit_job(
            f"expert {i}", [*expert_fit_arguments(fit_args, args.partition, i, folders[i]), *one_device], folders[i]
        )
        for i in chosen
    ]
    # One writer per experts root (askexpert/runs/lock.py); each expert's `fit` locks its own folder inside it.
    with locked(args.root):
        run_jobs(jobs, devices if concurrent else [], per_device=args.per_device)
    return jobs
