"""Multi-host runs that lose a process: a peer that never comes or dies mid-run stops the
others within a bounded time, and the same command resumes from the last checkpoint."""

from __future__ import annotations

import time

import pytest
from multihost_helpers import finish, launch, start
from train_helpers import write_dataset


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data"))


def test_unreachable_coordinator_fails_with_a_clear_error(data_root, tmp_path):
    """A process whose peers never come fails after the initialization timeout, not forever
    (the JAX runtime aborts it with DEADLINE_EXCEEDED; our log line says what it waited for)."""
    [(output, code)] = launch(
        tmp_path / "lonely", data_root, 2, started=[0], timeout=300,
        extra=lambda pid: ["--config.parallel.initialization_timeout=5"],
    )
    assert code != 0
    assert "jax.distributed.initialize: joining coordinator 127.0.0.1:" in output
    assert "DEADLINE_EXCEEDED" in output or "failed" in output


def test_a_killed_process_stops_its_peer_and_a_restart_resumes(data_root, tmp_path):
    """Kill process 1 after the first epoch's checkpoint: process 0 exits (heartbeat timeout)
    instead of hanging; the same command then resumes from that checkpoint and finishes."""
    workdir = tmp_path / "w"
    flags = lambda pid: ["--config.train.epochs=2", "--config.parallel.heartbeat_timeout=10"]
    procs = start(workdir, data_root, 2, extra=flags)
    first = workdir / "checkpoints" / "1"
    deadline = time.monotonic() + 600
    while not first.is_dir() and time.monotonic() < deadline:
        assert all(p.poll() is None for p in procs), "a process ended before the checkpoint"
        time.sleep(0.5)
    assert first.is_dir()
    procs[1].kill()
    output, code = finish(procs[0], timeout=240)
    assert code != 0, output[-3000:]
    results = launch(workdir, data_root, 2, extra=flags)
    for i, (out, code) in enumerate(results):
        assert code == 0, f"process {i} failed after the restart:\n{out[-4000:]}"
    assert "resumed from the checkpoint of epoch" in results[0][0]
    assert (workdir / "checkpoints" / "2").is_dir()
