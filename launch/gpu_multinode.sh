#!/usr/bin/env bash
# Runs `genclip-jax train|eval` on several GPU nodes under SLURM, one JAX process per GPU
# (--mode=per-gpu) or per node (--mode=per-node), with explicit jax.distributed settings:
#   coordinator  = first host of $SLURM_JOB_NODELIST (scontrol show hostnames) : PORT
#   num_processes = $SLURM_NTASKS, process_id = $SLURM_PROCID (evaluated inside every task).
# Outside an allocation it submits a generated batch script with sbatch; inside one
# (salloc, or an existing batch job) it runs srun directly. --dry-run prints the script / the
# commands ("+ ..." lines) and runs nothing (no SLURM needed). See launch/README.md.
set -euo pipefail

PROG=$(basename "$0")
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

usage() {
  cat <<EOF
usage: $PROG --config=configs/X.py[:arg] --workdir=DIR [options]

Runs genclip-jax train|eval on several GPU nodes under SLURM.

  --config SPEC        genclip-jax config, relative to --chdir   [\$GENCLIP_CONFIG] (required)
  --workdir DIR        run directory on a filesystem every node shares (NFS, Lustre, ...)
                                                                 [\$GENCLIP_WORKDIR] (required)
  --command CMD        train | eval                              [\$GENCLIP_COMMAND, train]
  --extra "ARGS"       appended verbatim to the genclip-jax command line (parsed by each
                       task's bash), e.g. "--config.data.train_root=/data/visa"
                                                                 [\$GENCLIP_EXTRA]
  --nodes N            number of nodes            [\$GENCLIP_NODES, \$SLURM_JOB_NUM_NODES, 2]
  --gpus-per-node G    GPUs per node              [\$GENCLIP_GPUS_PER_NODE, \$SLURM_GPUS_ON_NODE, 8]
  --mode MODE          per-gpu: G processes per node (--ntasks-per-node=G), each pinned to
                       one GPU through CUDA_VISIBLE_DEVICES and its local rank;
                       per-node: one process per node driving all its GPUs
                                                                 [\$GENCLIP_MODE, per-gpu]
  --launch HOW         sbatch: submit a batch script; srun: run in the current allocation
                       [\$GENCLIP_LAUNCH; default srun when \$SLURM_JOB_ID is set, else sbatch]
  --port PORT          coordinator port    [\$GENCLIP_PORT; default 61440 + SLURM_JOB_ID % 4096]
  --coordinator HOST   coordinator host    [\$GENCLIP_COORDINATOR_HOST; default the first host
                                            of \$SLURM_JOB_NODELIST]
  --chdir DIR          directory every task starts in (the repository on the shared
                       filesystem)                               [\$GENCLIP_CHDIR, this repository]
  --setup "CMD"        shell command run in every task first, e.g.
                       "source /shared/venv/bin/activate"        [\$GENCLIP_SETUP]
  --job-name NAME      sbatch job name                           [genclip-CMD]
  --partition P, --account A, --time T, --cpus-per-task C
                       passed to sbatch (--cpus-per-task also to srun)
  --output PATTERN     sbatch log file                           [genclip-%j.out]
  --sbatch-arg ARG     extra "#SBATCH ARG" line (repeatable), e.g. --sbatch-arg=--exclusive
  --script PATH        also write the batch script to PATH (sbatch mode; default: piped)
  --dry-run            print the batch script / commands without running anything
  -h, --help           this message

Every process runs (from --chdir):
  genclip-jax CMD --config=SPEC --workdir=DIR --config.parallel.multihost=true
      --config.parallel.coordinator_address=\$GENCLIP_COORDINATOR
      --config.parallel.num_processes=\$SLURM_NTASKS --config.parallel.process_id=\$SLURM_PROCID
      EXTRA
EOF
}

# shellcheck source=launch/common.sh
source "$REPO_ROOT/launch/common.sh"

is_count() {
  [[ $1 =~ ^[1-9][0-9]*$ ]]
}

CONFIG=${GENCLIP_CONFIG:-}
WORKDIR=${GENCLIP_WORKDIR:-}
COMMAND=${GENCLIP_COMMAND:-train}
EXTRA=${GENCLIP_EXTRA:-}
NODES=${GENCLIP_NODES:-${SLURM_JOB_NUM_NODES:-2}}
GPUS=${GENCLIP_GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
MODE=${GENCLIP_MODE:-per-gpu}
LAUNCH=${GENCLIP_LAUNCH:-}
PORT=${GENCLIP_PORT:-}
COORD_HOST=${GENCLIP_COORDINATOR_HOST:-}
CHDIR=${GENCLIP_CHDIR:-$REPO_ROOT}
SETUP=${GENCLIP_SETUP:-}
JOB_NAME=""
PARTITION=""
ACCOUNT=""
TIME=""
CPUS=""
OUTPUT=genclip-%j.out
SCRIPT_PATH=""
SBATCH_ARGS=()
DRY_RUN=0

while (($#)); do
  opt=$1
  has_value=0
  value=""
  if [[ $opt == --*=* ]]; then
    value=${opt#*=}
    opt=${opt%%=*}
    has_value=1
  fi
  case $opt in
    --config | --workdir | --command | --extra | --nodes | --gpus-per-node | --mode | --launch | \
      --port | --coordinator | --chdir | --setup | --job-name | --partition | --account | \
      --time | --cpus-per-task | --output | --sbatch-arg | --script)
      if ((!has_value)); then
        (($# >= 2)) || die_usage "$opt needs a value"
        value=$2
        shift
      fi
      case $opt in
        --config) CONFIG=$value ;;
        --workdir) WORKDIR=$value ;;
        --command) COMMAND=$value ;;
        --extra) EXTRA=$value ;;
        --nodes) NODES=$value ;;
        --gpus-per-node) GPUS=$value ;;
        --mode) MODE=$value ;;
        --launch) LAUNCH=$value ;;
        --port) PORT=$value ;;
        --coordinator) COORD_HOST=$value ;;
        --chdir) CHDIR=$value ;;
        --setup) SETUP=$value ;;
        --job-name) JOB_NAME=$value ;;
        --partition) PARTITION=$value ;;
        --account) ACCOUNT=$value ;;
        --time) TIME=$value ;;
        --cpus-per-task) CPUS=$value ;;
        --output) OUTPUT=$value ;;
        --sbatch-arg) SBATCH_ARGS+=("$value") ;;
        --script) SCRIPT_PATH=$value ;;
      esac
      ;;
    --dry-run) ((!has_value)) || die_usage "$opt takes no value"; DRY_RUN=1 ;;
    -h | --help)
      usage
      exit 0
      ;;
    *) die_usage "unknown argument: $1" ;;
  esac
  shift
