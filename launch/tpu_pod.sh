#!/usr/bin/env bash
# Runs `genclip-jax train|eval` on every worker of a Cloud TPU VM slice (one JAX process per
# worker, `jax.distributed.initialize()` auto-detects coordinator and process ids on TPU VMs).
#
# Steps: reuse the TPU VM if `describe` finds it (start it if STOPPED), else create it; mount an
# NFS share (optional, --nfs); ship the source (tarball + scp, or --git clone) and
# `pip install -e . "jax[tpu]"` on all workers; run the command on all workers with
# --config.parallel.multihost=true; copy WORKDIR/eval from worker 0; optionally delete the VM.
# --dry-run prints every command ("+ ..." lines) and runs nothing (no gcloud needed).
# See launch/README.md.
set -euo pipefail

PROG=$(basename "$0")
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
REMOTE_DIR=genclip_jax            # on every worker, relative to the login user's home
TARBALL_NAME=genclip_jax-src.tar.gz

usage() {
  cat <<EOF
usage: $PROG --config=configs/X.py[:arg] --workdir=DIR [options]

Runs genclip-jax train|eval on every worker of a Cloud TPU VM slice.

  --name NAME         TPU VM name                        [\$TPU_NAME, genclip-tpu]
  --zone ZONE         zone                               [\$TPU_ZONE, us-central2-b]
  --type TYPE         accelerator type, e.g. v4-32, v5p-16, v5litepod-16, v6e-16
                                                         [\$TPU_TYPE, v4-32]
  --version VERSION   TPU VM runtime (software version)  [\$TPU_VERSION, picked from --type:
                      tpu-ubuntu2204-base (v2-v4), v2-alpha-tpuv5-lite (v5e),
                      v2-alpha-tpuv5 (v5p), v2-alpha-tpuv6e (v6e)]
  --project PROJECT   GCP project (else gcloud's default) [\$TPU_PROJECT, \$CLOUDSDK_CORE_PROJECT]
  --spot              create the VM as a Spot VM
  --config SPEC       genclip-jax config, relative to the repository root
                                                         [\$GENCLIP_CONFIG] (required)
  --workdir DIR       run directory as the workers see it; must be shared by all workers of a
                      multi-host slice (an NFS/Filestore mount, see --nfs), not gs://
                                                         [\$GENCLIP_WORKDIR] (required)
  --command CMD       train | eval                       [\$GENCLIP_COMMAND, train]
  --extra "ARGS"      appended verbatim to the genclip-jax command line (parsed by the
                      workers' shell), e.g. "--config.data.train_root=/mnt/d/visa"
                                                         [\$GENCLIP_EXTRA]
  --nfs SERVER:/EXPORT  mount this NFS share (e.g. Filestore) on every worker at --mount
                                                         [\$GENCLIP_NFS]
  --mount DIR         NFS mount point                    [\$GENCLIP_MOUNT, /mnt/genclip]
  --source DIR        local source tree to ship as a tarball [\$GENCLIP_SOURCE, this repository]
  --git URL           clone URL on every worker instead of shipping --source [\$GENCLIP_GIT_URL]
  --git-ref REF       branch or tag for --git            [\$GENCLIP_GIT_REF]
  --jax SPEC          JAX requirement installed with the package [\$GENCLIP_JAX_SPEC, jax[tpu]]
  --skip-setup        no NFS mount, copy or pip install: reuse the workers as they are
  --fetch DIR         local folder for WORKDIR/eval from worker 0 [\$GENCLIP_FETCH,
                      results/NAME]
  --no-fetch          do not copy the results back
  --delete-after      delete the TPU VM when the script exits (success or failure)
  --dry-run           print every command ("+ " lines) without running anything
  -h, --help          this message

Every worker runs:
  cd ~/$REMOTE_DIR && genclip-jax CMD --config=SPEC --workdir=DIR \\
      --config.parallel.multihost=true EXTRA
EOF
}

# shellcheck source=launch/common.sh
source "$REPO_ROOT/launch/common.sh"

# Prints the command ("+ ..."), then runs it unless --dry-run.
run() {
  echo "+ $(join_quoted "$@")"
  if ((DRY_RUN)); then
    return 0
  fi
  "$@"
}

NAME=${TPU_NAME:-genclip-tpu}
ZONE=${TPU_ZONE:-us-central2-b}
TYPE=${TPU_TYPE:-v4-32}
VERSION=${TPU_VERSION:-}
PROJECT=${TPU_PROJECT:-${CLOUDSDK_CORE_PROJECT:-}}
CONFIG=${GENCLIP_CONFIG:-}
WORKDIR=${GENCLIP_WORKDIR:-}
COMMAND=${GENCLIP_COMMAND:-train}
EXTRA=${GENCLIP_EXTRA:-}
NFS=${GENCLIP_NFS:-}
MOUNT=${GENCLIP_MOUNT:-/mnt/genclip}
SOURCE=${GENCLIP_SOURCE:-$REPO_ROOT}
GIT_URL=${GENCLIP_GIT_URL:-}
GIT_REF=${GENCLIP_GIT_REF:-}
JAX_SPEC=${GENCLIP_JAX_SPEC:-jax[tpu]}
FETCH=${GENCLIP_FETCH:-}
SPOT=0
SKIP_SETUP=0
NO_FETCH=0
DELETE_AFTER=0
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
    --name | --zone | --type | --version | --project | --config | --workdir | --command | \
      --extra | --nfs | --mount | --source | --git | --git-ref | --jax | --fetch)
      if ((!has_value)); then
        (($# >= 2)) || die_usage "$opt needs a value"
        value=$2
        shift
      fi
      case $opt in
        --name) NAME=$value ;;
        --zone) ZONE=$value ;;
        --type) TYPE=$value ;;
        --version) VERSION=$value ;;
        --project) PROJECT=$value ;;
        --config) CONFIG=$value ;;
        --workdir) WORKDIR=$value ;;
        --command) COMMAND=$value ;;
        --extra) EXTRA=$value ;;
        --nfs) NFS=$value ;;
        --mount) MOUNT=$value ;;
        --source) SOURCE=$value ;;
        --git) GIT_URL=$value ;;
        --git-ref) GIT_REF=$value ;;
        --jax) JAX_SPEC=$value ;;
        --fetch) FETCH=$value ;;
      esac
      ;;
    --spot | --skip-setup | --no-fetch | --delete-after | --dry-run | -h | --help)
      ((!has_value)) || die_usage "$opt takes no value"
      case $opt in
        --spot) SPOT=1 ;;
        --skip-setup) SKIP_SETUP=1 ;;
        --no-fetch) NO_FETCH=1 ;;
        --delete-after) DELETE_AFTER=1 ;;
        --dry-run) DRY_RUN=1 ;;
        -h | --help)
          usage
          exit 0
          ;;
      esac
      ;;
    *) die_usage "unknown argument: $1" ;;
  esac
  shift
