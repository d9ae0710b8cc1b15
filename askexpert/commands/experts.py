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

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from askexpert.errors import DivergenceError, UserError
from askexpert.runs.lock import locked
from datamodules.partitions import Partition

RESERVED = ("--partition", "--expert_index", "--trainer.default_root_dir")


@dataclass
class Job:
    name: str
    command: list[str]
    log: str


def parse_devices(spec: str) -> list[str]:
    """`auto` (every visible GPU, or none), `cpu`, or a comma-separated list of GPU ids."""
    if spec == "cpu":
        return []
    if spec == "auto":
        return visible_gpus()
    devices = [d.strip() for d in spec.split(",") if d.strip()]
    if not devices or not all(d.isdigit() for d in devices):
        raise UserError(f"--devices must be auto, cpu or GPU ids like 0,1; got {spec!r}")
    return devices


def device_slots(devices: list[str], per_device: int = 1) -> list[str | None]:
    """One slot per job that may run at once: `per_device` per GPU id, or `per_device` on this machine (None)."""
    per_device = max(1, per_device)
    return [d for d in devices for _ in range(per_device)] if devices else [None] * per_device


def launch_jobs(
    jobs: list[Job],
    slots: list[str | None],
    poll_seconds: float = 0.5,
    on_done: Callable[[Job, int], None] | None = None,
) -> dict[str, int]:
    """Run `jobs`, one per slot at a time (a slot is a GPU id, or None: this machine); returns each started
    job's exit status. After a failure no new job starts, and the running ones finish. If this process is
    interrupted (Ctrl-C, SIGTERM, an error), the running jobs are stopped too: none trains on unattended."""
    pending, running, codes = list(jobs), {}, {}
    with _sigterm_as_interrupt():
        try:
            while pending or running:
                for index, slot in enumerate(slots):
                    if index in running or not pending or any(code != 0 for code in codes.values()):
                        continue
                    job = pending.pop(0)
                    running[index] = (job, *_start(job, slot))
                for index, (job, process, log) in list(running.items()):
                    code = process.poll()
                    if code is None:
                        continue
                    log.close()
                    del running[index]
                    codes[job.name] = code
                    print(f"{job.name}: {'done' if code == 0 else f'failed (exit {code})'}", flush=True)
                    if on_done is not None:
                        on_done(job, code)
                if any(code != 0 for code in codes.values()):
                    pending.clear()
                time.sleep(poll_seconds if running else 0)
        finally:
            _stop([process for _, process, _ in running.values()])
            for _, _, log in running.values():
                log.close()
    return codes


def _start(job: Job, slot: str | None) -> tuple[subprocess.Popen, object]:
    env = dict(os.environ)
    for name in ("WANDB_SWEEP_ID", "WANDB_RUN_ID"):  # an expert is not the sweep agent's run
        env.pop(name, None)
    if slot is not None:
        env["CUDA_VISIBLE_DEVICES"] = slot
    os.makedirs(os.path.dirname(job.log), exist_ok=True)
    # appended: a resumed expert keeps the log of its interrupted run (and a refused start does not erase it)
    log = open(job.log, "a")  # noqa: SIM115 - closed when the job ends
    where = f"GPU {slot}" if slot is not None else "this machine"
    print(f"{job.name}: training on {where} (log: {job.log})", flush=True)
    return subprocess.Popen(job.command, env=env, stdout=log, stderr=subprocess.STDOUT), log


