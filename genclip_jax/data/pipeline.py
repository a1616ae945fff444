"""Host input pipeline: decode with PIL, resize exactly as the reference, batch, shard.

Transforms (specs §1): image -> PIL `resize((S, S), BICUBIC)` in its own mode -> RGB -> /255 ->
CLIP mean/std; mask -> 'L' 0/255 from `mask > 0` -> `resize((S, S), BILINEAR)` -> /255 -> `> 0.5`.
The resizes run with PIL on the host; batches carry the resized uint8 pixels, and the vision tower
does the /255 and mean/std on device (`clip.preprocess.model_input`, bit-identical to the host's
`normalize`, which `image_transform` applies), so maps match the PyTorch reference bit for bit
while host memory and transfers hold a quarter of float32's bytes.

Input rules (each violation raises an error naming the file):
  * an image that does not decode fully (corrupt, truncated, not an image) -> ValueError;
  * a listed file that is missing -> FileNotFoundError;
  * masks: after conversion to 'L' every pixel > 0 is defect, as in the reference, so
    antialiased, JPEG-noisy or instance-labelled masks all work; a mask stored in colour (RGB/RGBA
    whose channels differ: usually a photo given as mask by mistake) is an error, as is a mask
    whose size differs from its image's (the reference would silently stretch it).
  * images whose pixels are not 8-bit are mapped to 8 bits by the range their values are really
    in, then rounded (PIL's own conversion clips: a [0, 1] float image would be scored as black,
    a 16-bit one as white); a range that cannot be told apart is an error, never a clip:
      - 16-bit modes (I;16, I;16L, I;16B, I;16N): x / 257;
      - 'I' (32-bit integer: how Pillow opens some 16-bit files): x / 257 when all values are in
        [0, 65535], else ValueError with the range found;
      - 'F' (32-bit float): any NaN or +-inf is a ValueError with their count; else, by the range
        all values are in: [0, 1] -> x * 255, [0, 255] -> x, [0, 65535] -> x / 257, any other
        (negative or larger) -> ValueError with the range found.
    This happens when the image is read (`Dataset.read`/`load`, so the error names the file) and in
    `image_transform`. All 8-bit modes follow the reference.
  * masks in 16-bit, 32-bit or float modes are compared raw (> 0) instead of through 'L' (which
    would clip or round them); a float mask holding NaN is an error.

Batches (dicts of numpy arrays, leading axis = this host's rows):
  image (b, S, S, 3) uint8 resized pixels, not normalised (left out with `with_images=False`),
  mask (b, S, S) bool, label (b,) int32, has_mask (b,) bool (False: a defect without a mask, and
  padding), valid (b,) bool, index (b,) int32 (position in the dataset, -1 for padding),
  cls_name / specie_name / img_path (b,) str. The global batch of `batch_size` rows is split
  over hosts, host h taking rows [h*b, (h+1)*b) with b = batch_size / process_count, so the union
  over hosts of one step is the single-host global batch. The last batch is padded (zero image,
  valid=False), never dropped. With `skip_unreadable` a sample that fails to load becomes a
  padding row that keeps its index (valid=False, index >= 0) instead of stopping the run.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import os
import pathlib
import queue
import threading
import warnings
from collections.abc import Callable, Generator, Iterator, Sequence

import jax
import numpy as np
from PIL import Image

from genclip_jax.clip.preprocess import normalize
from genclip_jax.data import meta as meta_lib

DEFAULT_IMAGE_SIZE = 518
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
# Float ranges in the order they are tried: (upper end, scale to 8 bits).
_FLOAT_RANGES = ((1.0, 255.0), (255.0, 1.0), (65535.0, 1 / 257))
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


# ----------------------------------------------------------------------------------------------
# Decoding and transforms.


def decode_image(data: bytes, name: str) -> Image.Image:
    """Fully decodes `data` (so truncation is caught here, not in a worker later)."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except _DECODE_ERRORS as e:
        raise ValueError(f"{name}: cannot decode image ({type(e).__name__}: {e})") from e
    return image


def _existing_file(path: str | os.PathLike) -> pathlib.Path:
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file {path} not found")
    return path


def read_image(path: str | os.PathLike) -> Image.Image:
    """Reads and decodes an image file; errors name the file."""
    path = _existing_file(path)
    return decode_image(path.read_bytes(), str(path))