done

[[ -n $CONFIG ]] || die_usage "--config is required (e.g. --config=configs/anomalyclip.py:visa)"
[[ -n $WORKDIR ]] || die_usage "--workdir is required (a directory every worker shares)"
[[ $COMMAND == train || $COMMAND == eval ]] || die_usage "--command must be train or eval, got '$COMMAND'"
[[ -n $NAME && -n $ZONE && -n $TYPE ]] || die_usage "--name, --zone and --type must not be empty"
if [[ $WORKDIR == gs://* ]]; then
  die_usage "--workdir=$WORKDIR: gs:// paths are not supported (the checkpointer writes config.json" \
    "and exports with local POSIX renames). Use a shared filesystem: a Filestore/NFS share" \
    "(--nfs SERVER:/EXPORT, then --workdir=$MOUNT/...)."
fi
if [[ -n $NFS && $NFS != *:/* ]]; then
  die_usage "--nfs must look like SERVER:/EXPORT, got '$NFS'"
fi
if [[ -z $VERSION ]]; then
  case $TYPE in
    v5litepod-* | v5e-*) VERSION=v2-alpha-tpuv5-lite ;;
    v5p-*) VERSION=v2-alpha-tpuv5 ;;
    v6e-*) VERSION=v2-alpha-tpuv6e ;;
    *) VERSION=tpu-ubuntu2204-base ;;
  esac
fi
FETCH=${FETCH:-results/$NAME}
if [[ $WORKDIR == /* ]]; then
  REMOTE_WORKDIR=$WORKDIR
else
  REMOTE_WORKDIR=$REMOTE_DIR/$WORKDIR   # relative workdirs live under the source tree
fi

if [[ -n $NFS && $WORKDIR != "$MOUNT"/* ]]; then
  echo "$PROG: warning: --workdir=$WORKDIR is not under the NFS mount $MOUNT" >&2
elif [[ -z $NFS ]]; then
  echo "$PROG: note: on a multi-host slice --workdir must be a directory every worker shares" \
    "(e.g. an NFS/Filestore mount, see --nfs); a worker-local one only works on single-host slices" >&2
fi

TPU=(gcloud compute tpus tpu-vm)
WHERE=(--zone="$ZONE")
if [[ -n $PROJECT ]]; then
  WHERE+=(--project="$PROJECT")
fi
CREATE=("${TPU[@]}" create "$NAME" "${WHERE[@]}" --accelerator-type="$TYPE" --version="$VERSION")
if ((SPOT)); then
  CREATE+=(--spot)
fi

on_all_workers() {
  run "${TPU[@]}" ssh "$NAME" "${WHERE[@]}" --worker=all --command="$1"
}

delete_vm() {
  run "${TPU[@]}" delete "$NAME" "${WHERE[@]}" --quiet || echo "$PROG: could not delete $NAME" >&2
}

TMP_DIR=""
cleanup() {
  local status=$?
  if [[ -n $TMP_DIR ]]; then
    rm -rf "$TMP_DIR"
  fi
  if ((DELETE_AFTER && !DRY_RUN)); then
    delete_vm
  fi
  return "$status"
}
trap cleanup EXIT

# 1. Create the TPU VM, or reuse it.
if ((DRY_RUN)); then
  echo "# reuse TPU VM $NAME if describe finds it (start it if STOPPED), otherwise create it:"
  run "${TPU[@]}" describe "$NAME" "${WHERE[@]}" --format='value(state,acceleratorType)'
  run "${CREATE[@]}"
else
  command -v gcloud >/dev/null || { echo "$PROG: gcloud not found on PATH" >&2; exit 1; }
  echo "+ $(join_quoted "${TPU[@]}" describe "$NAME" "${WHERE[@]}" --format='value(state,acceleratorType)')"
  if info=$("${TPU[@]}" describe "$NAME" "${WHERE[@]}" --format='value(state,acceleratorType)' 2>/dev/null); then
    read -r state existing_type <<<"$info"
    echo "$PROG: reusing TPU VM $NAME (state ${state:-?}, type ${existing_type:-?})"
    if [[ -n ${existing_type:-} && ${existing_type##*/} != "$TYPE" ]]; then
      echo "$PROG: warning: $NAME is a ${existing_type##*/}, not --type=$TYPE" >&2
    fi
    case ${state:-} in
      READY) ;;
      STOPPED) run "${TPU[@]}" start "$NAME" "${WHERE[@]}" ;;
      *)
        echo "$PROG: TPU VM $NAME is in state '${state:-unknown}'; wait until it is READY, or" \
          "delete it (gcloud compute tpus tpu-vm delete $NAME --zone=$ZONE) and rerun" >&2
        exit 1
        ;;
    esac
  else
    run "${CREATE[@]}"
  fi
