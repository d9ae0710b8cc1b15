"""The `--launcher` settings of `pipeline` and `ablate`: where training stages run.

    --launcher local                      every stage in this process (default; unchanged)
    --launcher submitit                   every stage as a SLURM job through submitit, with the defaults below
    --launcher configs/launcher/slurm.yaml   the same, settings from a file of their own
    --launcher.partition gpu --launcher.time_min 120 ...   any single setting

`--launcher NAME` is shorthand for `--launcher.name NAME` (`launcher_shorthand`); a path loads the whole
group from YAML, as jsonargparse does for any group. Defaults fit one GPU per fit; a stage whose trainer runs on
CPU asks for none (askexpert/cluster/scheduler.py). The launcher itself lives in askexpert/cluster/.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

LAUNCHERS = ("local", "submitit")
# sbatch options the launcher sets itself: one in --launcher.sbatch would silently change how jobs are followed
LAUNCHER_OWNED_SBATCH = {
    "dependency", "array", "output", "error", "signal", "job-name", "job_name", "wrap", "parsable", "open-mode",
    "kill-on-invalid-dep", "requeue", "no-requeue",
}  # fmt: skip
EXECUTORS = ("slurm", "local", "debug")


@dataclass
class LauncherSettings:
    """Where training stages run; every option but `name` is read only by the submitit launcher.

    Args:
        name: local (every stage in this process) or submitit (every stage a job).
        cluster: submitit's executor: slurm, or its local (subprocesses, no queue) or debug (in this process)
            executors, which run the same jobs without a scheduler (tests, a laptop).
        partition: SLURM partition (default: the cluster's default partition).
        gpus_per_fit: GPUs of each `fit` job (a stage whose trainer runs on CPU asks for none).
        cpus_per_fit: CPU cores of each job (also its torch threads).
        mem_gb: memory of each job in GB (None: the partition's default).
        time_min: time limit of each job in minutes; a job that reaches it is requeued and resumes.
        account: SLURM account to charge (--account).
        qos: SLURM quality of service (--qos).
        sbatch: any other sbatch options, {option: value}, e.g. {constraint: a100, exclude: node3}.
        folder: where submitit keeps job files and logs (default: jobs/ in the stage store); must be on a file
            system the compute nodes share.
        wait: wait for the jobs, then evaluate; false (SLURM only): submit and exit, and run the same command
            again later to follow them and evaluate.
        poll_s: seconds between looks at the queue while waiting.
        array_parallelism: jobs of one array that may run at once.
    """

    name: Literal["local", "submitit"] = "local"
    cluster: Literal["slurm", "local", "debug"] = "slurm"
    partition: str | None = None
    gpus_per_fit: int = 1
    cpus_per_fit: int = 8
    mem_gb: float | None = 32.0
    time_min: int = 240
    account: str | None = None
    qos: str | None = None
    sbatch: dict[str, Any] = field(default_factory=dict)
    folder: str | None = None
    wait: bool = True
    poll_s: float = 10.0
    array_parallelism: int = 64


def add_launcher_arguments(parser) -> None:
    parser.add_class_arguments(LauncherSettings, "launcher", help="where training stages run (see docs/cluster.md)")


def launcher_shorthand(argv: list[str]) -> list[str]:
    """`--launcher local|submitit` (or `--launcher=...`) as `--launcher.name ...`; a path stays a config file."""
    out, index = [], 0
    while index < len(argv):
        word = argv[index]
        if word == "--launcher" and index + 1 < len(argv) and argv[index + 1] in LAUNCHERS:
            out += [f"--launcher.name={argv[index + 1]}"]
            index += 2
            continue
        if word.startswith("--launcher=") and word.split("=", 1)[1] in LAUNCHERS:
            word = f"--launcher.name={word.split('=', 1)[1]}"
        out.append(word)
        index += 1
    return out


def launcher_settings(namespace) -> LauncherSettings:
    """The parsed `launcher` group as settings, checked (one line for a bad value)."""
    from askexpert.errors import UserError

    values = namespace.as_dict() if hasattr(namespace, "as_dict") else dict(namespace or {})
    values = {key: value for key, value in values.items() if not key.startswith("__")}  # e.g. a file's __path__
    settings = LauncherSettings(**values)
    if settings.name not in LAUNCHERS:
        raise UserError(f"--launcher must be one of {', '.join(LAUNCHERS)}, got {settings.name!r}")
    if settings.cluster not in EXECUTORS:
        raise UserError(f"--launcher.cluster must be one of {', '.join(EXECUTORS)}, got {settings.cluster!r}")
    for key in ("gpus_per_fit", "cpus_per_fit", "time_min", "array_parallelism"):
        value = getattr(settings, key)
        if not isinstance(value, int) or value < (0 if key == "gpus_per_fit" else 1):
            least = "0 or more" if key == "gpus_per_fit" else "1 or more"
            raise UserError(f"--launcher.{key} must be a whole number, {least}; got {value!r}")
    if settings.mem_gb is not None and not (math.isfinite(settings.mem_gb) and settings.mem_gb > 0):
        raise UserError(f"--launcher.mem_gb must be positive (or null: the partition's default), got {settings.mem_gb}")
    if not (math.isfinite(settings.poll_s) and settings.poll_s > 0):
        raise UserError(f"--launcher.poll_s must be a positive number of seconds, got {settings.poll_s}")
    if not isinstance(settings.sbatch, dict):
        raise UserError(f"--launcher.sbatch must map sbatch options to values, got {settings.sbatch!r}")
    ours = sorted(str(key) for key in settings.sbatch if str(key).lstrip("-") in LAUNCHER_OWNED_SBATCH)
    if ours:
        raise UserError(
            f"--launcher.sbatch sets {', '.join(ours)}, which the launcher sets for every job (dependencies, arrays, "
            "logs, signals, its name); use the launcher's own settings for the rest"
        )
    return settings
