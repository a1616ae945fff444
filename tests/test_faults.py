"""Real faults on a real `genclip-jax train` process: the disk fills up mid-run.

The run must stop at once with the cause and the last complete checkpoint named (no hang, no
half-written step), and the same command must resume once there is space again. The disk is a
small tmpfs where this process may mount one; elsewhere the process's file-size limit drops to 0
mid-run (`prlimit`), which fails every write that grows a file the same way (EFBIG for ENOSPC).
"""

from __future__ import annotations

import contextlib
import pathlib
import re
import resource
import subprocess
import sys
import time

from train_helpers import cli_overrides, subprocess_env, write_dataset

REPO = pathlib.Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def _small_disk(folder: pathlib.Path):
    """Yields `fill(pid)`, which makes writes fail from then on: on a 64 MB tmpfs mounted at
    `folder` it fills the remaining space, else it sets the process's file-size limit to 0."""
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(folder)],
                             capture_output=True).returncode == 0

    def fill(pid: int) -> None:
        if not mounted:
            resource.prlimit(pid, resource.RLIMIT_FSIZE, (0, 0))
            return
        with (folder / "filler").open("wb") as f, contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * (1 << 20))

    try:
        yield fill
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(folder)], check=True)


def _steps(workdir: pathlib.Path) -> list[int]:
    ckpts = workdir / "checkpoints"
    return sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) if ckpts.is_dir() \
        else []


def _train(workdir, data_root, epochs: int) -> list[str]:
    return [sys.executable, "-m", "genclip_jax.cli", "train", f"--workdir={workdir}",
            *cli_overrides(data_root), f"--config.train.epochs={epochs}",
            "--config.train.log_every_steps=1000"]


def test_a_full_disk_stops_training_with_the_cause_and_the_last_checkpoint(tmp_path):
    data_root = write_dataset(tmp_path / "data")
    with _small_disk(tmp_path / "disk") as fill:
        workdir = tmp_path / "disk" / "run"
        log = tmp_path / "train.log"
        with log.open("w") as out:
            process = subprocess.Popen(_train(workdir, data_root, 1000), cwd=REPO,
                                       stdout=out, stderr=subprocess.STDOUT,
                                       env=subprocess_env())
        try:
            deadline = time.monotonic() + 300
            while not _steps(workdir):
                assert process.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, "no checkpoint after 300 s"
                time.sleep(0.02)
            fill(process.pid)
            code = process.wait(timeout=120)  # a hang fails here
        finally:
            process.kill()
            process.wait()
        output = log.read_text()
        assert code == 1, output[-3000:]
        last = _steps(workdir)[-1]
        error = re.search(r"genclip-jax train: error: could not save the checkpoint of step "
                          r"(\d+) under (\S+): (.*)", output)
        assert error, output[-3000:]
        assert int(error[1]) == last + 1
        assert "No space left on device" in error[3] or "File too large" in error[3]
        assert f"The last complete checkpoint is step {last} ({workdir}/checkpoints/{last})" in (
            error[3])
        assert "Traceback" not in output
        for step in _steps(workdir):  # no half-written step
            assert (workdir / "checkpoints" / str(step) / "commit_success.txt").is_file()
        (tmp_path / "disk" / "filler").unlink(missing_ok=True)
        resumed = subprocess.run(_train(workdir, data_root, last + 1), cwd=REPO,
                                 env=subprocess_env(), capture_output=True, text=True,
                                 timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from the checkpoint of epoch {last}" in resumed.stderr
