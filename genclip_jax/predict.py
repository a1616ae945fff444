"""Scores images (no labels): `scores.csv` (or `.jsonl`), heatmap panels and, once calibrated,
decisions and defect masks.

With a calibration (`genclip-jax calibrate`), each image gets its class's threshold and a
decision (`anomalous` when image_score >= threshold), a binary defect mask at the input image's
own size (map >= the pixel threshold) under `masks/`, and a heatmap on the class's fixed display
range with the score, threshold and decision written on it. Without one, the heatmaps of the
whole run share one range (in `heatmaps/range.json`), so a uniform image does not show a hot spot.

Each image is decoded once; outputs are written by the host that loaded it, per batch, or without
a calibration once the run's range is known (maps and images wait in temporary files), so host
memory never holds the maps of the whole folder. Files that are not images, or
whose pixels do not decode, are skipped with one warning.
"""

from __future__ import annotations

import csv
import io
import json
import pathlib

import jax
import ml_collections
import numpy as np
from PIL import Image
from scipy import ndimage

from genclip_jax import calibrate, evaluate, files, heatmaps, parallel, run_dir, validate
from genclip_jax.data import pipeline
from genclip_jax.files import write_atomic
from genclip_jax.methods import needs_training

FORMATS = ("csv", "jsonl")
MAX_BOXES = 64  # defect regions listed per image (the largest first)


def check_apart(images: pathlib.Path, out: pathlib.Path) -> None:
    """The output replaces `out` as a whole and the next run scans `images`: neither may hold
    the other."""
    images, out = images.resolve(), out.resolve()
    if out == images or images in out.parents:
        raise ValueError(f"--out={out} is inside --images={images}: the heatmaps would be scored "
                         "as images on the next run; give an --out outside the image folder")
    if out in images.parents:
        raise ValueError(f"--images={images} is inside --out={out}, which is replaced as a "
                         "whole; give an --out that does not contain the images")


def _image_entries(images: pathlib.Path, class_name: str | None) -> tuple[pathlib.Path,
                                                                          list[dict], list[str]]:
    """(root, entries, skipped files): a folder's images (recursive), or one image file. An
    image's class is `class_name`, else its first subfolder under the folder, else none."""
    if images.is_file():
        pipeline.image_file_size(images)  # a clear error when it is not an image
        root = images.parent
        entries = [{"img_path": images.name, "mask_path": "", "cls_name": "", "specie_name": "",
                    "anomaly": -1}]
        skipped = []
    else:
        root = images
        entries, skipped = pipeline.scan_image_folder(images)
    for e in entries:
        e["cls_name"] = class_name or (e["img_path"].split("/", 1)[0] if "/" in e["img_path"]
                                       else "")
    return root, entries, skipped


def defect_mask(anomaly_map: np.ndarray, size: tuple[int, int], threshold: float) -> np.ndarray:
    """(H, W) bool at the input image's own (width, height) `size`: the map resized back
    (bilinear), at or above the pixel threshold."""
    resized = Image.fromarray(anomaly_map.astype(np.float32), mode="F").resize(size,
                                                                              Image.BILINEAR)
    return np.asarray(resized) >= threshold


def defect_regions(mask: np.ndarray) -> tuple[int, list[list[int]]]:
    """(defect area in pixels, [x0, y0, x1, y1] boxes (inclusive) of its 8-connected regions,
    largest first, at most `MAX_BOXES`)."""
    labels, count = ndimage.label(mask, structure=np.ones((3, 3), bool))
    if not count:
        return 0, []
    sizes = ndimage.sum_labels(mask, labels, index=np.arange(1, count + 1))
    boxes = ndimage.find_objects(labels)
    order = np.argsort(-sizes, kind="stable")[:MAX_BOXES]
    return int(mask.sum()), [[boxes[i][1].start, boxes[i][0].start, boxes[i][1].stop - 1,
                              boxes[i][0].stop - 1] for i in order]


class _Spill:
    """This host's maps and images of an uncalibrated run, on disk (sparse files) until the
    run's range is known: bounded host memory whatever the folder's size, one decode per image."""

    def __init__(self, folder: pathlib.Path, n: int, size: int) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.paths = [folder / f".{name}-{jax.process_index()}.npy" for name in ("maps", "images")]
        self.maps = np.lib.format.open_memmap(self.paths[0], mode="w+", dtype=np.float32,
                                              shape=(n, size, size))
        self.images = np.lib.format.open_memmap(self.paths[1], mode="w+", dtype=np.uint8,
                                                shape=(n, size, size, 3))
        self.owned = np.zeros(n, bool)

    def store(self, index: int, anomaly_map: np.ndarray, image: np.ndarray) -> None:
        self.maps[index], self.images[index] = anomaly_map, image
        self.owned[index] = True

    def close(self) -> None:
        del self.maps, self.images
        for path in self.paths:
            path.unlink(missing_ok=True)


