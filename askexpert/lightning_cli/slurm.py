"""One fit across several processes or nodes under SLURM: SLURM's tasks against the Trainer's devices x nodes.

Inside a SLURM job (`SLURM_NTASKS` set, job name not "bash" or "interactive") Lightning uses its
`SLURMEnvironment`: it starts no process itself, every process is one SLURM task started by `srun`, and the ranks
come from SLURM. So `--ntasks-per-node` must equal `--trainer.devices` and `--nodes` `--trainer.num_nodes`
(configs/trainer/ddp_multinode.yaml, cluster/fit_multinode.sbatch). Lightning finds a mismatch inside
`Trainer.__init__` or its DDP launcher (a RuntimeError or ValueError traceback from every task), or not at all:
a second task with one device trains a second copy of the run, a DDP fit started without `srun` waits forever
for its other ranks. `check_slurm_tasks` says what to change, in one line, before the Trainer is built
(`askexpert.lightning_cli.trainer.add_house_parts`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from lightning.fabric.plugins.environments import ClusterEnvironment

from askexpert.errors import UserError

# Lightning's `_is_slurm_interactive_mode`: jobs so named are not launched by srun (`srun --pty bash`)
INTERACTIVE_JOB_NAMES = ("bash", "interactive")


def check_slurm_tasks(trainer_config: Mapping, environ: Mapping[str, str] | None = None) -> None:
    """Refuse a Trainer whose devices x nodes do not match the SLURM tasks Lightning will run it as.

    The first task (`SLURM_PROCID` 0) raises the `UserError`; the other tasks of the same `srun` leave with the
    same exit status without a word, so the job's output holds the reason once, not once per task."""
    environ = os.environ if environ is None else environ
    problem = slurm_task_problem(trainer_config, environ)
    if problem is None:
        return
    if environ.get("SLURM_PROCID", "0") != "0":
        raise SystemExit(2)
    raise UserError(problem)


