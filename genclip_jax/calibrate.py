"""Thresholds that turn scores into decisions: `genclip-jax calibrate`, and reading them back.

From normal images (the usual case) each class gets an image threshold at a target false-alarm
rate (the (1 - `calibrate.image_fpr`) quantile of its normal image scores), a pixel threshold at a
target pixel false-positive rate (the (1 - `calibrate.pixel_fpr`) quantile of its normal pixel
scores) and a display range for heatmaps (low: the median normal pixel score; high: the
`calibrate.display_quantile` quantile of every calibration pixel, so that a normal image looks
cold and a defect saturates). With labelled anomalous images as well, the F1-optimal image and
pixel thresholds are reported beside them and `calibrate.policy` picks which pair decides. The
pooled images of all classes give the same for the global fallback, used for classes without
their own entry.

Calibration is the one command besides `train` that writes into a run, and only
RUN/calibration.json (atomically). Its `config_hash` ties it to the run's scores: predict refuses
a calibration of another model.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import math
import pathlib
import warnings

import ml_collections
import numpy as np

from genclip_jax import evaluate, fewshot, files, run_dir, validate
from genclip_jax.data import image_sets, pipeline
from genclip_jax.methods import needs_training

FILE_NAME = "calibration.json"
FORMAT_VERSION = 1


def fpr_threshold(normal: np.ndarray, fpr: float) -> float:
    """The (1 - fpr) quantile of normal scores (any shape): about `fpr` of them lie at or above
    it (with n samples, a rate below 1/n cannot be reached on the calibration set)."""
    return float(np.quantile(np.asarray(normal, np.float64).ravel(), 1.0 - fpr))


def f1_threshold(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """The threshold t maximising F1 of `score >= t` (t is one of the scores), or None without
    any positive or any negative.

    Args:
      scores: (N,) float.
      labels: (N,) 0/1.
    """
    scores, labels = np.asarray(scores, np.float64).ravel(), np.asarray(labels).ravel() > 0
    positives = int(labels.sum())
    if positives == 0 or positives == labels.size:
        return None
    order = np.argsort(-scores, kind="stable")
    ranked = scores[order]
    tp = np.cumsum(labels[order])
    predicted = np.arange(1, ranked.size + 1)
    last_of_tie = np.r_[ranked[1:] != ranked[:-1], True]
    f1 = np.where(last_of_tie, 2 * tp / (predicted + positives), -1.0)
    return float(ranked[int(np.argmax(f1))])


def display_range(normal_pixels: np.ndarray, all_pixels: np.ndarray, quantile: float
                  ) -> tuple[float, float]:
    """(median of the normal pixel scores, `quantile` of all calibration pixel scores)."""
    low = float(np.median(normal_pixels))
    high = float(np.quantile(all_pixels, quantile))
    return low, max(high, low + 1e-6)


def outliers(scores: np.ndarray, quantile: float, iqr_factor: float) -> np.ndarray:
    """Indices of scores above `quantile` of the other scores plus `iqr_factor` times their
    interquartile range: "normal" images that score like defects (with 0, any score above the
    quantile of the rest counts, which flags the top image of a small set whatever it is)."""
    scores = np.asarray(scores, np.float64)
    flagged = []
    for i in range(scores.size):
        rest = np.delete(scores, i)
        if rest.size < 2:
            continue
        q25, q75, top = np.quantile(rest, [0.25, 0.75, quantile])
        if scores[i] > top + iqr_factor * (q75 - q25):
            flagged.append(i)
    return np.asarray(flagged, np.int64)


@dataclasses.dataclass
class Scored:
    """What calibration needs of one group of images (a class, or all of them).

    normal_scores (n,), normal_pixels (n*S*S,) of the normal images; labelled_* of the anomalous
    set's images: scores (m,), labels (m,), and for those with a mask, pixels and pixel labels.
    """

    normal_scores: np.ndarray
    normal_pixels: np.ndarray
    labelled_scores: np.ndarray
    labelled_labels: np.ndarray
    labelled_pixels: np.ndarray
    labelled_pixel_labels: np.ndarray


def thresholds(scored: Scored, cfg: ml_collections.ConfigDict) -> dict:
    """The calibration entry of one group: thresholds by both rules, the chosen pair, the display
    range and the rates the chosen pair gives on the calibration images."""
    fpr = {"image": fpr_threshold(scored.normal_scores, cfg.image_fpr),
           "pixel": fpr_threshold(scored.normal_pixels, cfg.pixel_fpr)}
    f1 = None
    if scored.labelled_scores.size:
        n = scored.normal_scores.size
        image = f1_threshold(np.r_[scored.normal_scores, scored.labelled_scores],
                             np.r_[np.zeros(n), scored.labelled_labels])
        pixel = f1_threshold(np.r_[scored.normal_pixels, scored.labelled_pixels],
                             np.r_[np.zeros(scored.normal_pixels.size),
                                   scored.labelled_pixel_labels])
        f1 = {"image": image, "pixel": pixel}
    chosen = dict(fpr)
    if cfg.policy == "f1":
        chosen.update({k: v for k, v in (f1 or {}).items() if v is not None})
    low, high = display_range(scored.normal_pixels,
                              np.r_[scored.normal_pixels, scored.labelled_pixels],
                              cfg.display_quantile)
    return {
        "image_threshold": chosen["image"],
        "pixel_threshold": chosen["pixel"],
        "display_range": [low, high],
        "fpr": fpr,
        "f1": f1,
        "normal_images": int(scored.normal_scores.size),
        "anomalous_images": int((scored.labelled_labels > 0).sum()),
        "false_alarm_rate": float(np.mean(scored.normal_scores >= chosen["image"])),
        "pixel_false_positive_rate": float(np.mean(scored.normal_pixels >= chosen["pixel"])),
        "fallback": False,
    }


def _score(config: ml_collections.ConfigDict, model: evaluate.Model, root: str,
           entries: list[dict]) -> dict[str, np.ndarray]:
    dataset = pipeline.Dataset.from_entries(root, entries, config.data.missing_mask)
    model = evaluate.adapt_to_classes(config, model, dataset, entries)
    return evaluate.predict_dataset(config, model, dataset)


def _group(names: np.ndarray, normal: dict, labelled: dict | None, labelled_names: np.ndarray,
           cls: str | None) -> Scored:
    """The `Scored` of class `cls` (None: every class)."""
    n_idx = np.flatnonzero(names == cls) if cls is not None else np.arange(names.size)
    empty = np.zeros((0,), np.float32)
    if labelled is None:
        l_idx = np.zeros((0,), np.int64)
    else:
        l_idx = (np.flatnonzero(labelled_names == cls) if cls is not None
                 else np.arange(labelled_names.size))
    masked = l_idx[labelled["has_mask"][l_idx]] if labelled is not None else l_idx
    return Scored(
        normal_scores=normal["image_score"][n_idx],
        normal_pixels=normal["anomaly_map"][n_idx].ravel(),
        labelled_scores=labelled["image_score"][l_idx] if labelled is not None else empty,
        labelled_labels=labelled["label"][l_idx] if labelled is not None else empty,
        labelled_pixels=labelled["anomaly_map"][masked].ravel() if labelled is not None
        else empty,
        labelled_pixel_labels=labelled["mask"][masked].ravel() if labelled is not None
        else empty,
    )


def format_table(calibration: dict) -> str:
    """One row per class and the global fallback: counts, the chosen thresholds and the false
    alarm rates they give on the calibration images, and the F1-optimal ones when known."""
    header = ["class", "normal", "anomalous", "image thr", "false alarms", "pixel thr",
              "pixel FPR", "F1 image thr", "F1 pixel thr", "note"]
    rows = []
    for name, entry in {**calibration["classes"], "(global)": calibration["global"]}.items():
        f1 = entry["f1"] or {}
        rows.append([
            name, str(entry["normal_images"]), str(entry["anomalous_images"]),
            f"{entry['image_threshold']:.6g}", f"{100 * entry['false_alarm_rate']:.1f} %",
            f"{entry['pixel_threshold']:.6g}",
            f"{100 * entry['pixel_false_positive_rate']:.3f} %",
            *(f"{f1[k]:.6g}" if f1.get(k) is not None else "-" for k in ("image", "pixel")),
            "global fallback" if entry["fallback"] else "",
        ])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                       for i, (c, w) in enumerate(zip(r, widths, strict=True)))
             for r in [header, *rows]]
    return "\n".join(line.rstrip() for line in lines)


def calibrate(
    config: ml_collections.ConfigDict,
    workdir: str,
    normal: str,
    anomalous: str | None = None,
    out: str | None = None,
    overwrite: bool = False,
) -> pathlib.Path:
    """Scores the calibration images with the run's model and writes the thresholds to `out`
    (default RUN/calibration.json) atomically. Every check runs before the model is loaded."""
    validate.validate(config, "calibrate")
    cfg = config.calibrate
    if cfg.policy == "f1" and not anomalous:
        raise ValueError("calibrate.policy='f1' needs labelled anomalous images: give "
                         "--anomalous=PATH, or use calibrate.policy='fpr'")
    path = pathlib.Path(out) if out else run_dir.RunDir(workdir).path / FILE_NAME
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists: pass --overwrite to replace it")
    files.check_writable(path.parent, "--out" if out else f"the run {workdir}")
    normal_entries = image_sets.image_set(normal, "normal", "--normal")
    if config.fewshot.k:  # a reference scores as perfectly normal against itself: left out
        refs = fewshot.chosen_files(config.fewshot, [e["cls_name"] for e in normal_entries])
        kept = [e for e in normal_entries
                if (pathlib.Path(normal) / e["img_path"]).resolve() not in refs]
        if not kept:
            raise ValueError(f"--normal={normal}: every image is a few-shot reference of its "
                             "class (fewshot.*): calibrate on other normal images")
        if len(kept) < len(normal_entries):
            warnings.warn(f"{normal}: {len(normal_entries) - len(kept)} image(s) are few-shot "
                          "references of their class (fewshot.*) and are left out of the "
                          "calibration: against themselves they would score as perfectly normal",
                          UserWarning, stacklevel=2)
        normal_entries = kept
    counts = image_sets.class_counts(normal_entries)
    validate.check_class_names((e["cls_name"] for e in normal_entries), normal)
    few = {c: n for c, n in counts.items() if n < cfg.min_images}
    if few and not cfg.allow_fallback:
        raise ValueError(
            "calibrate: too few normal images for "
            + ", ".join(f"class {c!r} ({n})" for c, n in few.items())
            + f": expected at least calibrate.min_images={cfg.min_images}. Add images, or set "
            "calibrate.allow_fallback=true to use the global threshold for them")
    labelled_entries = None
    if anomalous:
        labelled_entries = image_sets.image_set(anomalous, "labelled", "--anomalous")
        validate.check_class_names((e["cls_name"] for e in labelled_entries), anomalous)
    if not config.eval.params and needs_training(config.method):
        run_dir.RunDir(workdir).check_readable(config)

    model = evaluate.load_model(config, workdir)
    normal_scored = _score(config, model, normal, normal_entries)
    names = np.array([e["cls_name"] for e in normal_entries])
    labelled_scored, labelled_names = None, np.array([], str)
    if labelled_entries is not None:
        labelled_scored = _score(config, model, anomalous, labelled_entries)
        labelled_names = np.array([e["cls_name"] for e in labelled_entries])

    classes, flagged = {}, []
    for cls in counts:
        group = _group(names, normal_scored, labelled_scored, labelled_names, cls)
        idx = np.flatnonzero(names == cls)
        flagged += [normal_entries[idx[i]]["img_path"]
                    for i in outliers(group.normal_scores, cfg.outlier_quantile, cfg.outlier_iqr)]
        if cls not in few:
            classes[cls] = thresholds(group, cfg)
    glob = thresholds(_group(names, normal_scored, labelled_scored, labelled_names, None), cfg)
    for cls, n in few.items():
        classes[cls] = {**glob, "normal_images": n, "fallback": True}
    if few:
        warnings.warn(f"calibrate: classes {sorted(few)} have fewer than calibrate.min_images="
                      f"{cfg.min_images} normal images ({few}): they use the global thresholds",
                      UserWarning, stacklevel=2)
    if flagged:
        warnings.warn(f"{normal}: {len(flagged)} 'normal' image(s) score like defects and may be "
                      f"defective: {flagged}", UserWarning, stacklevel=2)

    calibration = {
        "format": FORMAT_VERSION,
        "provenance": {
            "config_hash": run_dir.config_hash(config),
            "method": config.method,
            "backbone": config.model.clip,
            "params": model.source,
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "policy": cfg.policy,
            "image_fpr": cfg.image_fpr,
            "pixel_fpr": cfg.pixel_fpr,
            "display_quantile": cfg.display_quantile,
            "normal": str(pathlib.Path(normal).absolute()),
            "anomalous": str(pathlib.Path(anomalous).absolute()) if anomalous else None,
            "images": {c: {"normal": n, "anomalous": sum(
                e["cls_name"] == c and e["anomaly"] > 0 for e in labelled_entries or [])}
                for c, n in counts.items()},
        },
        "classes": classes,
        "global": glob,
    }
    files.write_atomic(path, json.dumps(calibration, indent=2) + "\n")
    print(format_table(calibration))
    print(f"calibration in {path}")
    return path


@dataclasses.dataclass(frozen=True)
class Calibration:
    """A calibration.json read back for `predict`: thresholds by class, global fallback."""

    path: pathlib.Path
    classes: dict
    glob: dict

    def entry(self, cls: str) -> dict:
        """The class's entry, or the global one (one warning per class, by the caller's
        `warnings` filter)."""
        if cls in self.classes:
            return self.classes[cls]
        what = (f"class {cls!r}" if cls else "images without a class (give --class=NAME, or put "
                "them in a subfolder named after their class)")
        warnings.warn(f"{self.path}: no calibration for {what}: using the global thresholds",
                      UserWarning, stacklevel=2)
        return self.glob


def load(path: str | pathlib.Path, config: ml_collections.ConfigDict) -> Calibration:
    """Reads a calibration file and checks that it belongs to this config's model."""
    path = pathlib.Path(path)
    try:
        data = json.loads(path.read_text())
        stored = data["provenance"]["config_hash"]
        classes, glob = data["classes"], data["global"]
    except FileNotFoundError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: not a calibration file of genclip-jax calibrate ({err})"
                         ) from err
    expected = run_dir.config_hash(config)
    if stored != expected:
        raise ValueError(
            f"{path}: calibrated for another model (config hash {stored}), this config's is "
            f"{expected}: run `genclip-jax calibrate` for this run, or use its own calibration")
    for name, entry in {**classes, "global": glob}.items():
        values = [entry.get("image_threshold"), entry.get("pixel_threshold"),
                  *(entry.get("display_range") or [None, None])]
        if not all(isinstance(v, int | float) and math.isfinite(v) for v in values):
            raise ValueError(f"{path}: entry {name!r}: expected finite image_threshold, "
                             f"pixel_threshold and display_range, got {entry}")
    logging.info("calibration %s (%s)", path, data["provenance"].get("date"))
    return Calibration(path, classes, glob)
