"""Metric writers with `clu.metric_writers`' method names, without TensorFlow.

`clu.metric_writers` imports TensorFlow (DESIGN §6), so TensorBoard events are built with
`tensorboardX`'s protos and summaries instead, and written synchronously (never blocks, fails
loudly when the disk is full). Training code calls ``writer.write_scalars(step, {...})`` exactly
as with clu; `create_default_writer` mirrors clu's factory (TensorBoard + console on process 0,
nothing on the other processes of a multi-host run).
"""

from __future__ import annotations

import abc
import contextlib
import itertools
import os
import socket
import struct
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
from flax import traverse_util
from tensorboardX import summary as tbx_summary
from tensorboardX.proto import event_pb2
from tensorboardX.record_writer import masked_crc32c

Scalar = int | float | np.number | np.ndarray | jax.Array


def _image_batch(name: str, image: Any) -> np.ndarray:
    """(H, W, C) or (N, H, W, C) -> (N, H, W, C); C must be 1, 3 or 4 (gray, RGB, RGBA)."""
    array = np.asarray(image)
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4 or array.shape[-1] not in (1, 3, 4):
        raise ValueError(
            f"image {name!r} must have shape (H, W, C) or (N, H, W, C) with C in 1, 3, 4; "
            f"got {np.shape(image)}"
        )
    return array


def _flatten_hparams(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """Nested dicts -> ``{"a.b": value}`` with bool/int/float/str values (others as str)."""
    return {name: value if isinstance(value, bool | int | float | str) else str(value)
            for name, value in traverse_util.flatten_dict(dict(hparams), sep=".").items()}


class MetricWriter(abc.ABC):
    """The subset of clu's `MetricWriter` interface this project uses."""

    @abc.abstractmethod
    def write_scalars(self, step: int, scalars: Mapping[str, Scalar]) -> None:
        """Write scalar values (Python/numpy/0-d jax) for `step`."""

    @abc.abstractmethod
    def write_images(self, step: int, images: Mapping[str, Any]) -> None:
        """Write images, each (H, W, C) or (N, H, W, C): uint8 in [0, 255] or float in [0, 1]."""

    @abc.abstractmethod
    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
        """Write text (markdown in TensorBoard) for `step`."""

    @abc.abstractmethod
    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        """Write the run's hyper-parameters once (nested mappings are flattened with dots)."""

    def flush(self) -> None:  # noqa: B027 - optional hook, nothing to do by default
        """Push buffered output to its destination."""

    def close(self) -> None:
        """Flush and release resources; the writer must not be used afterwards."""
        self.flush()


_EVENTS_FILE_IDS = itertools.count()  # distinct names for writers opened in the same second


def _events_path(logdir: str) -> str:
    """A new file name TensorBoard picks up: ``events.out.tfevents.<time>.<host>.<pid>.<n>``."""
    name = (f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}."
            f"{os.getpid()}.{next(_EVENTS_FILE_IDS)}")
    return os.path.join(logdir, name)


def _record(data: bytes) -> bytes:
    """One TFRecord: u64 length, masked crc32c of the length, payload, masked crc32c of it."""
    header = struct.pack("<Q", len(data))
    return (header + struct.pack("<I", masked_crc32c(header)) + data
            + struct.pack("<I", masked_crc32c(data)))