def image_file_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) from the file's header, without decoding the pixels; errors name the file."""
    path = _existing_file(path)
    try:
        with Image.open(path) as image:
            return image.size
    except _DECODE_ERRORS as e:
        raise ValueError(f"{path}: cannot read image header ({type(e).__name__}: {e})") from e


def float_to_8bit(values: np.ndarray, name: str) -> np.ndarray:
    """uint8 pixels of float `values` by the range they are all in: [0, 1] -> x * 255,
    [0, 255] -> x, [0, 65535] -> x / 257, rounded. NaN, inf or any other range is a ValueError
    naming `name` (the file) and what was found."""
    values = np.asarray(values, np.float64)
    non_finite = np.count_nonzero(~np.isfinite(values))
    if non_finite:
        raise ValueError(
            f"{name}: float image has {non_finite} non-finite (NaN or inf) pixel(s) out of "
            f"{values.size}; expected finite values"
        )
    lo, hi = values.min(), values.max()
    scale = next((s for top, s in _FLOAT_RANGES if lo >= 0 and hi <= top), None)
    if scale is None:
        raise ValueError(
            f"{name}: float image has values in [{lo:g}, {hi:g}]; expected them all in "
            "[0, 1], [0, 255] or [0, 65535]"
        )
    return np.round(values * scale).astype(np.uint8)


def to_8bit(image: Image.Image, name: str) -> Image.Image:
    """`image` with 8-bit pixels, mapped by the range its values are really in (module docstring).

    8-bit modes come back unchanged. PIL's own conversion would clip instead, so a [0, 1] float
    image would be scored as a black one; errors name the file (`name`) and the range found.
    """
    if image.mode == "F":
        return Image.fromarray(float_to_8bit(np.asarray(image), name))
    if image.mode in _SIXTEEN_BIT_MODES:
        scaled = np.asarray(image, np.float64) / 257
    elif image.mode == "I":
        values = np.asarray(image, np.float64)
        lo, hi = values.min(), values.max()
        if lo < 0 or hi > 65535:
            raise ValueError(
                f"{name}: 32-bit integer image has values in [{lo:.0f}, {hi:.0f}]; expected "
                "[0, 65535] (16-bit pixels)"
            )
        scaled = values / 257
    else:
        return image
    return Image.fromarray(np.round(scaled).astype(np.uint8))