def _stop(processes: list[subprocess.Popen], grace_seconds: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after `grace_seconds`, to every process still running."""
    alive = [p for p in processes if p.poll() is None]
    for process in alive:
        process.terminate()
    deadline = time.monotonic() + grace_seconds
    for process in alive:
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """While jobs run, SIGTERM to this process raises KeyboardInterrupt, so `launch_jobs` stops its children."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as values for a child's CUDA_VISIBLE_DEVICES: this process's own list
    when it has one (a child given "0" would otherwise see physical GPU 0, not the first visible one)."""
    import torch

    count = torch.cuda.device_count()
    visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return visible[:count] if visible else [str(i) for i in range(count)]


def run_jobs(jobs: list[Job], devices: list[str], poll_seconds: float = 0.5, per_device: int = 1) -> None:
    """Run `jobs`, `per_device` at a time on each GPU (one after another without devices); raise UserError on a
    failure."""
    codes = launch_jobs(jobs, device_slots(devices, per_device), poll_seconds)
    failed = [job for job in jobs if codes.get(job.name, 0) != 0]
    if failed:
        names = ", ".join(f"{job.name} (log: {job.log})" for job in failed)
        message = f"training failed for {names}: {last_line(failed[0].log)}"
        if codes[failed[0].name] == DivergenceError.exit_status:  # keep the status that says "diverged"
            raise DivergenceError(message, step=-1, epoch=-1, last_good=None)
        raise UserError(message)


ERROR_PREFIX = "askexpert: error: "


def last_line(path: str) -> str:
    """What a failed fit said: its `askexpert: error: ...` message (without the prefix, even when a progress
    bar shares its line), else the log's last non-empty line."""
    with open(path, errors="replace") as f:
        text = f.read()
    if ERROR_PREFIX in text:
        return text.rsplit(ERROR_PREFIX, 1)[1].strip().splitlines()[0]
    lines = [line.rsplit("\r", 1)[-1].strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "(empty log)"


def check_fit_arguments(fit_args: list[str], partition_file: str, first_expert: int, root: str) -> None:
    """Parse one expert's `fit` arguments in-process (nothing runs, nothing is written), so a typo fails
    once, here, instead of once per expert in a subprocess."""
    import contextlib
    import io

    from askexpert.cli import cli_main

    args = ["fit", *fit_args, "--partition", partition_file, "--expert_index", str(first_expert)]
    args += ["--trainer.default_root_dir", os.path.join(root, f"expert{first_expert}"), "--print_config"]
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            cli_main(args)
        except SystemExit as exit_:
            if exit_.code not in (0, None):
                raise UserError(f"the arguments for `fit` are not valid (exit status {exit_.code})") from None


def _wants_cpu(fit_args: list[str]) -> bool:
    for i, arg in enumerate(fit_args):
        if arg.startswith("--trainer.accelerator="):
            return arg.split("=", 1)[1] == "cpu"
        if arg == "--trainer.accelerator" and i + 1 < len(fit_args):
            return fit_args[i + 1] == "cpu"
    return False


def plan(partition_file: str, indices: list[int] | None, root: str, fit_args: list[str]) -> list[Job]:
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
    jobs = []
    for i in chosen:
        folder = os.path.join(root, f"expert{i}")
        command = [sys.executable, "-m", "askexpert", "fit", *fit_args, "--partition", partition_file]
        command += ["--expert_index", str(i), "--trainer.default_root_dir", folder]
        jobs.append(Job(f"expert {i}", command, os.path.join(folder, "fit.log")))
    return jobs


def run(argv: list[str]) -> list[Job]:
    from askexpert.parsers import command_parser

    own, fit_args = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    for arg in own:
        option = arg.split("=")[0]
        if option.startswith("--") and option not in (
            "--partition",
            "--root",
            "--devices",
            "--experts",
            "--per_device",
            "--help",
            "-h",
        ):
            raise UserError(
                f"unknown option {option} for `experts`; the arguments of each expert's `fit` go after `--`"
            )
    parser = command_parser(
        "experts",
        "Train every expert of a partition (arguments after -- go to `fit`).",
        with_data=False,
        with_config=False,
    )
    parser.add_argument("--partition", type=str, required=True, help="partition JSON")
    parser.add_argument("--root", type=str, default="runs/experts", help="experts go to ROOT/expert<I>")
    parser.add_argument("--devices", type=str, default="auto", help="auto, cpu, or GPU ids like 0,1")
    parser.add_argument("--experts", type=list[int] | None, default=None, help="which experts (default: all)")
    parser.add_argument(
        "--per_device", type=int, default=1, help="experts trained at once on each GPU (separate processes)"
    )
    args = parser.parse_args(own)
    if args.per_device < 1:
        raise UserError(f"--per_device must be at least 1, got {args.per_device}")
    devices = parse_devices(args.devices)
    if _wants_cpu(fit_args):
        devices = []  # CPU experts share the cores: one at a time
    jobs = plan(args.partition, args.experts, args.root, fit_args)
    check_fit_arguments(
        fit_args, args.partition, int(jobs[0].command[jobs[0].command.index("--expert_index") + 1]), args.root
    )
    concurrent = len(devices) > 1 or args.per_device > 1
    if concurrent and devices:
        for job in jobs:  # each subprocess sees exactly one GPU
            job.command += ["--trainer.devices", "1"]
    # One writer per experts root (askexpert/runs/lock.py); each expert's `fit` locks its own folder inside it.
    with locked(args.root):
        run_jobs(jobs, devices if concurrent else [], per_device=args.per_device)
    return jobs
