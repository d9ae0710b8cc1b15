"""The submitit launcher's driver: every stage of a job graph not yet done, submitted as a job after the jobs of
its upstream stages, then followed until every stage is done or cannot be.

Re-entrant: `jobs.json` (in the job folder) records each stage's job id and log. A driver started again reads
it: a stage marked done in the store is done, a job the scheduler still lists is followed (never submitted
twice), and anything else (a job that failed, was cancelled or never ran) is submitted again; an interrupted
fit then resumes from its last.ckpt. With SLURM the driver may exit at any time (Ctrl-C, `--launcher.wait
false`): the jobs go on, and the same command picks them up.

A failed or diverged job is reported once, in one line with its job id and log; its dependants are cancelled
(SLURM's `kill-on-invalid-dep` does it too) and reported as not started. The other stages go on.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from askexpert.ablation.store import StageStore
from askexpert.cluster.graph import StageNode, dependants, training_needs
from askexpert.cluster.scheduler import Scheduler, failure_reason
from askexpert.cluster.stage_job import StageJob
from askexpert.errors import UserError
from askexpert.files.atomic import write_json
from askexpert.interrupts import Interrupted
from askexpert.pipeline.launcher_settings import LauncherSettings

JOBS_FILE = "jobs.json"


@dataclass
class Outcome:
    """What became of each stage: done, or why not (failed / diverged / not started / still running)."""

    done: set[str] = field(default_factory=set)
    failed: dict[str, str] = field(default_factory=dict)  # key -> one line (job id, reason, log)
    diverged: dict[str, dict] = field(default_factory=dict)  # key -> {stage, step, epoch, message}
    blocked: dict[str, str] = field(default_factory=dict)  # key -> the failed upstream key
    running: set[str] = field(default_factory=set)  # still queued or running (the driver did not wait)

    def divergence(self, keys: list[str]) -> dict | None:
        """Where the first diverged stage of `keys` diverged, else None."""
        return next((self.diverged[k] for k in keys if k in self.diverged), None)

    def problem(self, keys: list[str]) -> str | None:
        """Why a run with stages `keys` cannot be evaluated now, in one line; None when all are done."""
        for key in keys:
            if key in self.diverged:
                return f"stage {key} diverged"
            if key in self.failed:
                return self.failed[key]
            if key in self.blocked:
                return f"stage {key} not started: {self.blocked[key]} failed"
            if key in self.running:
                return f"stage {key} still running"
        return None


class Driver:
    def __init__(
        self, nodes: dict[str, StageNode], store: StageStore, settings: LauncherSettings, driver_folders: tuple
    ) -> None:
        self.nodes, self.store, self.settings = nodes, store, settings
        self.folder = jobs_folder(settings, store)
        self.driver_folders = tuple(os.path.realpath(f) for f in driver_folders)
        self.scheduler = Scheduler(settings, self.folder)
        self.record = load_jobs(self.folder)
        self.outcome = Outcome()
        self.in_flight: dict[str, str] = {}  # key -> job id

    # -- one pass over the graph -----------------------------------------------------------------------------
    def run(self) -> Outcome:
        os.makedirs(self.folder, exist_ok=True)
        self._adopt_running_jobs()
        self._submit_ready()
        if not self.settings.wait and self.scheduler.uses_slurm:
            self.outcome.running = set(self.in_flight)
            queued = len(self.in_flight)
            print(f"jobs: {queued} queued or running; run the same command again to follow them", flush=True)
            return self.outcome
        try:
            while self.in_flight:
                time.sleep(self.settings.poll_s if self.scheduler.uses_slurm else 0.2)
                self._collect_finished()
                self._submit_ready()
        except (KeyboardInterrupt, Interrupted):  # Ctrl-C, or SIGTERM/SIGINT under `main` (askexpert/interrupts.py)
            if self.scheduler.uses_slurm and self.in_flight:
                print(f"\n{len(self.in_flight)} jobs go on; run the same command again to follow them", flush=True)
            raise
        return self.outcome

    def _adopt_running_jobs(self) -> None:
        """Stages done in the store, and jobs of an earlier driver the scheduler still lists (followed, not
        submitted again); a recorded job that ended without finishing its stage is said in one line, then its
        stage is submitted again."""
        for key, node in self.nodes.items():
            if self.store.is_done(node.stage):
                self.outcome.done.add(key)
        root = self.store.root
        recorded = {
            key: entry
            for key, entry in self.record.items()
            if key in self.nodes and key not in self.outcome.done and entry.get("store", root) == root
        }
        jobs = [entry["job"] for entry in recorded.values()]
        alive = self.scheduler.alive(jobs) if self.scheduler.uses_slurm else set()
        for key, entry in recorded.items():
            job = entry["job"]
            if job in alive:
                self.in_flight[key] = job
                print(f"{key}: job {job} is still queued or running; following it", flush=True)
            elif self.scheduler.uses_slurm:
                why = failure_reason(entry.get("log", ""))
                print(f"{key}: its job {job} ended without finishing it ({why}); submitting it again", flush=True)

    def _submit_ready(self) -> None:
        """Submit, wave after wave, every stage that is not done, in flight, failed or blocked and whose upstream
        is done or (SLURM) in flight; one wave goes out as job arrays grouped by (upstream jobs, CPU-only)."""
        while True:
            wave: dict[tuple, list[StageNode]] = {}
            for key, node in self.nodes.items():
                after = self._upstream_jobs(node)
                if after is not None and not self._settled(key):
                    wave.setdefault((after, _cpu_only(node)), []).append(node)
            if not wave:
                return
            for (after, cpu_only), group in wave.items():
                self._submit(group, list(after), cpu_only)
            if not self.scheduler.uses_slurm:
                self._collect_finished()  # debug jobs ran already; local ones are followed by `run`

    def _settled(self, key: str) -> bool:
        o = self.outcome
        return key in o.done or key in self.in_flight or key in o.failed or key in o.blocked or key in o.diverged

    def _upstream_jobs(self, node: StageNode) -> tuple[str, ...] | None:
        """The jobs a stage must wait for (its upstream in flight), or None while it cannot be submitted yet.
        Without SLURM a stage waits in the driver until its upstream is done."""
        after = []
        for up in node.upstream:
            if up in self.outcome.done:
                continue
            if not (self.scheduler.uses_slurm and up in self.in_flight):
                return None
            after.append(self.in_flight[up])
        return tuple(sorted(set(after)))

    def _submit(self, group: list[StageNode], after: list[str], cpu_only: bool) -> None:
        for node in group:  # a divergence of an earlier try is not this job's
            self.store.clear_divergence(node.stage)
        submitted = self.scheduler.submit([self._job(node) for node in group], after, cpu_only)
        for node, job in zip(group, submitted, strict=True):
            self.in_flight[node.key] = job.job_id
            entry = {"job": job.job_id, "log": job.log, "submitted": time.time(), "store": self.store.root}
            self.record[node.key] = entry
            waits = f" after {', '.join(after)}" if after else ""
            print(f"{node.key}: submitted as job {job.job_id}{waits} (log: {job.log})", flush=True)
        _save_jobs(self.folder, self.record)

    def _collect_finished(self) -> None:
        """Stages whose job is no longer queued or running: done, diverged or failed. Upstream first: a job that
        SLURM cancelled because its upstream failed (kill-on-invalid-dep) is then found blocked, not failed."""
        alive = self.scheduler.alive(list(self.in_flight.values()))
        for key in [k for k in self.nodes if k in self.in_flight]:
            job = self.in_flight.get(key)
            if job is None or job in alive:  # blocked by a failure met in this pass, or still running
                continue
            node = self.nodes[key]
            if self.store.is_done(node.stage):
                del self.in_flight[key]
                self.outcome.done.add(key)
                print(f"{key}: done (job {job})", flush=True)
                continue
            waiting = [up for up in node.upstream if up not in self.outcome.done]
            if any(up in self.in_flight for up in waiting):
                continue  # its upstream is still ending (COMPLETING): decided when that one is
            del self.in_flight[key]
            if waiting:  # cancelled by SLURM because an upstream did not finish
                self.outcome.blocked.setdefault(key, waiting[0])
                print(f"{key}: not started ({waiting[0]} failed)", flush=True)
                self._block_dependants(key)
                continue
            log = self.record.get(key, {}).get("log", "")
            divergence = self.store.divergence(node.stage)
            if divergence is not None:
                self.outcome.diverged[key] = divergence
                print(f"{key}: DIVERGED (job {job}, step {divergence.get('step')}; log: {log})", flush=True)
            else:
                reason = self.scheduler.errors.get(job) or failure_reason(log)
                self.outcome.failed[key] = f"stage {key} failed (job {job}): {reason} (log: {log})"
                print(self.outcome.failed[key], flush=True)
            self._block_dependants(key)

    def _block_dependants(self, key: str) -> None:
        cancel = []
        for down in dependants(self.nodes, key):
            if down in self.outcome.blocked or down in self.outcome.done:
                continue
            self.outcome.blocked[down] = key
            job = self.in_flight.pop(down, None)
            if job:
                cancel.append(job)
            print(f"{down}: not started ({key} failed)", flush=True)
        self.scheduler.cancel(cancel)

    def _job(self, node: StageNode) -> StageJob:
        stages = {stage.name: stage for stage in node.run.stages}
        upstream = [stages[name] for name in _reads(node.stage.name, training_needs(node.run.stages))]
        threads = self.settings.cpus_per_fit if self.settings.cluster != "debug" else None
        return StageJob(
            node.key, node.stage, upstream, node.run.layout.root, node.run.settings, self.store.root, threads,
            self.driver_folders,
        )  # fmt: skip


def _reads(name: str, needs: dict[str, list[str]]) -> list[str]:
    """Every stage the stage `name` reads, directly or through the stages it reads (its job links them into the
    run folder): its training needs, followed up."""
    found: list[str] = []
    todo = list(needs[name])
    while todo:
        up = todo.pop()
        if up not in found:
            found.append(up)
            todo += needs[up]
    return found


def _cpu_only(node: StageNode) -> bool:
    """A stage that asks no GPU: the partition, or a fit whose trainer runs on CPU."""
    if not node.stage.trains:
        return True
    config = node.stage.config
    if "same_as" in config:  # experts 1.. point at expert 0's config
        config = next(s.config for s in node.run.stages if s.name == config["same_as"])
    return (config.get("trainer") or {}).get("accelerator") == "cpu"


def jobs_folder(settings: LauncherSettings, store: StageStore) -> str:
    """Where submitit keeps the job files and logs, and the driver its jobs.json."""
    return os.path.abspath(settings.folder or os.path.join(store.root, "jobs"))


def load_jobs(folder: str) -> dict:
    import json

    path = os.path.join(folder, JOBS_FILE)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as handle:
            record = json.load(handle)
    except (OSError, ValueError):
        record = None
    if not isinstance(record, dict) or not all(isinstance(e, dict) and "job" in e for e in record.values()):
        raise UserError(f"{path} is damaged; delete it (finished stages are kept in the store)")
    return record


def _save_jobs(folder: str, record: dict) -> None:
    write_json(os.path.join(folder, JOBS_FILE), record, indent=1, sort_keys=True)


def check_single_device(nodes: dict[str, StageNode]) -> None:
    """Each job trains one fit as one task: a stage whose trainer spans several devices or nodes is refused."""
    for node in nodes.values():
        trainer = (node.stage.config.get("trainer") or {}) if node.stage.trains else {}
        devices, num_nodes = trainer.get("devices", 1), trainer.get("num_nodes") or 1
        if _device_count(devices) > 1 or _device_count(num_nodes) > 1:
            raise UserError(
                f"stage {node.stage.name} trains on {devices} devices x {num_nodes} nodes; the submitit launcher runs "
                "each fit as one job on one device: set its trainer.devices to 1, or launch that fit by hand as "
                "docs/cluster.md ('One fit across nodes') shows"
            )


def _device_count(value) -> float:
    """How many devices (or nodes) a trainer value asks for: a count, a list or "0,1" of ids, -1 (every visible
    one: counted as many), "auto" (one per job: SLURM gives the job one)."""
    if isinstance(value, (list, tuple)):
        return len(value)
    if isinstance(value, str):
        text = value.strip()
        if "," in text:
            return len([part for part in text.split(",") if part.strip()])
        value = int(text) if text.lstrip("-").isdigit() else 1
    if isinstance(value, int):
        return float("inf") if value == -1 else value
    return 1