def _save_panel(path: pathlib.Path, image: np.ndarray, anomaly_map: np.ndarray, score: float,
                entry: dict) -> None:
    """A calibrated panel: the class's fixed range, and score, threshold and decision on it."""
    anomalous = score >= entry["image_threshold"]
    heatmaps.save_panel(
        path, image, anomaly_map, value_range=tuple(entry["display_range"]),
        text=f"score {score:.4f}  threshold {entry['image_threshold']:.4f}  "
             + ("ANOMALOUS" if anomalous else "normal"),
        text_colour=(200, 0, 0) if anomalous else (0, 120, 0),
    )


def _write_scores(path: pathlib.Path, entries: list[dict], panels: list[str],
                  results: dict[str, np.ndarray], class_entry: dict) -> pathlib.Path:
    """scores.csv (image, class, image_score, pixel_max[, threshold, decision], heatmap[, mask])
    or scores.jsonl (the same plus the defect area and region boxes), read images only."""
    records = []
    for i in np.flatnonzero(results["read"]):
        cls = entries[i]["cls_name"]
        record = {"image": entries[i]["img_path"], "class": cls,
                  "image_score": float(results["image_score"][i]),
                  "pixel_max": float(results["pixel_max"][i])}
        if class_entry:
            threshold = class_entry[cls]["image_threshold"]
            record.update(threshold=threshold, decision="anomalous"
                          if record["image_score"] >= threshold else "normal")
        record["heatmap"] = f"heatmaps/{panels[i]}"
        if class_entry:
            record["mask"] = f"masks/{panels[i]}"
            record["defect_area"] = int(results["area"][i])
            record["boxes"] = results["boxes"][i, : results["n_boxes"][i]].tolist()
        records.append(record)
    if path.suffix == ".jsonl":
        return write_atomic(path, "".join(json.dumps(r) + "\n" for r in records))
    columns = ["image", "class", "image_score", "pixel_max"]
    columns += ["threshold", "decision", "heatmap", "mask"] if class_entry else ["heatmap"]
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(columns)
    for r in records:
        writer.writerow([f"{r[c]:.6f}" if isinstance(r[c], float) else r[c] for c in columns])
    return write_atomic(path, buffer.getvalue())


def _regions(maps: np.ndarray, host_batch: dict, root: pathlib.Path, names: list[str],
             pixel_thresholds: np.ndarray) -> dict[str, np.ndarray]:
    """Per row of this host's batch: the defect mask at the image's own size, its area and the
    boxes of its regions (padded to `MAX_BOXES`, count in n_boxes); masks keyed by row."""
    b = len(host_batch["valid"])
    out = {"area": np.zeros(b, np.int64), "n_boxes": np.zeros(b, np.int32),
           "boxes": np.zeros((b, MAX_BOXES, 4), np.int32), "masks": {}}
    for r in np.flatnonzero(host_batch["valid"]):
        i = int(host_batch["index"][r])
        size = pipeline.image_file_size(root / names[i])
        mask = defect_mask(maps[r], size, float(pixel_thresholds[r]))
        area, boxes = defect_regions(mask)
        out["masks"][r] = mask
        out["area"][r], out["n_boxes"][r] = area, len(boxes)
        if boxes:
            out["boxes"][r, : len(boxes)] = boxes
    return out


