#!/usr/bin/env bash
# CI, after the default suite: start the one-node SLURM cluster (cluster/slurm_up.sh) and run the `cluster` tests
# (real sbatch jobs through submitit, a 2-task DDP fit). Where SLURM cannot be started (not root, no package
# source, daemons that do not come up), the tests are skipped and this says why in one line; a test that fails
# on a cluster that is up fails CI.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
start=$(date +%s)
if [ "$(id -u)" != 0 ]; then
  echo "cluster tests skipped: not root, so SLURM cannot be installed or started here (cluster/slurm_up.sh)"
  exit 0
fi
# CI leaves no daemon behind: a cluster this script started is stopped when it exits, whatever happened (a
# daemon left running would outlive CI's job); one that was already running (a developer's) is left as it is.
if ! pgrep -x slurmctld >/dev/null && ! pgrep -x slurmd >/dev/null; then
  trap 'bash cluster/slurm_down.sh >/dev/null 2>&1 || true' EXIT
fi
if ! log=$(timeout 900 bash cluster/slurm_up.sh 2>&1); then
  echo "cluster tests skipped: SLURM could not be started: $(printf '%s\n' "$log" | tail -n 1)"
  exit 0
fi
up=$(date +%s)
echo "cluster: $(printf '%s\n' "$log" | tail -n 1) (start-up $((up - start)) s)"
set -e
"$PY" -m pytest -q -m cluster -p no:cacheprovider
echo "cluster tests: $(($(date +%s) - up)) s"
