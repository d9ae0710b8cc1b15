#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for the `cluster` tests (issue 25): munge, slurmctld and slurmd on
# localhost, every CPU of the machine, no GPU. Needs root (apt-get, daemons). Idempotent: a running cluster is
# left as it is. Tear it down with cluster/slurm_down.sh.
#   sudo bash cluster/slurm_up.sh        # then: sinfo; srun hostname
set -euo pipefail
if [ "$(id -u)" != 0 ]; then echo "slurm_up: needs root (apt-get and the daemons)" >&2; exit 2; fi
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  # a fresh machine may have no package lists yet: update them once if the first try cannot find the packages
  if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null 2>&1; then
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
  fi
fi
host=$(hostname -s)
cpus=$(nproc)
memory=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge /etc/munge /var/lib/munge \
  /var/log/munge
# munge: one key for the one node; its daemon runs as the munge user, as Debian packages it
if [ ! -s /etc/munge/munge.key ]; then
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge
chmod 700 /etc/munge && chmod 400 /etc/munge/munge.key
# every daemon starts with its standard streams on /dev/null: none keeps the caller's pipe (CI's log) open
if ! pgrep -x munged >/dev/null; then runuser -u munge -- /usr/sbin/munged </dev/null >/dev/null 2>&1; fi
cat > /etc/slurm/slurm.conf <<CONF
# written by askexpert's cluster/slurm_up.sh: one node, localhost, no GPU, no accounting
ClusterName=askexpert
SlurmctldHost=${host}
AuthType=auth/munge
SlurmUser=root
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmdSpoolDir=/var/spool/slurmd
StateSaveLocation=/var/spool/slurmctld
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
# no cgroup hierarchy to rely on in a VM or container: track processes by their parent, confine nothing
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
NodeName=${host} CPUs=${cpus} RealMemory=${memory} State=UNKNOWN
PartitionName=debug Nodes=${host} Default=YES MaxTime=INFINITE State=UP
CONF
if ! pgrep -x slurmctld >/dev/null; then slurmctld </dev/null >/dev/null 2>&1; fi
if ! pgrep -x slurmd >/dev/null; then slurmd </dev/null >/dev/null 2>&1; fi
for _ in $(seq 30); do
  state=$(sinfo -h -n "$host" -o %t 2>/dev/null || true)
  case "$state" in
    idle*|mix*|alloc*) echo "slurm_up: node $host $state, $cpus CPUs, ${memory} MB"; exit 0 ;;
    down*|drain*) scontrol update nodename="$host" state=resume >/dev/null 2>&1 || true ;;
  esac
  sleep 1
done
echo "slurm_up: the node did not come up; see /var/log/slurm/slurmctld.log and slurmd.log" >&2
exit 1