def slurm_task_problem(trainer_config: Mapping, environ: Mapping[str, str]) -> str | None:
    """What does not match between SLURM's tasks and the Trainer's `devices` x `num_nodes`; None when all does (or
    Lightning will not use its SLURMEnvironment: outside SLURM, interactive jobs, torchrun, a cluster environment
    given as a plugin)."""
    if not uses_slurm_environment(trainer_config, environ):
        return None
    tasks = _int(environ.get("SLURM_NTASKS"))
    if tasks is None:
        return None
    nodes = _int(environ.get("SLURM_NNODES") or environ.get("SLURM_JOB_NUM_NODES")) or 1
    per_node = _int(environ.get("SLURM_NTASKS_PER_NODE"))
    devices = trainer_devices(trainer_config.get("accelerator", "auto"), trainer_config.get("devices", "auto"))
    num_nodes = _int(trainer_config.get("num_nodes", 1)) or 1
    started_by_srun = "SLURM_STEP_ID" in environ or "SLURM_STEPID" in environ  # not set in the batch script
    # SLURM's split of the tasks over the nodes (`--ntasks-per-node`), or what `--ntasks` gives each node
    tasks_per_node = per_node or (tasks // nodes if tasks % nodes == 0 else None)
    asks = "?" if devices is None else _layout(devices, num_nodes)

    if per_node is None and tasks > 1:  # Lightning's SLURMEnvironment raises a RuntimeError for any Trainer
        reads = "Lightning reads the tasks per node from --ntasks-per-node, not --ntasks"
        if devices is None:
            return f"SLURM gives {tasks} tasks (--ntasks={tasks}) but {reads}: run the job with --ntasks-per-node"
        fixes = [f"run the job with {_slurm_options(devices, num_nodes, nodes)} instead of --ntasks={tasks}"]
        if devices * num_nodes == tasks:
            return f"SLURM gives {tasks} tasks (--ntasks={tasks}) for {asks} but {reads}: {fixes[0]}"
        if tasks_per_node is not None:
            trainer = _trainer_options(tasks_per_node, nodes, devices, num_nodes)
            fixes.append(f"set {trainer} and run it with --ntasks-per-node={tasks_per_node}")
        return (
            f"SLURM gives {tasks} tasks (--ntasks={tasks}) but the trainer asks for {asks} "
            f"(one task per device; {reads}): {', or '.join(fixes)}"
        )
    if devices is None:
        return None
    if devices * num_nodes == 1:
        # one process in a batch script is a plain `sbatch` fit (or one of the `experts` command's): Lightning
        # runs it whatever the job's tasks; several tasks of one srun would each train a copy of the run
        mismatch = started_by_srun and tasks > 1
    else:  # Lightning's own `validate_settings`, and one task per process of the DDP world
        mismatch = tasks != devices * num_nodes or nodes != num_nodes or per_node not in (None, devices)
    if mismatch:
        gives = f"{tasks} task{'s' if tasks != 1 else ''}"
        if per_node is not None:
            gives += f" ({per_node} per node x {nodes} node{'s' if nodes != 1 else ''})"
        elif nodes > 1:
            gives += f" on {nodes} nodes"
        fixes = [f"run the job with {_slurm_options(devices, num_nodes, nodes)}"]
        if tasks_per_node is not None:
            fixes.insert(0, f"set {_trainer_options(tasks_per_node, nodes, devices, num_nodes)}")
        return f"SLURM gives {gives} but the trainer asks for {asks} (one task per device): {' or '.join(fixes)}"
    if not started_by_srun and devices * num_nodes > 1:
        return (
            f"the trainer asks for {asks}, one process per device, but under SLURM Lightning starts none itself and "
            "this process was not started by srun (it would wait for the others forever): launch it as "
            "`srun python -m askexpert fit ...` inside the job (cluster/fit_multinode.sbatch)"
        )
    return None


def uses_slurm_environment(trainer_config: Mapping, environ: Mapping[str, str]) -> bool:
    """Whether Lightning will pick its SLURMEnvironment for this Trainer (its `detect()`, after TorchElastic)."""
    if "SLURM_NTASKS" not in environ or environ.get("SLURM_JOB_NAME") in INTERACTIVE_JOB_NAMES:
        return False
    if "TORCHELASTIC_RUN_ID" in environ:  # torchrun inside a SLURM job: TorchElastic's ranks, not SLURM's
        return False
    plugins = trainer_config.get("plugins") or []
    plugins = plugins if isinstance(plugins, (list, tuple)) else [plugins]
    if any(isinstance(p, ClusterEnvironment) for p in plugins):
        return False
    return getattr(trainer_config.get("strategy"), "cluster_environment", None) is None


def trainer_devices(accelerator: object, devices: object) -> int | None:
    """How many devices per node the Trainer will use (Lightning's own parsing of `devices`); None when this
    cannot tell (an accelerator other than CPU or CUDA, GPUs asked for where none is visible): Lightning then
    says what is wrong itself."""
    from askexpert.lightning_cli.trainer_options import accelerator_kind

    kind = accelerator_kind(accelerator)
    if kind is None:
        return None
    try:
        if devices == "auto":
            devices = kind.auto_device_count()
        return len(kind.get_parallel_devices(kind.parse_devices(devices)))
    except Exception:  # Lightning's own check of `devices` reports it, with its own message
        return None


def _int(value: object) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _layout(devices: int, nodes: int) -> str:
    return f"{devices} device{'s' if devices != 1 else ''} x {nodes} node{'s' if nodes != 1 else ''}"


def _trainer_options(devices: int, num_nodes: int, asked_devices: int | None, asked_nodes: int) -> str:
    options = [f"--trainer.devices {devices}"] if devices != asked_devices else []
    if num_nodes != asked_nodes:
        options.append(f"--trainer.num_nodes {num_nodes}")
    return " ".join(options) or f"--trainer.devices {devices}"


def _slurm_options(devices: int, num_nodes: int, nodes: int) -> str:
    options = [f"--nodes={num_nodes}"] if num_nodes != nodes else []
    return " ".join([*options, f"--ntasks-per-node={devices}"])
