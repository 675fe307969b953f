# Sourced by slurm/*.sbatch (not a job script itself): the conventions every v2pe job shares.
#
# Environment (sbatch hands the submitting shell's environment to the job):
#   V2PE_PYTHON         the Python that has v2pe-megatron installed; default $SLURM_SUBMIT_DIR/.venv/bin/python
#                       (the `make setup` venv of the checkout sbatch was run from), else python3 on PATH
#   V2PE_MAX_RESTARTS   how many times a job that stopped with "saved, resume me" (exit 75) is requeued
#                       before it gives up (default 10); the count is Slurm's SLURM_RESTART_COUNT.
#                       Only 75 requeues: the ranks exit 75 only after saving a checkpoint of steps
#                       this start trained, so every requeue resumes later than the one before. A
#                       stop that saved nothing new (128+N, e.g. 138 for USR1 before the first step)
#                       is not requeued: the next start would begin where this one did.
#   V2PE_SRUN_WAIT      seconds srun lets the other ranks run on after the first one ended (default 60):
#                       a rank that died leaves the others blocked in a collective
#   MASTER_ADDR, MASTER_PORT   rendezvous; default the allocation's first node, port 20000 + job id % 20000
#   OMP_NUM_THREADS, CUDA_DEVICE_MAX_CONNECTIONS, TORCH_NCCL_*, NCCL_*: defaults below, each overridable
set -uo pipefail  # not -e: the ranks' exit code decides what happens next

v2pe_die() { echo "v2pe: $*" >&2; exit 2; }
[ -n "${SLURM_JOB_ID:-}" ] || v2pe_die "this is a Slurm batch script: submit it with sbatch"

# The scripts run from Slurm's spool folder, not from slurm/: nothing here may depend on their location.
if [ -n "${V2PE_PYTHON:-}" ]; then
    V2PE_PY=$V2PE_PYTHON
elif [ -x "${SLURM_SUBMIT_DIR:-.}/.venv/bin/python" ]; then
    V2PE_PY=$SLURM_SUBMIT_DIR/.venv/bin/python
else
    V2PE_PY=$(command -v python3) || v2pe_die "no Python: set V2PE_PYTHON=/path/to/.venv/bin/python"
fi
[ -x "$V2PE_PY" ] || v2pe_die "V2PE_PYTHON=$V2PE_PY is not an executable; point it at the venv's bin/python"

# Rendezvous from the allocation: the first node hosts the store; a per-job port keeps two jobs that
# share a node apart (runtime/distributed.py derives the same when these are unset; set here so the
# log says what was used).
if [ -z "${MASTER_ADDR:-}" ]; then
    MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" 2>/dev/null | head -n 1)
    MASTER_ADDR=${MASTER_ADDR:-$(hostname)}
fi
export MASTER_ADDR
export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}

# One CPU thread per rank unless the job gave each task more cores.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
# Megatron's TP / sequence-parallel and CP communication overlap relies on kernels being issued in
# order on one hardware queue; megatron-core asks for this setting.
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
# Do not keep tensors alive by recording them on NCCL's streams (lower peak memory; the
# Megatron-LM / Megatron-Bridge launch default).
export TORCH_NCCL_AVOID_RECORD_STREAMS=${TORCH_NCCL_AVOID_RECORD_STREAMS:-1}
# NVLink SHARP buffers cost GPU memory per communicator, and TP x CP x DP makes many of them.
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
export PYTHONUNBUFFERED=1  # the log shows each step as it happens

# Set by the trap below: Slurm itself sent the batch shell SIGTERM (scancel, preemption, an
# administrator's requeue, the hard time limit). Then Slurm decides what becomes of the job, and
# a requeue from here would fight it. The time-limit signal (USR1) goes to the ranks only.
V2PE_GOT_TERM=""
trap 'V2PE_GOT_TERM=1' TERM
# USR1 is for the ranks; one that reaches the batch shell too (scancel --full, --signal=B:USR1) must
# not kill it. A no-op trap, not `trap '' USR1`: an ignored signal would stay ignored in srun's ranks.
trap ':' USR1

