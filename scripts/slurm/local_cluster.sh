#!/usr/bin/env bash
# A one-node SLURM cluster on this machine (Debian/Ubuntu, root): munge + slurmctld + slurmd, one partition.
# It is how the tests run llmcl's SLURM scripts against a real SLURM (sbatch, srun, --dependency, requeue).
#
#   sudo bash scripts/slurm/local_cluster.sh          # install (apt) if needed, configure, start; idempotent
#   sudo bash scripts/slurm/local_cluster.sh stop     # stop the daemons
#
# Prints "local SLURM cluster ready: partition <p>, node <n>, <c> CPUs" when sinfo shows the node idle.
set -euo pipefail

PARTITION=${LLMCL_SLURM_PARTITION:-debug}
CONF_DIR=/etc/slurm
NODE=$(hostname -s)
CPUS=$(nproc)

OURS="# written by llmcl scripts/slurm/local_cluster.sh"
# Never touch a real cluster's configuration: only a slurm.conf this script wrote (or none) is replaced.
if [[ -f "$CONF_DIR/slurm.conf" ]] && ! grep -qF "$OURS" "$CONF_DIR/slurm.conf"; then
    if [[ "${1:-}" != "stop" ]] && sinfo -h >/dev/null 2>&1; then
        echo "local SLURM cluster ready: using the SLURM already configured here ($CONF_DIR/slurm.conf)"
        exit 0
    fi
    echo "local_cluster.sh: $CONF_DIR/slurm.conf exists and was not written by this script; leaving it alone" >&2
    exit 2
fi

if [[ "${1:-}" == "stop" ]]; then
    pkill -x slurmd 2>/dev/null || true
    pkill -x slurmctld 2>/dev/null || true
    pkill -x munged 2>/dev/null || true
    exit 0
fi

if [[ $(id -u) -ne 0 ]]; then
    echo "local_cluster.sh: run as root (it installs packages and starts daemons)" >&2
    exit 2
fi

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq slurm-wlm munge >/dev/null
fi

# munge: one key, daemon as root (a container has no init system)
mkdir -p /etc/munge /var/lib/munge /var/log/munge /run/munge
if [[ ! -s /etc/munge/munge.key ]]; then
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge /run/munge 2>/dev/null || true
chmod 0400 /etc/munge/munge.key
chmod 0700 /etc/munge
if ! pgrep -x munged >/dev/null; then
    runuser -u munge -- /usr/sbin/munged 2>/dev/null || /usr/sbin/munged --force
fi

mkdir -p "$CONF_DIR" /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
MEM_MB=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
cat > "$CONF_DIR/slurm.conf" <<CONF
$OURS: a one-node test cluster
ClusterName=llmcl-local
SlurmctldHost=$NODE
AuthType=auth/munge
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobRequeue=1
KillWait=30
MinJobAge=600
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
NodeName=$NODE CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF
rm -f "$CONF_DIR/cgroup.conf"  # no cgroups: processes are tracked by /proc (containers have no cgroup access)

if ! pgrep -x slurmctld >/dev/null; then
    /usr/sbin/slurmctld -c || echo "local_cluster.sh: slurmctld did not start" >&2
fi
if ! pgrep -x slurmd >/dev/null; then
    /usr/sbin/slurmd || echo "local_cluster.sh: slurmd did not start" >&2
fi

for _ in $(seq 1 60); do
    state=$(sinfo -h -n "$NODE" -o %t 2>/dev/null || true)
    if [[ "$state" == "idle" || "$state" == "mix" || "$state" == "alloc" ]]; then
        echo "local SLURM cluster ready: partition $PARTITION, node $NODE, $CPUS CPUs"
        exit 0
    fi
    if [[ "$state" == down* || "$state" == drain* ]]; then
        scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true
    fi
    sleep 1
done
echo "local_cluster.sh: the node did not become idle; see /var/log/slurm/slurmctld.log and slurmd.log" >&2
exit 1
