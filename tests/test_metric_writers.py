"""Metric writers: TensorBoard events read back, console line format, process-0-only output,
write failures raised at once (never a hang)."""

import errno
import logging
import os
import pathlib
import re
import struct
import subprocess
import sys
import textwrap
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.proto import event_pb2, summary_pb2
from tensorboardX.record_writer import masked_crc32c

from genclip_jax import metric_writers

REPO = pathlib.Path(__file__).resolve().parents[1]


def _read_events(logdir: pathlib.Path) -> list[event_pb2.Event]:
    """Parse TFRecord-framed events: u64 length, u32 crc, payload, u32 crc (crcs checked)."""
    events = []
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            header = data[offset : offset + 8]
            (length,) = struct.unpack("<Q", header)
            assert struct.unpack_from("<I", data, offset + 8) == (masked_crc32c(header),)
            payload = data[offset + 12 : offset + 12 + length]
            assert struct.unpack_from("<I", data, offset + 12 + length) == (
                masked_crc32c(payload),)
            events.append(event_pb2.Event.FromString(payload))
            offset += 12 + length + 4
    return events


def _summaries(logdir: pathlib.Path) -> list[tuple[int, summary_pb2.Summary.Value]]:
    return [(e.step, v) for e in _read_events(logdir) for v in e.summary.value]


def test_tensorboard_scalars_read_back(tmp_path):
    writer = metric_writers.TensorBoardWriter(tmp_path)
    writer.write_scalars(1, {"loss": 0.5, "lr": np.float32(1e-3)})
    writer.write_scalars(2, {"loss": jnp.asarray(0.25)})
    writer.close()
    scalars = [(step, v.tag, v.simple_value) for step, v in _summaries(tmp_path)]
    assert scalars == [(1, "loss", 0.5), (1, "lr", pytest.approx(1e-3)), (2, "loss", 0.25)]
    (path,) = tmp_path.iterdir()
    assert re.fullmatch(r"events\.out\.tfevents\.\d{10}\..+", path.name)
    assert _read_events(tmp_path)[0].file_version == "brain.Event:2"


def test_tensorboard_writer_starts_no_thread(tmp_path):
    before = set(threading.enumerate())
    writer = metric_writers.TensorBoardWriter(tmp_path)
    writer.write_scalars(1, {"loss": 0.5})
    writer.write_images(1, {"rgb": np.zeros((4, 4, 3), np.uint8)})
    writer.flush()
    assert set(threading.enumerate()) == before
    writer.close()
    writer.close()  # a second close is a no-op


class _FullDisk:
    """A file whose writes fail like a full disk."""

    closed = False

    def write(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")


def test_tensorboard_write_error_names_the_events_file(tmp_path):
    writer = metric_writers.TensorBoardWriter(tmp_path)
    writer._file.close()
    writer._file = _FullDisk()
    with pytest.raises(OSError, match=re.escape(
            f"cannot write TensorBoard events to {writer.path}: [Errno 28] No space left")) as err:
        writer.write_scalars(1, {"loss": 0.5})
    assert err.value.errno == errno.ENOSPC
    assert pathlib.Path(writer.path).parent == tmp_path


def test_tensorboard_file_size_limit_raises_instead_of_hanging(tmp_path):
    # A real failing write: past RLIMIT_FSIZE (SIGXFSZ ignored) write() fails with EFBIG.
    script = textwrap.dedent(f"""
        import resource, signal, sys
        from genclip_jax import metric_writers
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        writer = metric_writers.TensorBoardWriter({str(tmp_path)!r})
        try:
            for step in range(100_000):
                writer.write_scalars(step, {{"loss": 0.5, "lr": 1e-3}})
        except OSError as err:
            print(f"step {{step}} errno {{err.errno}}: {{err}}")
            sys.exit(3)
    """)
    try:
        run = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                             text=True, timeout=60, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    except subprocess.TimeoutExpired:
        pytest.fail("writing TensorBoard events past the file size limit hung for 60 s")
    (path,) = tmp_path.glob("events.out.tfevents.*")
    assert run.returncode == 3, run.stderr
    step, message = re.fullmatch(r"step (\d+) (.*)\n", run.stdout).groups()
    assert message == (f"errno {errno.EFBIG}: cannot write TensorBoard events to {path}: "
                       f"[Errno {errno.EFBIG}] File too large")
    assert 0 < int(step) < 100  # raised on the write that crossed 4 KiB, not later
    assert path.stat().st_size == 4096


def test_tensorboard_images_texts_hparams(tmp_path):
    writer = metric_writers.TensorBoardWriter(tmp_path)
    writer.write_images(
        3,
        {
            "heatmaps": np.random.default_rng(0).random((2, 8, 8, 1)) * 2,  # clipped to [0, 1]
            "rgb": np.zeros((8, 8, 3), np.uint8),
        },
    )
    writer.write_texts(3, {"note": "hello"})
    writer.write_hparams({"model": {"width": 64}, "lr": 1e-3, "layers": (6, 12)})
    writer.close()
    values = {v.tag: (step, v) for step, v in _summaries(tmp_path)}
    assert values["heatmaps"][0] == 3 and values["heatmaps"][1].image.encoded_image_string
    assert values["rgb"][1].image.height == 8
    assert values["note/text_summary"][1].tensor.string_val == [b"hello"]
    session = values["_hparams_/session_start_info"][1].metadata.plugin_data.content
    assert b"model.width" in session and b"layers" in session


def test_tensorboard_rejects_bad_image_shape(tmp_path):
    writer = metric_writers.TensorBoardWriter(tmp_path)
    with pytest.raises(ValueError, match=r"image 'map'.*got \(8, 8\)"):
        writer.write_images(0, {"map": np.zeros((8, 8))})
    writer.close()


def test_console_line_format(caplog):
    writer = metric_writers.LoggingWriter()
    with caplog.at_level(logging.INFO):
        writer.write_scalars(12, {"loss": 0.1234, "image_loss": np.float32(0.5)})
        writer.write_images(12, {"maps": np.zeros((2, 4, 4, 1))})
        metric_writers.LoggingWriter("eval").write_scalars(3, {"auroc": 0.91})
    assert caplog.messages == [
        "step 12 | loss=0.1234 image_loss=0.5",
        "step 12 | images maps=(2, 4, 4, 1)",
        "[eval] step 3 | auroc=0.91",
    ]


def test_default_writer_fans_out_on_process_zero(tmp_path, caplog):
    writer = metric_writers.create_default_writer(tmp_path, collection="train")
    assert isinstance(writer, metric_writers.MultiWriter)
    with caplog.at_level(logging.INFO):
        writer.write_scalars(1, {"loss": 2.0})
    writer.close()
    assert caplog.messages == ["[train] step 1 | loss=2"]
    assert [(s, v.tag) for s, v in _summaries(tmp_path / "train")] == [(1, "loss")]
    assert isinstance(
        metric_writers.create_default_writer(tmp_path, just_logging=True),
        metric_writers.LoggingWriter,
    )


def test_default_writer_is_silent_off_process_zero(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    writer = metric_writers.create_default_writer(tmp_path / "logs")
    assert isinstance(writer, metric_writers.NoOpWriter)
    with caplog.at_level(logging.INFO):
        writer.write_scalars(1, {"loss": 1.0})
        writer.write_images(1, {"x": np.zeros((4, 4, 3))})
        writer.write_texts(1, {"t": "x"})
        writer.write_hparams({"a": 1})
        writer.close()
    assert caplog.messages == []
    assert not (tmp_path / "logs").exists()