def mask_array(mask: Image.Image, name: str) -> np.ndarray:
    """(H, W) bool defect mask: every pixel > 0 after conversion to 'L' (the reference rule);
    16-bit, 32-bit and float masks are compared raw, since 'L' would clip or round them."""
    if mask.mode in ("RGB", "RGBA"):
        rgb = np.asarray(mask.convert("RGB"))
        if not ((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()):
            raise ValueError(
                f"{name}: mask is a colour image (RGB channels differ); expected a grayscale or "
                "binary mask (0 = normal, > 0 = defect)"
            )
    if mask.mode == "F":
        values = np.asarray(mask)
        nan = np.count_nonzero(np.isnan(values))
        if nan:
            raise ValueError(
                f"{name}: float mask has {nan} NaN pixel(s); expected 0 = normal, > 0 = defect"
            )
        return values > 0  # 'L' would round small values such as 0.3 to 0
    if mask.mode in _SIXTEEN_BIT_MODES or mask.mode == "I":
        return np.asarray(mask) > 0  # 'L' would clip them
    return np.asarray(mask.convert("L")) > 0


def resize_image(
    image: Image.Image, image_size: int = DEFAULT_IMAGE_SIZE, name: str = "image"
) -> np.ndarray:
    """(S, S, 3) uint8: `to_8bit`, PIL BICUBIC resize in that mode, RGB (what the model sees,
    before normalisation; training augmentations act here)."""
    resized = to_8bit(image, name).resize((image_size, image_size), Image.BICUBIC).convert("RGB")
    return np.asarray(resized)


def image_transform(
    image: Image.Image, image_size: int = DEFAULT_IMAGE_SIZE, name: str = "image"
) -> np.ndarray:
    """(S, S, 3) float32 CLIP-normalised image: `resize_image` then `normalize`.

    `name` (the file) is what an error about the pixel range names.
    """
    return normalize(resize_image(image, image_size, name))


def mask_transform(mask: np.ndarray | None, image_size: int = DEFAULT_IMAGE_SIZE) -> np.ndarray:
    """(S, S) bool mask: 'L' 0/255 -> PIL BILINEAR resize -> /255 -> > 0.5."""
    if mask is None:
        return np.zeros((image_size, image_size), bool)
    as_l = Image.fromarray(mask.astype(np.uint8) * 255)
    resized = np.asarray(as_l.resize((image_size, image_size), Image.BILINEAR))
    return resized > 127  # uint8 v: v / 255 > 0.5 <=> v > 127


# ----------------------------------------------------------------------------------------------
# Datasets.


@dataclasses.dataclass(frozen=True)
class RawSample:
    """A decoded sample, not resized: `image` already mapped to 8 bits by `to_8bit` (so a pixel
    range error names the file when it is read); None = read without the image (labels and masks
    only); `mask` None = no defect pixels; `label` -1 = unknown; `has_mask` False = a defect whose
    extent is unknown (no mask file): pixel losses and pixel metrics leave it out."""

    image: Image.Image | None
    mask: np.ndarray | None
    label: int
    cls_name: str
    specie_name: str
    img_path: str
    has_mask: bool = True


# A training augmentation that may turn a normal sample into a defective one: (dataset index,
# resized uint8 pixels) -> None (left as it is) or (new pixels, bool (S, S) mask, defect kind).
Synthesize = Callable[[int, np.ndarray], "tuple[np.ndarray, np.ndarray, str] | None"]
MISSING_MASK_RULES = ("ignore", "zeros")


class Dataset:
    """Random-access samples; `load(i, image_size)` returns sample i transformed.

    `read(i, with_image)` returns sample i decoded; without the image it decodes only the mask.
    `labels` (N,) holds every sample's label when known without reading (meta.json entries).
    """

    def __init__(
        self, size: int, read: Callable[[int, bool], RawSample],
        labels: np.ndarray | None = None,
    ):
        self._size = size
        self._read = read
        self.labels = labels

    @classmethod
    def from_entries(
        cls, root: str | os.PathLike, entries: Sequence[dict], missing_mask: str = "ignore"
    ) -> Dataset:
        """From meta.json entries (paths relative to `root`); masks read when anomaly == 1.

        A defect listed without a mask (`mask_path == ''`) is, by `missing_mask`: "ignore" = a
        sample without pixel labels (`has_mask` False), "zeros" = an all-normal mask (what the
        reference code does).
        """
        if missing_mask not in MISSING_MASK_RULES:
            raise ValueError(
                f"missing_mask: expected one of {list(MISSING_MASK_RULES)}, got {missing_mask!r}"
            )
        root = pathlib.Path(root)
        entries = list(entries)

        def read(i: int, with_image: bool) -> RawSample:
            entry = entries[i]
            image_path = root / entry["img_path"]
            image = to_8bit(read_image(image_path), str(image_path)) if with_image else None
            mask = None
            if entry["anomaly"] == 1 and entry["mask_path"]:
                mask_path = root / entry["mask_path"]
                mask = mask_array(read_image(mask_path), str(mask_path))
                width, height = image.size if image is not None else image_file_size(image_path)
                if mask.shape != (height, width):
                    raise ValueError(
                        f"{mask_path}: mask size {mask.shape[1]}x{mask.shape[0]} (WxH) differs "
                        f"from its image {entry['img_path']} size {width}x{height}"
                    )
            return RawSample(
                image,
                mask,
                entry["anomaly"],
                entry["cls_name"],
                entry["specie_name"],
                entry["img_path"],
                has_mask=entry["anomaly"] != 1 or bool(entry["mask_path"])
                or missing_mask == "zeros",
            )

        return cls(len(entries), read, np.array([e["anomaly"] for e in entries], np.int32))

    @classmethod
    def from_meta(
        cls,
        root: str | os.PathLike,
        split: str = "test",
        classes: Sequence[str] | None = None,
        meta_path: str | os.PathLike | None = None,
        missing_mask: str = "ignore",
    ) -> Dataset:
        """The reference Dataset: `meta[split]` classes in key order (`classes` filters).

        Every listed file is checked up front: a missing one fails now, not hours into a run.
        """
        meta_path = pathlib.Path(root) / "meta.json" if meta_path is None else meta_path
        meta = meta_lib.read_meta(meta_path, root=root, check_files=True)
        return cls.from_entries(root, meta_lib.split_entries(meta, split, classes), missing_mask)

    @classmethod
    def from_tfds(cls, source: Sequence[dict]) -> Dataset:
        """From a TFDS source of our builders with undecoded images (from
        `genclip_jax.data.tfds.builders.data_source`): PIL decodes the original bytes as above."""

        def read(i: int, with_image: bool) -> RawSample:
            ex = source[i]
            name = _text(ex["img_path"])
            mask = mask_array(decode_image(ex["mask"], f"{name} (mask)"), f"{name} (mask)")
            return RawSample(
                to_8bit(decode_image(ex["image"], name), name) if with_image else None,
                mask,
                int(ex["label"]),
                _text(ex["cls_name"]),
                _text(ex["specie_name"]),
                name,
            )

        return cls(len(source), read)

    def __len__(self) -> int:
        return self._size

    def read(self, i: int, with_image: bool = True) -> RawSample:
        """Sample i decoded, not transformed (`with_image=False`: the image is not decoded)."""
        if not 0 <= i < self._size:
            raise IndexError(f"sample index {i} out of range [0, {self._size})")
        return self._read(i, with_image)

    def load(
        self, i: int, image_size: int = DEFAULT_IMAGE_SIZE, with_image: bool = True,
        synthesize: Synthesize | None = None,
    ) -> dict:
        """Sample i transformed: image (S, S, 3) uint8 resized pixels (unless `with_image` is
        False; the model normalises them on device), mask (S, S) bool, label, has_mask, and its
        metadata. `synthesize` may paste a defect on a normal sample (after the resize): its mask
        and label 1 replace the sample's."""
        raw = self.read(i, with_image)
        sample = {
            "mask": mask_transform(raw.mask, image_size),
            "label": raw.label,
            "has_mask": raw.has_mask,
            "cls_name": raw.cls_name,
            "specie_name": raw.specie_name,
            "img_path": raw.img_path,
        }
        if with_image:
            pixels = resize_image(raw.image, image_size, raw.img_path)
            made = synthesize(i, pixels) if synthesize is not None and raw.label == 0 else None
            if made is not None:
                pixels, mask, kind = made
                sample.update(mask=mask.astype(bool), label=1, has_mask=True, specie_name=kind)
            sample["image"] = pixels
        return sample


def _text(value: str | bytes) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def scan_image_folder(folder: str | os.PathLike) -> tuple[list[dict], list[str]]:
    """(meta entries with label -1, other files) for every file under `folder` (recursive, sorted).

    A file counts as an image when its header reads (cheap: no pixel is decoded); one whose
    pixel data is corrupt is caught later, when the pipeline decodes it (`skip_unreadable`).
    """
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} not found")
    entries, skipped = [], []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        try:
            image_file_size(path)
        except ValueError:
            skipped.append(rel)
            continue
        entries.append(
            {"img_path": rel, "mask_path": "", "cls_name": "", "specie_name": "", "anomaly": -1}
        )
    if not entries:
        raise ValueError(f"{folder}: expected at least one readable image, found none")
    return entries, skipped


