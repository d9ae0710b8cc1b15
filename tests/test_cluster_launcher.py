"""The submitit launcher on a real SLURM cluster (`cluster/slurm_up.sh` starts a one-node one here): a tiny pipeline
and a two-cell ablation through real `sbatch`, a driver that exits and is started again, a job requeued and a
job cancelled. Marked `cluster` (not in the default run); skipped, with the reason, where SLURM does not answer.
The same logic without a scheduler: tests/test_launcher.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO, run_subprocess_env
from helpers.pipelines import write_configs
from helpers.slurm import slurm_unavailable

pytestmark = pytest.mark.cluster

# one CPU and one torch thread per job, two jobs at once on the 2-core node; no memory request (the node's)
SLURM = ["--launcher", "submitit", "--launcher.cpus_per_fit", "1", "--launcher.mem_gb", "null"]
SLURM += ["--launcher.poll_s", "1", "--launcher.time_min", "20"]


@pytest.fixture(scope="module", autouse=True)
def slurm():
    reason = slurm_unavailable()
    if reason:
        pytest.skip(reason)


def _env() -> dict:
    env = run_subprocess_env()
    env["OMP_NUM_THREADS"] = "1"  # the local run computes as the one-thread jobs do: identical floats
    return env


def _askexpert(*args: str, wait: bool = True) -> subprocess.CompletedProcess | subprocess.Popen:
    command = [sys.executable, "-m", "askexpert", *args]
    if not wait:
        return subprocess.Popen(
            command, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    return subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)


def _report(run: Path) -> dict:
    report = json.loads((run / "report.json").read_text())
    report.pop("provenance")
    return report


def _markers(store: Path) -> dict[str, dict]:
    return {p.name[: -len(".done")]: json.loads(p.read_text()) for p in store.glob("*.done")}


def _squeue_state(job: str) -> str | None:
    found = subprocess.run(["squeue", "-h", "-r", "-o", "%T", "-j", job], capture_output=True, text=True)
    return found.stdout.strip() or None


def _wait_until(predicate, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def _job_of(jobs_file: Path, prefix: str) -> str | None:
    if not jobs_file.is_file():
        return None
    try:
        record = json.loads(jobs_file.read_text())
    except ValueError:
        return None
    return next((entry["job"] for key, entry in record.items() if key.startswith(prefix)), None)


def _check_dependency_order(store: Path) -> None:
    """Every stage started after the stages it needs had finished (from the jobs' own start and end times)."""
    markers = _markers(store)
    ends = {name.rsplit("-", 1)[0]: m["finished"] for name, m in markers.items()}
    for name, marker in markers.items():
        if name.startswith("experts-"):
            assert marker["started"] >= ends["base"] and marker["started"] >= ends["partition"], name


def test_a_pipeline_through_sbatch_equals_the_local_one_and_survives_driver_exit_and_requeue(tmp_path):
    config = write_configs(tmp_path)
    local, cluster = tmp_path / "local", tmp_path / "cluster"
    started = time.monotonic()
    done = _askexpert("pipeline", "--config", str(config), "--out", str(local))
    assert done.returncode == 0, done.stderr[-3000:]
    # 1. submit and exit
    first = _askexpert("pipeline", "--config", str(config), "--out", str(cluster), *SLURM, "--launcher.wait", "false")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "run the same command again to follow them" in first.stdout and not (cluster / "report.json").exists()
    submitted = [line for line in first.stdout.splitlines() if ": submitted as job " in line]
    assert len(submitted) == 7  # generalist, base, partition, 2 + 2 experts: all at once, the experts with afterok
    assert sum(" after " in line for line in submitted) == 4
    # 2. requeue the generalist's job while it runs: SLURM restarts it, the stage trains to its end
    jobs_file = cluster / "store" / "jobs" / "jobs.json"
    generalist = _job_of(jobs_file, "generalist-")
    _wait_until(lambda: _squeue_state(generalist) == "RUNNING", 120, "the generalist's job to run")
    subprocess.run(["scontrol", "requeue", generalist], check=True, capture_output=True)
    # the second driver starts while a job runs (its stage's claim and fit locks are held inside --out)
    jobs = [entry["job"] for entry in json.loads(jobs_file.read_text()).values()]
    _wait_until(lambda: any(_squeue_state(job) == "RUNNING" for job in jobs), 120, "a job to run")
    # 3. a second driver follows the running jobs (submits none again) and evaluates
    second = _askexpert("pipeline", "--config", str(config), "--out", str(cluster), *SLURM)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert ": submitted as job " not in second.stdout and "still queued or running; following it" in second.stdout
    _check_dependency_order(cluster / "store")
    assert _report(cluster) == _report(local)
    print(f"pipeline through sbatch (with the local run): {time.monotonic() - started:.0f} s")


def test_a_two_cell_ablation_shares_stages_and_a_cancelled_job_is_resumed_by_a_rerun(tmp_path):
    config = write_configs(tmp_path)
    ablation = tmp_path / "ablation.yaml"
    spec = {"pipeline": str(config), "seeds": [0], "grid": {"specialization": ["static", "progressive"]}}
    spec["fixed"] = {"static_baseline": False}
    ablation.write_text(yaml.safe_dump(spec))
    out = tmp_path / "out"
    store, jobs_file = out / "store", out / "store" / "jobs" / "jobs.json"
    args = ["ablate", "--config", str(ablation), "--out", str(out), *SLURM]
    started = time.monotonic()
    driver = _askexpert(*args, wait=False)
    base = _wait_until(lambda: _job_of(jobs_file, "base-"), 120, "the base model's job")
    _wait_until(lambda: _squeue_state(base) == "RUNNING", 120, "the base model's job to run")
    subprocess.run(["scancel", base], check=True)
    stdout, stderr = driver.communicate(timeout=600)
    # the failure in one line with its job and log; the experts that need it never start; the grid is not whole
    failed = [line for line in stdout.splitlines() if line.startswith("stage base-") and f"(job {base}): " in line]
    assert len(failed) == 1 and "CANCELLED" in failed[0] and "(log: " in failed[0], stdout
    assert stdout.count("not started (base-") == 4
    assert driver.returncode == 2 and "Traceback" not in stderr, stderr[-4000:]
    assert stderr.strip().splitlines()[-1].startswith("askexpert: error: 2 of 2 runs could not finish because a stage")
    before = _markers(store)
    assert sorted(name.rsplit("-", 1)[0] for name in before) == ["generalist", "partition"]
    # the rerun submits the base model and the experts only; nothing finished is trained again
    rerun = _askexpert(*args)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    submitted = [line.split(":")[0] for line in rerun.stdout.splitlines() if ": submitted as job " in line]
    experts = [f"experts-{family}-{i}" for family in ("progressive", "static") for i in (0, 1)]
    assert sorted(key.rsplit("-", 1)[0] for key in submitted) == ["base", *experts]
    after = _markers(store)
    assert {name: after[name] for name in before} == before and len(after) == 7  # 7 distinct stages, each once
    _check_dependency_order(store)
    # both cells link the one generalist; both have results
    links = {
        os.path.realpath(out / "cells" / cell / "seed0" / "generalist")
        for cell in ("specialization=static", "specialization=progressive")
    }
    assert len(links) == 1
    assert "2 of 2 runs finished" in (out / "results.md").read_text()
    print(f"two-cell ablation through sbatch, with a cancelled job and a rerun: {time.monotonic() - started:.0f} s")
