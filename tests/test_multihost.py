"""Multi-host for real on one machine: 2 processes x 4 CPU devices over loopback (gloo) give the
same training and the same tables as 1 process x 8 devices."""

from __future__ import annotations

import json
import pathlib
import socket
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
import pytest
from train_helpers import cli_overrides, subprocess_env, tiny_config, write_dataset

from genclip_jax import checkpoint, train
from genclip_jax.backbone import load_backbone
from genclip_jax.methods import create_method

REPO = pathlib.Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(workdir, data_root, num_processes: int, started=None, extra=lambda pid: []):
    """Starts `genclip-jax train` as processes `started` (default all) of `num_processes`;
    `extra(pid)` adds flags to one process (later flags win)."""
    port = _free_port()
    env = {**subprocess_env(), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    # Output goes to files: a full pipe would block a process that nobody reads yet.
    procs = []
    for pid in range(num_processes) if started is None else started:
        log = tempfile.TemporaryFile("w+")  # noqa: SIM115 - read and closed by _finish
        proc = subprocess.Popen(
            [sys.executable, "-m", "genclip_jax.cli", "train", *cli_overrides(data_root),
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


def _finish(proc: subprocess.Popen, timeout: float) -> tuple[str, int]:
    """Waits for a `_start`ed process: (its output, its exit code)."""
    proc.wait(timeout=timeout)
    with proc.log:
        proc.log.seek(0)
        return proc.log.read(), proc.returncode


def _launch(workdir, data_root, num_processes: int, started=None, timeout: float = 900,
            extra=lambda pid: []):
    """`_start`, then each process's (output, exit code)."""
    procs = _start(workdir, data_root, num_processes, started, extra)
    return [_finish(p, timeout) for p in procs]


def _final_params(config, workdir):
    clip_config, _ = load_backbone(config.model)
    shapes = jax.eval_shape(create_method(config, clip_config).init, jax.random.PRNGKey(0))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                            shapes)
    with checkpoint.Checkpointer(workdir / "checkpoints", read_only=True) as ckpt:
        return jax.device_get(ckpt.restore_params(template))


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data"))


def test_two_processes_match_one(data_root, tmp_path):
    config = tiny_config(data_root)
    config.train.epochs = 1
    config.eval.heatmaps_per_class = 0
    single = tmp_path / "single"
    train.train_and_evaluate(config, str(single))

    multi = tmp_path / "multi"
    results = _launch(multi, data_root, 2)
    for i, (output, code) in enumerate(results):
        assert code == 0, f"process {i} failed:\n{output[-4000:]}"

    want, got = _final_params(config, single), _final_params(config, multi)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=1e-6)
    # The gradient all-reduce runs in another order over gloo, so the params (and so the metric
    # values) agree to float rounding, not bit for bit: the printed table is identical.
    single_out, multi_out = (run / "eval" / data_root.name for run in (single, multi))
    want_rows = json.loads((single_out / "metrics.json").read_text())["classes"]
    got_rows = json.loads((multi_out / "metrics.json").read_text())["classes"]
    assert got_rows.keys() == want_rows.keys()
    for cls, row in want_rows.items():
        for name, value in row.items():
            assert got_rows[cls][name] == pytest.approx(value, abs=1e-6), (cls, name)
    md = "metrics.md"
    assert (multi_out / md).read_text() == (single_out / md).read_text()


def test_unreachable_coordinator_fails_with_a_clear_error(data_root, tmp_path):
    """A process whose peers never come fails after the initialization timeout, not forever
    (the JAX runtime aborts it with DEADLINE_EXCEEDED; our log line says what it waited for)."""
    [(output, code)] = _launch(tmp_path / "lonely", data_root, 2, started=[0], timeout=300)
    assert code != 0
    assert "jax.distributed.initialize: joining coordinator 127.0.0.1:" in output
    assert "DEADLINE_EXCEEDED" in output or "failed" in output


def test_processes_with_different_configs_stop_before_training(data_root, tmp_path):
    results = _launch(tmp_path / "w", data_root, 2,
                      extra=lambda pid: [f"--config.train.lr={1e-3 * (pid + 1)}"])
    assert all(code != 0 for _, code in results)
    assert any("processes disagree on the config" in out for out, _ in results)
    assert not (tmp_path / "w" / "checkpoints").is_dir() or not any(
        (tmp_path / "w" / "checkpoints").iterdir())


def test_a_killed_process_stops_its_peer_and_a_restart_resumes(data_root, tmp_path):
    """Kill process 1 after the first epoch's checkpoint: process 0 exits (heartbeat timeout)
    instead of hanging; the same command then resumes from that checkpoint and finishes."""
    workdir = tmp_path / "w"
    flags = lambda pid: ["--config.train.epochs=3", "--config.parallel.heartbeat_timeout=10"]
    procs = _start(workdir, data_root, 2, extra=flags)
    first = workdir / "checkpoints" / "1"
    deadline = time.monotonic() + 600
    while not first.is_dir() and time.monotonic() < deadline:
        assert all(p.poll() is None for p in procs), "a process ended before the checkpoint"
        time.sleep(0.5)
    assert first.is_dir()
    procs[1].kill()
    output, code = _finish(procs[0], timeout=240)
    assert code != 0, output[-3000:]
    results = _launch(workdir, data_root, 2, extra=flags)
    for i, (out, code) in enumerate(results):
        assert code == 0, f"process {i} failed after the restart:\n{out[-4000:]}"
    assert "resumed from the checkpoint of epoch" in results[0][0]
    assert (workdir / "checkpoints" / "3").is_dir()
