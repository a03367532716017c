#!/bin/bash
# A real two-node Slurm cluster on this one machine, for trying the sbatch scripts and for their tests:
# munged, slurmctld and two slurmd (nodes n1 and n2, one CPU each, both on 127.0.0.1), every file of it
# (configuration, state, logs, munge key and socket) under one folder.
#
#   scripts/slurm/local_cluster.sh up   [DIR]   # start it (installs slurm-wlm and munge when run as root)
#   scripts/slurm/local_cluster.sh down [DIR]   # stop its daemons; DIR is kept for its logs
#   scripts/slurm/local_cluster.sh env  [DIR]   # the line that points Slurm's commands at it
#
# DIR defaults to ${TMPDIR:-/tmp}/ahiq-slurm. Ports: AHIQ_SLURM_PORT (the controller; the nodes take the two
# after it), 17000 by default. Debian's slurm-wlm 22.05 is what this was written against.
set -euo pipefail

command=${1:-}
DIR=${2:-${TMPDIR:-/tmp}/ahiq-slurm}
PORT=${AHIQ_SLURM_PORT:-17000}
NODES=(n1 n2)
export SLURM_CONF="$DIR/slurm.conf"

usage() { sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }

install_packages() {
    local missing=()
    for program in munged slurmctld slurmd sbatch; do
        command -v "$program" >/dev/null || PATH="$PATH:/usr/sbin" command -v "$program" >/dev/null || missing+=("$program")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" -ne 0 ]; then
        echo "local_cluster.sh: ${missing[*]} not found; install Debian's slurm-wlm and munge (as root: apt-get install slurm-wlm munge)" >&2
        exit 1
    fi
    echo "installing slurm-wlm and munge ..." >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null 2>&1 || {
        apt-get update -qq >/dev/null 2>&1
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
    }
}

write_config() {
    local user
    user=$(id -un)
    mkdir -p "$DIR/state" "$DIR/munge"
    for node in "${NODES[@]}"; do mkdir -p "$DIR/spool/$node"; done
    cat > "$SLURM_CONF" <<EOF
# Written by scripts/slurm/local_cluster.sh: two nodes on 127.0.0.1.
ClusterName=ahiq-local
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$PORT
SlurmUser=$user
SlurmdUser=$user
AuthType=auth/munge
# cred_expire is also how long a requeued job waits before it may start again (120 s by default)
AuthInfo=socket=$DIR/munge/socket,cred_expire=10
CredType=cred/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
# a requeued job starts once eligible, not at the next of the default 60-second scheduling passes
SchedulerParameters=sched_interval=1
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
MinJobAge=3600
KillWait=30
NodeName=n1 NodeHostname=localhost NodeAddr=127.0.0.1 Port=$((PORT + 1)) CPUs=1 State=UNKNOWN
NodeName=n2 NodeHostname=localhost NodeAddr=127.0.0.1 Port=$((PORT + 2)) CPUs=1 State=UNKNOWN
PartitionName=local Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munge() {
    if [ ! -f "$DIR/munge/key" ]; then
        head -c 1024 /dev/urandom > "$DIR/munge/key"
        chmod 0400 "$DIR/munge/key"
    fi
    chmod 0700 "$DIR/munge"
    PATH="$PATH:/usr/sbin" munged --force --key-file="$DIR/munge/key" --socket="$DIR/munge/socket" \
        --pid-file="$DIR/munge/pid" --log-file="$DIR/munge/log" --seed-file="$DIR/munge/seed"
}

wait_for_nodes() {
    for _ in $(seq 60); do
        if [ "$(sinfo -h -o '%t' 2>/dev/null | sort -u | tr '\n' ' ')" = "idle " ]; then return 0; fi
        sleep 0.5
    done
    echo "local_cluster.sh: the nodes did not come up; see $DIR/slurmctld.log and $DIR/slurmd-*.log" >&2
    sinfo >&2 || true
    exit 1
}

up() {
    install_packages
    if [ -f "$DIR/slurmctld.pid" ] && kill -0 "$(cat "$DIR/slurmctld.pid")" 2>/dev/null; then
        echo "a cluster already runs from $DIR; stop it with: $0 down $DIR" >&2
        exit 1
    fi
    write_config
    start_munge
    PATH="$PATH:/usr/sbin" slurmctld -f "$SLURM_CONF" -c   # -c: no jobs from an earlier cluster in DIR
    for node in "${NODES[@]}"; do PATH="$PATH:/usr/sbin" slurmd -f "$SLURM_CONF" -N "$node"; done
    wait_for_nodes
    echo "a two-node Slurm cluster runs from $DIR (nodes n1 n2, one CPU each). Use it with:"
    echo "    export SLURM_CONF=$SLURM_CONF"
    echo "    sbatch -N2 --wrap 'srun hostname'; squeue; sinfo"
    echo "stop it with: $0 down $DIR"
}

down() {
    local pids=()
    for file in "$DIR"/slurmd-*.pid "$DIR/slurmctld.pid" "$DIR/munge/pid"; do
        [ -f "$file" ] && pids+=("$(cat "$file")") && rm -f "$file"
    done
    [ ${#pids[@]} -gt 0 ] && kill "${pids[@]}" 2>/dev/null || true
    for _ in $(seq 40); do
        alive=0
        for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        [ "$alive" -eq 0 ] && break
        sleep 0.25
    done
    echo "stopped the cluster of $DIR (its logs are kept there)"
}

case "$command" in
    up) up ;;
    down) down ;;
    env) echo "export SLURM_CONF=$SLURM_CONF" ;;
    *) usage ;;
esac