def warn_skipped(folder: str | os.PathLike, skipped: Sequence[str]) -> None:
    """ONE warning listing the files skipped as unreadable (a stray README must not stop a run)."""
    if skipped:
        warnings.warn(
            f"{folder}: skipped {len(skipped)} file(s) that are not readable images: "
            f"{sorted(skipped)}",
            stacklevel=3,
        )


# ----------------------------------------------------------------------------------------------
# Batching, sharding, prefetch.


def num_batches(n: int, batch_size: int) -> int:
    """Global batches per epoch: the last partial one is padded, never dropped."""
    return -(-n // batch_size)


def host_batch_indices(
    n: int,
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
    epoch: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
) -> np.ndarray:
    """(num_batches, batch_size / process_count) int32 dataset indices of this host, -1 = padding.

    The order depends only on (n, seed, epoch, shuffle), never on the host, so the union of the
    hosts' rows of a step is the single-host global batch. Host defaults: jax.process_index/count.
    """
    order = (
        np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    ).astype(np.int32)
    return _host_rows(_padded(order, batch_size), process_index, process_count)


def _padded(order: np.ndarray, batch_size: int) -> np.ndarray:
    """(num_batches, batch_size) global batches of `order`, the last one padded with -1."""
    padded = np.full(num_batches(len(order), batch_size) * batch_size, -1, np.int32)
    padded[:len(order)] = order
    return padded.reshape(-1, batch_size)


def _host_rows(plan: np.ndarray, process_index: int | None, process_count: int | None
               ) -> np.ndarray:
    """This host's columns of a global plan (num_batches, batch_size); defaults: jax's."""
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    batch_size = plan.shape[1]
    if batch_size % process_count:
        raise ValueError(
            f"batch_size {batch_size} must be a multiple of process_count {process_count}"
        )
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    rows = batch_size // process_count
    return plan[:, process_index * rows : (process_index + 1) * rows]


def grouped_batch_indices(
    groups: Sequence[str], batch_size: int, *, process_index: int | None = None,
    process_count: int | None = None,
) -> tuple[np.ndarray, list[str]]:
    """`host_batch_indices` (in dataset order) whose batches never mix groups: each group's
    samples fill batches of their own, its last one padded (few-shot inference runs a batch
    against one class's references).

    Returns:
      (this host's (num_batches, batch_size / process_count) indices, -1 = padding; the group
      of each batch).
    """
    groups = np.asarray(groups)
    plans, names = [], []
    for group in dict.fromkeys(groups.tolist()):
        plan = _padded(np.flatnonzero(groups == group).astype(np.int32), batch_size)
        plans.append(plan)
        names += [group] * len(plan)
    plan = np.concatenate(plans) if plans else np.zeros((0, batch_size), np.int32)
    return _host_rows(plan, process_index, process_count), names


def _collate(
    samples: list[dict | None], indices: np.ndarray, image_size: int, with_images: bool
) -> dict:
    """Stacks samples; a None sample is padding (zeros, valid=False)."""
    b = len(samples)
    batch = {
        "mask": np.zeros((b, image_size, image_size), bool),
        "label": np.zeros((b,), np.int32),
        "has_mask": np.zeros((b,), bool),
        "valid": np.array([s is not None for s in samples]),
        "index": indices.astype(np.int32),
    }
    if with_images:
        batch["image"] = np.zeros((b, image_size, image_size, 3), np.uint8)
    for r, s in enumerate(samples):
        if s is not None:
            for key in s.keys() & {"image", "mask", "label", "has_mask"}:
                batch[key][r] = s[key]
    for key in ("cls_name", "specie_name", "img_path"):
        batch[key] = np.array([s[key] if s is not None else "" for s in samples], dtype=object)
    return batch


_END = object()


@dataclasses.dataclass
class _Failure:
    error: BaseException


def _prefetch(items: Generator, size: int) -> Iterator:
    """Runs `items` in a background thread, up to `size` ahead; errors re-raise in the caller."""
    buffer: queue.Queue = queue.Queue(maxsize=size)
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                buffer.put(item, timeout=0.05)
                return True
            except queue.Full:
                pass
        return False

    def work() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(_END)
        except BaseException as e:  # handed over to the consumer thread
            put(_Failure(e))
        finally:
            items.close()  # shuts the decode pool down when the consumer stops early

    thread = threading.Thread(target=work, name="genclip-prefetch", daemon=True)
    thread.start()
    try:
        while (item := buffer.get()) is not _END:
            if isinstance(item, _Failure):
                raise item.error
            yield item
    finally:
        stop.set()
        thread.join()


def batches(
    dataset: Dataset,
    plan: np.ndarray,
    *,
    prefetch: int = 2,
    image_size: int = DEFAULT_IMAGE_SIZE,
    num_threads: int | None = None,
    with_images: bool = True,
    skip_unreadable: bool = False,
    synthesize: Synthesize | None = None,
) -> Iterator[dict]:
    """This host's batches of one epoch, one per row of `plan` (its `host_batch_indices`; see the
    module docstring for keys and sharding). Decoding runs on `num_threads` threads (PIL
    releases the GIL) and `prefetch` batches are prepared ahead in a background thread
    (0 = synchronous) so the accelerator does not wait on PIL.
    `with_images=False` decodes no image at all (masks, labels and metadata only: for epochs
    whose vision features are cached); `skip_unreadable` turns a sample that fails to load into a
    padding row that keeps its index (for `predict` over arbitrary folders); `synthesize` is
    handed to `Dataset.load` (training augmentation).
    """
    workers = num_threads or min(8, os.cpu_count() or 1)

    def load(i: int) -> dict | None:
        if i < 0:
            return None
        try:
            return dataset.load(int(i), image_size, with_images, synthesize)
        except (ValueError, FileNotFoundError):
            if skip_unreadable:
                return None
            raise

    def produce() -> Generator[dict, None, None]:
        with concurrent.futures.ThreadPoolExecutor(workers, "genclip-decode") as pool:
            for indices in plan:
                yield _collate(list(pool.map(load, indices)), indices, image_size, with_images)

    return _prefetch(produce(), prefetch) if prefetch > 0 else produce()
