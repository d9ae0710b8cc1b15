#!/usr/bin/env bash
# Stop what cluster/slurm_up.sh started (jobs cancelled first); the packages and the munge key stay.
set -uo pipefail
if [ "$(id -u)" != 0 ]; then echo "slurm_down: needs root" >&2; exit 2; fi
scancel --user=root >/dev/null 2>&1 || true
pkill -x slurmd; pkill -x slurmctld; pkill -x munged
sleep 1
rm -rf /var/spool/slurmctld/* /var/spool/slurmd/*  # no job state carried into the next cluster
echo "slurm_down: stopped"
