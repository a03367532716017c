# Sourced by train.sbatch and score.sbatch: one `python -m ahiq launch` (torchrun's agent) per node, and the
# job requeued when the run stopped for a signal (the time limit's --signal, preemption, scancel -s TERM).
#
# The requeue decision is the run's own: a run stopped by a signal, with its work kept, writes the file
# AHIQ_STOP_MARKER names, on a filesystem every node sees (by default in the folder the job was submitted
# from). A job that ends any other way, a failure included, is not requeued.
#
# Processes per node: AHIQ_PROCS_PER_NODE when set, else the GPUs Slurm gave each node (--gpus-per-node,
# --gres=gpu:N), else one. The rendezvous: MASTER_ADDR (default: the address Slurm reaches the job's first
# node at, its NodeAddr) and MASTER_PORT (default: 20000 + the job id modulo 10000, so that two jobs whose
# first node is the same machine do not meet).

procs_per_node() {
    local gpus=${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-}}
    gpus=${gpus##*:}  # "a100:4" -> 4
    if [ -n "${AHIQ_PROCS_PER_NODE:-}" ]; then
        echo "$AHIQ_PROCS_PER_NODE"
    elif [[ "$gpus" =~ ^[0-9]+$ ]] && [ "$gpus" -gt 0 ]; then
        echo "$gpus"
    else
        echo 1
    fi
}

first_node_address() {
    local first
    first=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    scontrol show node "$first" 2>/dev/null | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p' | grep . || echo "$first"
}

# run_launched PROGRAM [ARGS...]: the program under one launcher per node; requeues after a signal stop.
run_launched() {
    local procs status
    procs=$(procs_per_node)
    if ! [[ "$procs" =~ ^[0-9]+$ ]] || [ "$procs" -lt 1 ]; then
        echo "job.sh: AHIQ_PROCS_PER_NODE must be a whole number of at least 1, got '$procs'" >&2
        exit 2
    fi
    export MASTER_ADDR=${MASTER_ADDR:-$(first_node_address)}
    export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 10000))}
    export AHIQ_STOP_MARKER=${AHIQ_STOP_MARKER:-${SLURM_SUBMIT_DIR:-$PWD}/.ahiq-stopped-$SLURM_JOB_ID}
    if ! rm -f "$AHIQ_STOP_MARKER" || ! touch "$AHIQ_STOP_MARKER" 2>/dev/null; then
        echo "job.sh: cannot write AHIQ_STOP_MARKER=$AHIQ_STOP_MARKER; set it to a file on a filesystem every node sees" >&2
        exit 2
    fi
    rm -f "$AHIQ_STOP_MARKER"
    echo "job $SLURM_JOB_ID (run $((${SLURM_RESTART_COUNT:-0} + 1))): $SLURM_NNODES node(s) x $procs process(es), rendezvous at $MASTER_ADDR:$MASTER_PORT"
    srun --kill-on-bad-exit=1 python -m ahiq launch \
        --nnodes "$SLURM_NNODES" --nproc_per_node "$procs" \
        --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "$SLURM_JOB_ID" \
        --shutdown-timeout "${AHIQ_SHUTDOWN_TIMEOUT:-240}" "$@"
    status=$?
    if [ -f "$AHIQ_STOP_MARKER" ]; then
        echo "requeueing job $SLURM_JOB_ID: $(head -n 1 "$AHIQ_STOP_MARKER")"
        rm -f "$AHIQ_STOP_MARKER"
        scontrol requeue "$SLURM_JOB_ID"
        exit 0
    fi
    exit "$status"
}