done

[[ -n $CONFIG ]] || die_usage "--config is required (e.g. --config=configs/anomalyclip.py:visa)"
[[ -n $WORKDIR ]] || die_usage "--workdir is required (a directory every node shares)"
[[ $COMMAND == train || $COMMAND == eval ]] || die_usage "--command must be train or eval, got '$COMMAND'"
is_count "$NODES" || die_usage "--nodes must be a positive integer, got '$NODES'"
is_count "$GPUS" || die_usage "--gpus-per-node must be a positive integer, got '$GPUS'"
[[ $MODE == per-gpu || $MODE == per-node ]] || die_usage "--mode must be per-gpu or per-node, got '$MODE'"
if [[ -z $LAUNCH ]]; then
  if [[ -n ${SLURM_JOB_ID:-} ]]; then LAUNCH=srun; else LAUNCH=sbatch; fi
fi
[[ $LAUNCH == sbatch || $LAUNCH == srun ]] || die_usage "--launch must be sbatch or srun, got '$LAUNCH'"
if [[ -n $PORT ]] && ! { is_count "$PORT" && ((PORT < 65536)); }; then
  die_usage "--port must be in 1..65535, got '$PORT'"
fi
if [[ -n $COORD_HOST && ! $COORD_HOST =~ ^[A-Za-z0-9._-]+$ ]]; then
  die_usage "--coordinator must be a host name or IPv4 address, got '$COORD_HOST'"
fi
if [[ -n $CPUS ]] && ! is_count "$CPUS"; then
  die_usage "--cpus-per-task must be a positive integer, got '$CPUS'"
fi
JOB_NAME=${JOB_NAME:-genclip-$COMMAND}

if [[ $MODE == per-gpu ]]; then TASKS_PER_NODE=$GPUS; else TASKS_PER_NODE=1; fi

# The coordinator, computed once per job (batch script or this shell) and exported to the tasks.
# shellcheck disable=SC2016  # expanded where the line runs: in the job, not here
HOST_EXPR=${COORD_HOST:-'$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)'}
# shellcheck disable=SC2016
PORT_EXPR=${PORT:-'$((SLURM_JOB_ID % 4096 + 61440))'}
COORD_LINE="export GENCLIP_COORDINATOR=\"$HOST_EXPR:$PORT_EXPR\""

# What every task runs, through `bash -c`: $SLURM_* are expanded per task.
TASK="set -e"
if [[ -n $SETUP ]]; then
  TASK+="; $SETUP"