def predict_folder(
    config: ml_collections.ConfigDict,
    workdir: str,
    images: str,
    out_dir: str | None = None,
    *,
    calibration: str | None = None,
    class_name: str | None = None,
    output_format: str = "csv",
) -> pathlib.Path:
    """Scores every readable image of `images` (a folder, recursive, or one file) into `out_dir`
    (default `<workdir>/predict`), replaced as a whole: scores.csv or scores.jsonl, heatmaps/ and,
    with a calibration, masks/. Returns the path of the scores file.

    `calibration`: a calibration file (default: RUN/calibration.json when it exists).
    `class_name`: the class of every image. The run itself is only read, so a read-only run
    works given an `out_dir` elsewhere.
    """
    validate.validate(config, "predict")
    if output_format not in FORMATS:
        raise ValueError(f"--format: expected one of {list(FORMATS)}, got {output_format!r}")
    if class_name is not None:
        validate.check_class_names([class_name], "--class")
    flag = "--out" if out_dir else f"predict output (default of --out, in the run {workdir})"
    out = pathlib.Path(out_dir) if out_dir else run_dir.RunDir(workdir).predict_dir()
    check_apart(pathlib.Path(images), out)
    out = files.check_replaceable(out, flag)
    default_calibration = run_dir.RunDir(workdir).path / calibrate.FILE_NAME if workdir else None
    if calibration is None and default_calibration and default_calibration.is_file():
        calibration = str(default_calibration)
    thresholds = calibrate.load(calibration, config) if calibration else None
    parallel.initialize(config.parallel)  # before the first question to JAX
    if jax.process_index() == 0:
        files.check_writable(out.parent, flag)
    if not config.eval.params and needs_training(config.method):  # before the backbone loads
        run_dir.RunDir(workdir).check_readable(config)
    root, entries, skipped = _image_entries(pathlib.Path(images), class_name)
    names = [e["img_path"] for e in entries]
    panels = heatmaps.panel_names(names)
    dataset = pipeline.Dataset.from_entries(root, entries)
    model = evaluate.adapt_to_classes(config, evaluate.load_model(config, workdir), dataset,
                                      entries)
    n, scores_name = len(dataset), f"scores.{output_format}"
    classes = sorted({e["cls_name"] for e in entries})
    class_entry = {c: thresholds.entry(c) for c in classes} if thresholds else {}
    results = {"image_score": np.zeros(n, np.float32), "pixel_max": np.zeros(n, np.float32),
               "pixel_min": np.zeros(n, np.float32), "read": np.zeros(n, bool)}
    if thresholds:
        results.update(area=np.zeros(n, np.int64), n_boxes=np.zeros(n, np.int32),
                       boxes=np.zeros((n, MAX_BOXES, 4), np.int32))
    with run_dir.staged_output(out) as stage:
        spill = None if thresholds else _Spill(stage, n, config.model.image_size)
        try:
            for host_batch, outputs in evaluate.predictions(
                config, model, dataset, desc="predict", skip_unreadable=True
            ):
                local = parallel.host_local({k: outputs[k] for k in ("anomaly_map",
                                                                     "image_score")})
                pixel_min, pixel_max = evaluate.map_range(outputs["anomaly_map"])
                rows = {"image_score": outputs["image_score"], "index": outputs["index"],
                        "valid": outputs["valid"], "read": outputs["valid"],
                        "pixel_max": pixel_max, "pixel_min": pixel_min}
                shown = host_batch["image"]  # the uint8 pixels the model saw
                if spill is not None:
                    for r in np.flatnonzero(host_batch["valid"]):
                        spill.store(int(host_batch["index"][r]), local["anomaly_map"][r],
                                    shown[r])
                else:
                    entry = [class_entry.get(c, thresholds.glob) for c in host_batch["cls_name"]]
                    pixel = np.array([e["pixel_threshold"] for e in entry])
                    regions = _regions(local["anomaly_map"], host_batch, root, names, pixel)
                    for r, mask in regions.pop("masks").items():
                        i = int(host_batch["index"][r])
                        heatmaps.write_png(stage / "masks" / panels[i],
                                           (mask * 255).astype(np.uint8))
                        _save_panel(stage / "heatmaps" / panels[i], shown[r],
                                    local["anomaly_map"][r], float(local["image_score"][r]),
                                    entry[r])
                    rows.update(parallel.global_batch(
                        {**regions, "index": host_batch["index"]}, model.mesh))
                evaluate.store_rows(results, parallel.gather(rows))
            read = results["read"]
            if spill is not None:
                value_range = (float(results["pixel_min"][read].min()),
                               float(results["pixel_max"][read].max())) if read.any() else None
                for i in np.flatnonzero(read & spill.owned):
                    heatmaps.save_panel(stage / "heatmaps" / panels[i], spill.images[i],
                                        spill.maps[i], value_range=value_range)
                if jax.process_index() == 0 and value_range:
                    write_atomic(stage / "heatmaps" / "range.json", json.dumps(
                        {"value_range": list(value_range),
                         "note": "every panel of this run shows the map on this range"}) + "\n")
        finally:
            if spill is not None:
                spill.close()
        pipeline.warn_skipped(images, [*skipped, *(names[i] for i in np.flatnonzero(~read))])
        if not read.any():
            raise ValueError(f"{images}: expected at least one readable image, found none")
        if jax.process_index() == 0:
            _write_scores(stage / scores_name, entries, panels, results, class_entry)
    anomalous = sum(
        results["image_score"][i] >= class_entry[entries[i]["cls_name"]]["image_threshold"]
        for i in np.flatnonzero(read)) if thresholds else None
    print(f"{int(read.sum())} images scored, "
          + (f"{anomalous} anomalous, " if thresholds else "")
          + f"{len(skipped) + int((~read).sum())} skipped")
    if not thresholds:
        print("no calibration: scores are relative and there are no decisions; run "
              "`genclip-jax calibrate` for thresholds")
    return out / scores_name
