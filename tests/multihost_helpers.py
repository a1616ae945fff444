"""Runs `genclip-jax train` as several local processes of one multi-host run (loopback gloo,
4 CPU devices each): the multi-host tests' shared launcher."""

from __future__ import annotations

import pathlib
import socket
import subprocess
import sys
import tempfile

from train_helpers import cli_overrides, subprocess_env

REPO = pathlib.Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(workdir, data_root, num_processes: int, started=None, extra=lambda pid: [],
          command: str = "train"):
    """Starts `genclip-jax <command>` (train, eval) as processes `started` (default all) of
    `num_processes`; `extra(pid)` adds flags to one process (later flags win)."""
    port = free_port()
    env = {**subprocess_env(), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    # Output goes to files: a full pipe would block a process that nobody reads yet.
    procs = []
    for pid in range(num_processes) if started is None else started:
        log = tempfile.TemporaryFile("w+")  # noqa: SIM115 - read and closed by finish
        proc = subprocess.Popen(
            [sys.executable, "-m", "genclip_jax.cli", command, *cli_overrides(data_root),
             f"--workdir={workdir}", "--config.train.epochs=1",
             "--config.eval.heatmaps_per_class=0", "--config.parallel.multihost=true",
             f"--config.parallel.coordinator_address=127.0.0.1:{port}",
             f"--config.parallel.num_processes={num_processes}",
             f"--config.parallel.process_id={pid}",
             "--config.parallel.initialization_timeout=20", *extra(pid)],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
        )
        proc.log = log
        procs.append(proc)
    return procs


def finish(proc: subprocess.Popen, timeout: float) -> tuple[str, int]:
    """Waits for a `start`ed process: (its output, its exit code)."""
    proc.wait(timeout=timeout)
    with proc.log:
        proc.log.seek(0)
        return proc.log.read(), proc.returncode


def launch(workdir, data_root, num_processes: int, started=None, timeout: float = 900,
            extra=lambda pid: [], command: str = "train"):
    """`start`, then each process's (output, exit code)."""
    procs = start(workdir, data_root, num_processes, started, extra, command)
    return [finish(p, timeout) for p in procs]