class TensorBoardWriter(MetricWriter):
    """TensorBoard event files under `logdir`, appended on the calling thread.

    tensorboardX's SummaryWriter writes from a thread fed by a bounded queue: once that thread
    dies (disk full), `add_scalar` blocks forever. A few events per step need no thread, so each
    call frames its events (tensorboardX protos and summaries) and writes them unbuffered; any
    OSError raises at once, naming the events file.
    """

    def __init__(self, logdir: str | os.PathLike) -> None:
        self.logdir = os.fspath(logdir)
        self.path = _events_path(self.logdir)
        with self._naming_file():
            os.makedirs(self.logdir, exist_ok=True)
            self._file = open(self.path, "xb", buffering=0)  # noqa: SIM115 - closed by close()
        self._write([event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2")])

    @contextlib.contextmanager
    def _naming_file(self) -> Iterator[None]:
        """Re-raises an OSError with the events file named; `errno` is kept."""
        try:
            yield
        except OSError as err:
            error = OSError(f"cannot write TensorBoard events to {self.path}: {err}")
            error.errno = err.errno
            raise error from err

    def _write(self, events: Sequence[event_pb2.Event]) -> None:
        data = memoryview(b"".join(_record(e.SerializeToString()) for e in events))
        with self._naming_file():
            while data:  # a write may be partial (e.g. the last bytes before a full disk)
                data = data[self._file.write(data):]

    def _write_summaries(self, step: int | None, summaries: Sequence[Any]) -> None:
        now = time.time()
        events = [event_pb2.Event(wall_time=now, summary=s) for s in summaries]
        if step is not None:
            for event in events:
                event.step = int(step)
        self._write(events)

    def write_scalars(self, step: int, scalars: Mapping[str, Scalar]) -> None:
        self._write_summaries(step, [tbx_summary.scalar(key, float(np.asarray(value)))
                                     for key, value in scalars.items()])

    def write_images(self, step: int, images: Mapping[str, Any]) -> None:
        summaries = []
        for key, image in images.items():
            batch = _image_batch(key, image)
            if batch.dtype != np.uint8:  # tensorboardX scales floats by 255 without clipping
                batch = np.clip(batch.astype(np.float32), 0.0, 1.0)
            summaries.append(tbx_summary.image(key, batch, dataformats="NHWC"))
        self._write_summaries(step, summaries)

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
        self._write_summaries(step, [tbx_summary.text(key, text) for key, text in texts.items()])

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        # Into this run like clu (tensorboardX's add_hparams opens a new sub-run).
        self._write_summaries(None, tbx_summary.hparams(_flatten_hparams(hparams), {}))

    def flush(self) -> None:
        """Writes are unbuffered: flushing makes them durable (fsync)."""
        with self._naming_file():
            os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file.closed:
            return
        try:
            self.flush()
        finally:
            with self._naming_file():
                self._file.close()


class LoggingWriter(MetricWriter):
    """One absl INFO line per call, e.g. ``step 12 | loss=0.1234 image_loss=0.5``.

    Visible under `absl.app.run` (as in the CLI); absl hides INFO before flags are parsed.
    """

    def __init__(self, collection: str | None = None) -> None:
        self._prefix = f"[{collection}] " if collection else ""

    def _log(self, step: int | None, body: str) -> None:
        where = "" if step is None else f"step {step} | "
        logging.info("%s%s%s", self._prefix, where, body)

    def write_scalars(self, step: int, scalars: Mapping[str, Scalar]) -> None:
        values = " ".join(f"{k}={float(np.asarray(v)):.6g}" for k, v in scalars.items())
        self._log(step, values)

    def write_images(self, step: int, images: Mapping[str, Any]) -> None:
        shapes = " ".join(f"{k}={tuple(np.shape(v))}" for k, v in images.items())
        self._log(step, f"images {shapes}")

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
        for key, text in texts.items():
            self._log(step, f"{key}: {text}")

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        flat = _flatten_hparams(hparams)
        self._log(None, "hparams " + " ".join(f"{k}={v}" for k, v in sorted(flat.items())))


class NoOpWriter(MetricWriter):
    """Discards everything: the writer of non-zero processes, so only process 0 reports."""

    def write_scalars(self, step: int, scalars: Mapping[str, Scalar]) -> None:
        del step, scalars

    def write_images(self, step: int, images: Mapping[str, Any]) -> None:
        del step, images

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
        del step, texts

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        del hparams


class MultiWriter(MetricWriter):
    """Sends every call to each of `writers`, in order."""

    def __init__(self, writers: Sequence[MetricWriter]) -> None:
        self.writers = tuple(writers)

    def write_scalars(self, step: int, scalars: Mapping[str, Scalar]) -> None:
        for writer in self.writers:
            writer.write_scalars(step, scalars)

    def write_images(self, step: int, images: Mapping[str, Any]) -> None:
        for writer in self.writers:
            writer.write_images(step, images)

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
        for writer in self.writers:
            writer.write_texts(step, texts)

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        for writer in self.writers:
            writer.write_hparams(hparams)

    def flush(self) -> None:
        for writer in self.writers:
            writer.flush()

    def close(self) -> None:
        for writer in self.writers:
            writer.close()


def create_default_writer(
    logdir: str | os.PathLike | None = None,
    *,
    just_logging: bool = False,
    collection: str | None = None,
) -> MetricWriter:
    """Console + TensorBoard (under ``logdir[/collection]``) on process 0, a no-op elsewhere.

    Mirrors `clu.metric_writers.create_default_writer`: `just_logging` (or no `logdir`) gives the
    console only; `collection` (e.g. "train", "eval") names a TensorBoard sub-run and prefixes the
    console lines.
    """
    if jax.process_index() != 0:
        return NoOpWriter()
    console = LoggingWriter(collection)
    if just_logging or logdir is None:
        return console
    tb_dir = os.path.join(logdir, collection) if collection else os.fspath(logdir)
    return MultiWriter([console, TensorBoardWriter(tb_dir)])