fi

# 2. Shared filesystem, source and packages on every worker.
if ((!SKIP_SETUP)); then
  if [[ -n $NFS ]]; then
    on_all_workers "sudo apt-get -qq update && sudo apt-get -qq install -y nfs-common && sudo mkdir -p $(quote "$MOUNT") && { mountpoint -q $(quote "$MOUNT") || sudo mount -t nfs -o rw,hard $(quote "$NFS") $(quote "$MOUNT"); } && { sudo chmod a+rwx $(quote "$MOUNT") || true; }"
  fi
  if [[ -n $GIT_URL ]]; then
    clone=(git clone --depth 1)
    if [[ -n $GIT_REF ]]; then
      clone+=(--branch "$GIT_REF")
    fi
    clone+=("$GIT_URL" "$REMOTE_DIR")
    on_all_workers "rm -rf $REMOTE_DIR && $(join_quoted "${clone[@]}")"
  else
    if ((DRY_RUN)); then
      TARBALL=${TMPDIR:-/tmp}/$TARBALL_NAME
    else
      [[ -f $SOURCE/setup.py ]] || { echo "$PROG: --source=$SOURCE has no setup.py" >&2; exit 1; }
      TMP_DIR=$(mktemp -d)
      TARBALL=$TMP_DIR/$TARBALL_NAME
    fi
    run tar -czf "$TARBALL" -C "$SOURCE" --exclude=./.git --exclude=./tests/data --exclude=./runs \
      --exclude=./results --exclude='*.egg-info' --exclude=__pycache__ --exclude=.pytest_cache \
      --exclude=.ruff_cache --exclude=.venv .
    run "${TPU[@]}" scp "$TARBALL" "$NAME:$TARBALL_NAME" "${WHERE[@]}" --worker=all
    on_all_workers "rm -rf $REMOTE_DIR && mkdir -p $REMOTE_DIR && tar -xzf $TARBALL_NAME -C $REMOTE_DIR"
  fi
  on_all_workers "cd $REMOTE_DIR && python3 -m pip install -q -U pip && python3 -m pip install -q -e . $(quote "$JAX_SPEC")"
fi

# 3. The run: one process per worker, all started together.
GENCLIP_ARGS=$(join_quoted genclip-jax "$COMMAND" --config="$CONFIG" --workdir="$WORKDIR" \
  --config.parallel.multihost=true)
if [[ -n $EXTRA ]]; then
  GENCLIP_ARGS+=" $EXTRA"
fi
# shellcheck disable=SC2016  # $HOME and $PATH expand on the workers
on_all_workers "cd $REMOTE_DIR && export PATH=\"\$HOME/.local/bin:\$PATH\" && $GENCLIP_ARGS"

# 4. Results: WORKDIR/eval from worker 0 (process 0 writes the tables and heatmaps).
if ((!NO_FETCH)); then
  run mkdir -p "$FETCH"
  run "${TPU[@]}" scp --recurse "$NAME:$REMOTE_WORKDIR/eval" "$FETCH/" "${WHERE[@]}" --worker=0
  echo "# results: $FETCH/eval/<name of the test root>/metrics.md (.csv, .json) and heatmaps/"
fi

if ((DELETE_AFTER && DRY_RUN)); then
  delete_vm
fi