fi
TASK+="; cd $(quote "$CHDIR")"
if [[ $MODE == per-gpu ]]; then
  # A task SLURM bound to one GPU keeps it; otherwise the local rank picks one of the GPUs SLURM
  # listed for the node (or of all the node's GPUs if it listed none).
  # shellcheck disable=SC2016
  TASK+='; IFS=, read -ra gpus <<<"${CUDA_VISIBLE_DEVICES:-}"; if ((${#gpus[@]} != 1)); then export CUDA_VISIBLE_DEVICES=${gpus[SLURM_LOCALID]:-$SLURM_LOCALID}; fi'
fi
TASK+="; exec $(join_quoted genclip-jax "$COMMAND" --config="$CONFIG" --workdir="$WORKDIR")"
# shellcheck disable=SC2016
TASK+=' --config.parallel.multihost=true --config.parallel.coordinator_address=${GENCLIP_COORDINATOR:?}'
# shellcheck disable=SC2016
TASK+=' --config.parallel.num_processes=${SLURM_NTASKS:?} --config.parallel.process_id=${SLURM_PROCID:?}'
if [[ -n $EXTRA ]]; then
  TASK+=" $EXTRA"
fi

SRUN=(srun --nodes="$NODES" --ntasks-per-node="$TASKS_PER_NODE" --kill-on-bad-exit=1)
if [[ -n $CPUS ]]; then
  SRUN+=(--cpus-per-task="$CPUS")
fi
SRUN+=(bash -c "$TASK")
SRUN_LINE=$(join_quoted "${SRUN[@]}")

echo "# $NODES node(s) x $TASKS_PER_NODE process(es) per node = $((NODES * TASKS_PER_NODE)) processes ($MODE), launched with $LAUNCH"

if [[ $LAUNCH == srun ]]; then
  echo "+ $COORD_LINE"
  echo "+ $SRUN_LINE"
  if ((DRY_RUN)); then
    exit 0
  fi
  [[ -n ${SLURM_JOB_ID:-} ]] || {
    echo "$PROG: --launch=srun needs a SLURM allocation (\$SLURM_JOB_ID is not set);" \
      "use salloc first, or --launch=sbatch" >&2
    exit 1
  }
  eval "$COORD_LINE"
  echo "$PROG: coordinator $GENCLIP_COORDINATOR" >&2
  exec "${SRUN[@]}"
fi

SBATCH_LINES=(
  "--job-name=$JOB_NAME"
  "--nodes=$NODES"
  "--ntasks-per-node=$TASKS_PER_NODE"
  "--gpus-per-node=$GPUS"
  "--output=$OUTPUT"
)
[[ -z $PARTITION ]] || SBATCH_LINES+=("--partition=$PARTITION")
[[ -z $ACCOUNT ]] || SBATCH_LINES+=("--account=$ACCOUNT")
[[ -z $TIME ]] || SBATCH_LINES+=("--time=$TIME")
[[ -z $CPUS ]] || SBATCH_LINES+=("--cpus-per-task=$CPUS")
SBATCH_LINES+=("${SBATCH_ARGS[@]}")

SCRIPT="#!/bin/bash"
for line in "${SBATCH_LINES[@]}"; do
  SCRIPT+=$'\n'"#SBATCH $line"
done
SCRIPT+=$'\n'"# generated by launch/$PROG"
SCRIPT+=$'\n'"set -euo pipefail"
SCRIPT+=$'\n'"$COORD_LINE"
SCRIPT+=$'\n'"echo \"coordinator \$GENCLIP_COORDINATOR, $((NODES * TASKS_PER_NODE)) processes on \$SLURM_JOB_NODELIST\""
SCRIPT+=$'\n'"$SRUN_LINE"

if [[ -n $SCRIPT_PATH ]]; then
  echo "# batch script, written to $SCRIPT_PATH unless --dry-run:"
  echo "#   ${SCRIPT//$'\n'/$'\n'#   }"
  echo "+ $(join_quoted sbatch "$SCRIPT_PATH")"
else
  echo "+ sbatch <<'SBATCH'"
  echo "$SCRIPT"
  echo "SBATCH"
fi
if ((DRY_RUN)); then
  exit 0
fi
command -v sbatch >/dev/null || { echo "$PROG: sbatch not found on PATH" >&2; exit 1; }
if [[ -n $SCRIPT_PATH ]]; then
  printf '%s\n' "$SCRIPT" >"$SCRIPT_PATH"
  exec sbatch "$SCRIPT_PATH"
fi
printf '%s\n' "$SCRIPT" | sbatch