# The stop signal's lead as far as the job can know it: SBATCH_SIGNAL from the submitting shell,
# else the running script's own #SBATCH --signal line (Slurm does not tell a job its --signal; one
# given on sbatch's command line wins over both, hence the warning's wording).
v2pe_signal_spec() {
    if [ -n "${SBATCH_SIGNAL:-}" ]; then
        echo "$SBATCH_SIGNAL"
    else
        sed -n 's/^#SBATCH[[:space:]]*--signal=//p' "$0" 2>/dev/null | head -n 1
    fi
}

# Warn (stderr, never fatal) when the job's time limit is not longer than its signal lead: Slurm
# would signal it at start, every start.
v2pe_check_time_limit() {
    local limit spec
    spec=$(v2pe_signal_spec)
    [ -n "$spec" ] || return 0
    limit=$(squeue -h -j "$SLURM_JOB_ID" -o %l 2>/dev/null) || return 0
    "$V2PE_PY" -c 'import sys
from v2pe_megatron.runtime.sbatch import time_limit_warning
w = time_limit_warning(*sys.argv[1:])
w and print("v2pe: " + w + " (unless the sbatch command line gave another --signal)", file=sys.stderr)' \
        "$limit" "$spec" || true
}

# v2pe_srun MODULE ARGS...: one rank per Slurm task, then requeue on exit 75 (bounded), otherwise
# exit with the ranks' code. bash runs the trap only once srun has returned: the ranks save first.
v2pe_srun() {
    local module=$1 rc restarts=${SLURM_RESTART_COUNT:-0} max=${V2PE_MAX_RESTARTS:-10}
    shift
    echo "v2pe: job $SLURM_JOB_ID ($SLURM_JOB_NAME), start $((restarts + 1)), $(date -u +%FT%TZ):" \
         "${SLURM_NTASKS:-1} rank(s) on ${SLURM_JOB_NUM_NODES:-1} node(s) [$SLURM_JOB_NODELIST]," \
         "master $MASTER_ADDR:$MASTER_PORT, in $PWD, $V2PE_PY -m $module $*"
    v2pe_check_time_limit
    # --kill-on-bad-exit=0: exit 75 is not a failure (some clusters default to 1, which would kill
    # ranks still saving); --wait bounds how long a lost rank can leave the others waiting.
    srun --kill-on-bad-exit=0 --wait="${V2PE_SRUN_WAIT:-60}" "$V2PE_PY" -m "$module" "$@"
    rc=$?
    echo "v2pe: ranks exited with code $rc at $(date -u +%FT%TZ)"
    if [ "$rc" -eq 75 ]; then
        if [ -n "$V2PE_GOT_TERM" ]; then
            echo "v2pe: saved after Slurm's SIGTERM (scancel, preemption or requeue): Slurm decides the job's" \
                 "fate, not requeueing here; 'sbatch' the same command again to continue"
        elif [ "$restarts" -ge "$max" ]; then
            echo "v2pe: saved, but this job was already requeued $restarts times (V2PE_MAX_RESTARTS=$max):" \
                 "not requeueing; 'sbatch' the same command (same --job-name) to continue"
        elif scontrol requeue "$SLURM_JOB_ID"; then
            echo "v2pe: saved; requeued job $SLURM_JOB_ID (restart $((restarts + 1)) of $max): it resumes" \
                 "from its checkpoint when Slurm starts it again"
        else
            echo "v2pe: saved, but 'scontrol requeue $SLURM_JOB_ID' failed (was the job submitted with" \
                 "--no-requeue?): 'sbatch' the same command again to continue" >&2
        fi
    elif [ "$rc" -gt 128 ] && [ "$rc" -lt 160 ]; then
        echo "v2pe: exit code $rc: the ranks ended by SIG$(kill -l $((rc - 128)) 2>/dev/null) without saving" \
             "anything new (a stop that saved exits 75): not requeued, a new start would begin where this one did" >&2
        if [ "$rc" -eq $((128 + $(kill -l USR1))) ]; then
            echo "v2pe: USR1 is the time-limit signal (--signal=USR1@N): a job whose --time is not longer than N" \
                 "plus start-up gets it before its first step, at every start" >&2
        fi
    elif [ "$rc" -ne 0 ]; then
        echo "v2pe: exit code $rc is an error, not a stop request: not requeued (see the messages above)" >&2
    fi
    return "$rc"
}
