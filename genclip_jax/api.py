"""The Python API: load a trained or converted model in one line and run it on arrays.

    import genclip_jax
    model = genclip_jax.load("runs/ac_visa")         # a run: its latest checkpoint, read-only
    result = model.predict(images)                    # (N, H, W, 3) uint8 or float, any size
    result.anomaly_map, result.image_score            # (N, S, S) and (N,) numpy arrays

`load` takes a run directory (written by `genclip-jax train`), a params export (written by
`genclip-jax convert`, with `config=` for anything but the method and prompt sizes it records),
or, for a method with nothing to train, a config alone. Arrays are resized and normalised
exactly as the input pipeline does with files, split into batches of `eval.batch_size` (the last
one padded) and run through one compiled program per batch shape. Single process only: for
multi-host evaluation use `genclip-jax eval`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
from PIL import Image

from genclip_jax import (
    calibrate,
    checkpoint,
    config_overrides,
    defaults,
    evaluate,
    fewshot,
    parallel,
    run_dir,
    steps,
    validate,
)
from genclip_jax.clip.vision import VisionFeatures, batch_axes
from genclip_jax.data import pipeline
from genclip_jax.methods import Adaptation, Method, needs_training

# Short names of the fields a user most often changes at load time; any other field is given
# with `__` for its dots (`model__npz_prefix="sd."`).
ALIASES = {
    "clip": "model.clip", "image_size": "model.image_size",
    "compute_dtype": "model.compute_dtype", "batch_size": "eval.batch_size",
    "num_devices": "parallel.num_devices",
}


@dataclasses.dataclass(frozen=True)
class Prediction:
    """What `Model.predict` returns, at the model's input size S (`config.model.image_size`).

    anomaly_map: (N, S, S) float32 per-pixel anomaly scores (blurred, as `eval` scores them).
    image_score: (N,) float32 image anomaly scores.
    decision: (N,) bool, True = anomalous (image_score >= the class's calibrated image
      threshold), or None when the model has no calibration (`genclip-jax calibrate`).
    defect_mask: (N, S, S) bool, anomaly_map >= the calibrated pixel threshold, or None.
    """

    anomaly_map: np.ndarray
    image_score: np.ndarray
    decision: np.ndarray | None = None
    defect_mask: np.ndarray | None = None


def _images_in(images: Any, image_size: int, normalized: bool) -> np.ndarray:
    """(N, S, S, 3) model input from user arrays (see `Model.predict`): uint8 resized pixels
    (normalised on device), or float32 already normalised with `normalized`."""
    array = np.asarray(images)
    if array.ndim == 3:
        array = array[None]
    if normalized:
        expected = (image_size, image_size, 3)
        if array.ndim != 4 or array.shape[1:] != expected or array.dtype.kind != "f":
            raise ValueError(f"images (normalized=True): expected float (N, {image_size}, "
                             f"{image_size}, 3), got {array.dtype} {np.shape(images)}")
        return array.astype(np.float32)
    if array.ndim != 4 or array.shape[-1] not in (1, 3, 4) or not array.shape[0]:
        raise ValueError("images: expected (N, H, W, C) or (H, W, C) with C = 1, 3 or 4 (gray, "
                         f"RGB, RGBA), got shape {np.shape(images)}")
    if array.dtype.kind == "f":
        array = pipeline.float_to_8bit(array, "images")
    elif array.dtype == np.uint16:
        array = np.round(array / 257).astype(np.uint8)
    elif array.dtype != np.uint8:
        raise ValueError(f"images: expected uint8, uint16 or float pixels, got {array.dtype}")
    pixels = array[..., 0] if array.shape[-1] == 1 else array
    return np.stack([pipeline.resize_image(Image.fromarray(p), image_size) for p in pixels])


class Model:
    """A method, its params and frozen backbone, compiled for inference on this host's devices.

    Built by `load`; `config` and `method` are what it runs, `source` where its params came from.
    """

    def __init__(self, config: ml_collections.ConfigDict, inference: evaluate.Model,
                 calibration: calibrate.Calibration | None = None) -> None:
        self.config = config
        self.calibration = calibration  # thresholds of `decision` / `defect_mask`, or None
        self._inference = inference
        self.batch_size = config.eval.batch_size
        self._adaptations: dict[str, Adaptation] = {}

    def _adaptation(self, class_name: str | None) -> Adaptation:
        """The adaptation `predict` runs under for `class_name`: the loaded model's, or, for a
        method with nothing to train (WinCLIP: per-class text and references), `prepare_eval`'s
        for that class, computed once per class ("" = the generic word)."""
        m = self._inference
        if needs_training(self.config.method):
            return m.adaptation
        name = class_name or ""
        if name not in self._adaptations:
            self._adaptations[name] = m.method.prepare_eval(m.clip_params, [name] if name else [],
                                                            lambda cls: None)
        return self._adaptations[name]

    @property
    def method(self) -> Method:
        return self._inference.method

    @property
    def source(self) -> str:
        return self._inference.source

    def _batches(self, images: np.ndarray, class_name: str | None, with_inputs: bool = True):
        """This host's padded batches of `images` (with the method's `host_inputs` unless
        `with_inputs` is False): (host batch, number of real rows)."""
        for start in range(0, len(images), self.batch_size):
            chunk = images[start:start + self.batch_size]
            n = len(chunk)
            pad = np.zeros((self.batch_size - n, *chunk.shape[1:]), chunk.dtype)
            host = {"image": np.concatenate([chunk, pad]),
                    "valid": np.arange(self.batch_size) < n,
                    "cls_name": np.array([class_name or ""] * n + [""] * (len(pad)), object)}
            if with_inputs:
                host.update(self.method.host_inputs(host, self._adaptation(class_name)))
            yield parallel.global_batch(host, self._inference.mesh), n

    def predict(
        self, images: Any, *, class_name: str | None = None, normalized: bool = False
    ) -> Prediction:
        """Anomaly maps and image scores of `images`.

        Args:
          images: (N, H, W, C) or (H, W, C) pixels at any size: uint8, uint16 or float (by the
            range they are in: [0, 1], [0, 255] or [0, 65535]); C = 1, 3 or 4. Resized and
            normalised like image files. With `normalized=True`: float (N, S, S, 3) already
            CLIP-normalised at the model's size S.
          class_name: the parts' class (e.g. "bottle") for methods whose prompts name it
            (GenCLIP); pass its generic word (e.g. "object") if unknown.
        """
        if class_name is None and self.method.needs_class_name:
            raise ValueError(
                f"predict: the {self.method.name} prompts name the class: pass class_name= "
                "(e.g. class_name='bottle'), or the generic word "
                f"{self.config.genclip.cnf.generic_word!r} when it is unknown"
            )
        pixels = _images_in(images, self.config.model.image_size, normalized)
        m = self._inference
        maps, scores = [], []
        for batch, n in self._batches(pixels, class_name):
            out = m.infer(batch.pop("image"), batch, class_name or "", keep_others=True)
            maps.append(np.asarray(out["anomaly_map"])[:n])
            scores.append(np.asarray(out["image_score"])[:n])
        anomaly_map, image_score = np.concatenate(maps), np.concatenate(scores)
        if self.calibration is None:
            return Prediction(anomaly_map, image_score)
        entry = self.calibration.entry(class_name or "")
        return Prediction(anomaly_map, image_score, image_score >= entry["image_threshold"],
                          anomaly_map >= entry["pixel_threshold"])

    def encode_images(self, images: Any, *, normalized: bool = False) -> VisionFeatures:
        """The frozen vision features the method uses (numpy; leading axis N for the global
        feature, axis 1 for the per-layer patch tokens and mean tokens)."""
        pixels = _images_in(images, self.config.model.image_size, normalized)
        parts = []
        for batch, n in self._batches(pixels, None, with_inputs=False):
            feats = jax.device_get(steps.encode_images(self.method, self._inference.clip_params,
                                                       batch["image"]))
            parts.append(jax.tree.map(lambda axis, x, n=n: np.take(x, np.arange(n), axis),
                                      batch_axes(feats), feats))
        return jax.tree.map(lambda axis, *xs: np.concatenate(xs, axis), batch_axes(parts[0]),
                            *parts)

    def inference_step(
        self, class_name: str | None, rows: int
    ) -> tuple[Callable[[dict, jax.Array], dict], dict[str, Any]]:
        """(step, inputs): the pure inference `predict` runs on `rows` images (uint8 pixels or
        normalised floats) of `class_name` (None or "": no class), `step(inputs, images) ->
        {"anomaly_map", "image_score"}`, and everything it takes besides the images, as numpy:
        "params", "clip_params", "batch" (the method's `host_inputs` under this model's
        adaptation, and `valid`) and, with few-shot references, the class's memory "bank".
        `genclip-jax export` folds the inputs into constants ("batch" and "bank" change by
        class)."""
        m = self._inference
        name = class_name or ""
        host = {"valid": np.ones(rows, bool), "cls_name": np.array([name] * rows, object)}
        inputs = {"params": jax.device_get(m.params), "clip_params": jax.device_get(m.clip_params),
                  "batch": {**self.method.host_inputs(host, self._adaptation(class_name)),
                            "valid": host["valid"]}}
        if m.references is None:
            return (lambda k, images: steps.predict(m.method, k["params"], k["clip_params"],
                                                    images, k["batch"])), inputs
        inputs["bank"] = jax.device_get(m.references.bank(name, keep_others=True))
        spec, cfg = m.references.spec, m.references.cfg
        return (lambda k, images: fewshot.predict(m.method, spec, k["params"], k["clip_params"],
                                                  images, k["batch"], k["bank"], float(cfg.weight),
                                                  float(cfg.image_weight))), inputs

    def text_features(self, class_name: str | None = None) -> np.ndarray:
        """(2, D) [normal, abnormal] text features of the learned prompts (for `class_name`
        where the method's prompts name the class)."""
        m = self._inference
        return np.asarray(steps.text_features(m.method, m.params, m.clip_params, class_name))


def _apply(config: ml_collections.ConfigDict, overrides: dict[str, Any]):
    """`overrides` applied, the batch size rounded up to a multiple of the devices it uses."""
    fields = {ALIASES.get(k, k.replace("__", ".")): v for k, v in overrides.items()}
    config = config_overrides.apply_overrides(config, fields)
    devices = config.parallel.num_devices or jax.device_count()
    config.eval.batch_size = -(-config.eval.batch_size // devices) * devices
    return config


def _export_config(info: dict | None, path: pathlib.Path) -> ml_collections.ConfigDict:
    """The config of a params export: the full config it stores, or the defaults with what a
    converted checkpoint records (method, prompt sizes)."""
    if info and "model" in info:
        return ml_collections.ConfigDict(info)
    if not info or "method" not in info:
        raise ValueError(f"{path}: the export records no config; pass config= (a config file "
                         "or ConfigDict) to load it")
    config = defaults.base_config()
    known = {k: v for k, v in info.items() if "." in k or k == "method"}
    return config_overrides.apply_overrides(config, known)


def _as_config(config: str | os.PathLike | ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    if isinstance(config, ml_collections.ConfigDict):
        return config
    return config_overrides.load_config_file(os.fspath(config))


def _calibration(given: str | os.PathLike | None, run: pathlib.Path | None,
                 config: ml_collections.ConfigDict) -> calibrate.Calibration | None:
    """`given` (an error unless it fits `config`), else the run's own calibration.json when it
    fits (a config changed at load time, e.g. few-shot, gets a warning and no decisions)."""
    if given is not None:
        return calibrate.load(given, config)
    default = run / calibrate.FILE_NAME if run is not None else None
    if default is None or not default.is_file():
        return None
    try:
        return calibrate.load(default, config)
    except ValueError as err:
        logging.warning("load: %s; predictions carry no decisions", err)
        return None


def load(
    path: str | os.PathLike | None = None,
    *,
    config: str | os.PathLike | ml_collections.ConfigDict | None = None,
    calibration: str | os.PathLike | None = None,
    **overrides: Any,
) -> Model:
    """A model ready for `predict`, from a run, a params export or a config.

    Args:
      path: a run directory (its config.json and latest checkpoint; nothing is written), or a
        params export (the output of `genclip-jax convert`). None: `config` alone, for a method
        with nothing to train.
      config: a config file (`configs/X.py[:arg]`) or ConfigDict; default: the run's own.
      calibration: a calibration.json of `genclip-jax calibrate` for `Prediction.decision`;
        default: the run's own when it exists and was made for this config.
      **overrides: config fields to change: `clip=` (the backbone: e.g. a local copy of the
        run's weights), `image_size=`, `compute_dtype=`, `batch_size=`, `num_devices=`, or any
        field with `__` for its dots (`genclip__fusion_w=0.3`, `fewshot__k=4`).
    """
    if path is None:
        if config is None:
            raise ValueError("load: give a run directory or params export, or config=")
        cfg = _apply(_as_config(config), overrides)
        validate.validate(cfg, "predict")
        inference = evaluate.load_model(cfg, "", params={})
        if jax.tree.leaves(jax.eval_shape(inference.method.init, jax.random.PRNGKey(0))):
            raise ValueError(f"load: method {cfg.method!r} learns params: load a run directory "
                             "or a params export, not a config alone")
        return Model(cfg, inference, _calibration(calibration, None, cfg))
    path = pathlib.Path(path)
    run = run_dir.RunDir(path)
    if run.saved_config() is not None:
        cfg = _apply(_as_config(config) if config else ml_collections.ConfigDict(
            run.saved_config()), overrides)
        validate.validate(cfg, "predict")
        unpinned = ("model.clip",) if "clip" in overrides or "model__clip" in overrides else ()
        if unpinned:
            logging.warning("load: model.clip=%r instead of the run's: it must hold the same "
                            "weights", cfg.model.clip)
        calibrated = _calibration(calibration, path, cfg)
        return Model(cfg, evaluate.load_model(cfg, str(path), unpinned=unpinned), calibrated)
    if (path / "params").is_dir():
        _, info = checkpoint.load_params(path)
        cfg = _as_config(config) if config else _export_config(info, path)
        cfg = _apply(cfg, {**overrides, "eval__params": str(path)})
        validate.validate(cfg, "predict")
        calibrated = _calibration(calibration, None, cfg)
        return Model(cfg, evaluate.load_model(cfg, ""), calibrated)
    raise FileNotFoundError(
        f"load: {path} is neither a run directory (expected {path / 'config.json'} and "
        f"{path / 'checkpoints'}) nor a params export (expected {path / 'params'}/)"
    )
