"""Run an artifact of `genclip-jax export` with jax and numpy only: no flax, optax, orbax or
ml_collections at run time (besides them: safetensors' numpy reader for the weights, flatbuffers,
which `jax.export` needs to deserialise, and PIL, through the input pipeline's reader, for
`preprocess`).

    from genclip_jax import serving
    model = serving.load("artifacts/ac_visa")                  # manifest, weights, function
    images = np.stack([serving.preprocess(p, model.input_size) for p in paths])
    out = model(images, class_name="pcb1")                     # uint8 (N, S, S, 3)
    out["anomaly_map"], out["image_score"]                     # (N, S, S), (N,) float32
    out["decision"]                                            # (N,) bool, when calibrated

A batch smaller than the exported one is padded, a larger one split. `class_name` picks the
class's inputs (GenCLIP's class word, WinCLIP's text; one of `model.classes`, "" for none: the
method's generic word) and the class's threshold (else the global one). Outputs equal
`genclip_jax.load(run).predict(images, class_name=...)` on the same uint8 images.
"""

from __future__ import annotations

import json
import os
import pathlib
import warnings

import jax
import numpy as np
import safetensors.numpy

from genclip_jax.data import pipeline

FORMAT_VERSION = 1
MANIFEST, FUNCTION, WEIGHTS = "manifest.json", "inference.jax", "weights.safetensors"


def preprocess(path: str | os.PathLike, size: int) -> np.ndarray:
    """(size, size, 3) uint8: the image file as the input pipeline resizes it (8-bit mapping,
    PIL bicubic resize in its own mode, RGB), before the normalisation the artifact does."""
    return pipeline.resize_image(pipeline.read_image(path), size, str(path))


class Artifact:
    """A loaded artifact: call it on uint8 (N, S, S, 3) images. See the module docstring."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = pathlib.Path(directory)
        for name in (MANIFEST, FUNCTION, WEIGHTS):
            if not (self.directory / name).is_file():
                raise FileNotFoundError(f"{self.directory}: not a complete artifact of "
                                        f"`genclip-jax export`: {name} is missing")
        manifest = json.loads((self.directory / MANIFEST).read_text())
        if manifest.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{self.directory / MANIFEST}: format_version "
                             f"{manifest.get('format_version')!r}, this serving reads "
                             f"{FORMAT_VERSION}: export it again with this version")
        self.manifest = manifest
        self.input_size: int = manifest["input_size"]
        self.batch_size: int = manifest["batch_size"]
        self.classes: list[str] = manifest["classes"]
        platform = jax.export.default_export_platform()
        if platform not in manifest["platforms"]:
            raise ValueError(f"{self.directory}: exported for platforms {manifest['platforms']}, "
                             f"this machine runs {platform!r}: export it again with "
                             f"--platforms={','.join([*manifest['platforms'], platform])}")
        exported = jax.export.deserialize(bytearray((self.directory / FUNCTION).read_bytes()))
        weights = safetensors.numpy.load_file(str(self.directory / WEIGHTS))
        arguments = manifest["arguments"]
        missing = [n for n in (*arguments["shared"], *arguments["per_class"]) if n not in weights]
        if missing:
            raise ValueError(f"{self.directory / WEIGHTS}: arrays {missing[:5]} of the manifest "
                             f"are missing ({len(missing)} in all): the files do not belong "
                             "together; export it again")
        self._shared = [jax.device_put(weights[n]) for n in arguments["shared"]]
        self._per_class = [jax.device_put(weights[n]) for n in arguments["per_class"]]
        self._call = jax.jit(exported.call)
        self._warned: set[str] = set()

    def _class_index(self, class_name: str | None) -> int:
        if class_name is None and self.manifest["needs_class_name"]:
            raise ValueError(f"the {self.manifest['method']} prompts name the class: pass "
                             f"class_name= one of {self.classes} (\"\": the generic word)")
        name = class_name or ""
        if name in self.classes:
            return self.classes.index(name)
        if self._per_class:
            raise ValueError(f"class_name={name!r}: this artifact was exported for the classes "
                             f"{self.classes} (\"\": none); export it with --class={name}")
        return 0  # nothing depends on the class: it only picks the threshold

    def _threshold(self, class_name: str | None) -> float | None:
        calibration = self.manifest["calibration"]
        if calibration is None:
            return None
        name = class_name or ""
        if name in calibration["classes"]:
            return calibration["classes"][name]["image_threshold"]
        if name not in self._warned:
            self._warned.add(name)
            what = f"class {name!r}" if name else "images without a class (pass class_name=)"
            warnings.warn(f"{self.directory}: no calibration for {what}: using the global "
                          "threshold", UserWarning, stacklevel=3)
        return calibration["global"]["image_threshold"]

    def __call__(self, images: np.ndarray, class_name: str | None = None) -> dict[str, np.ndarray]:
        """{"anomaly_map": (N, S, S), "image_score": (N,)[, "decision": (N,) bool: image_score
        >= the class's threshold, when calibrated]} of uint8 (N, S, S, 3) `images`."""
        images = np.asarray(images)
        s = self.input_size
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (s, s, 3) or \
                not len(images):
            raise ValueError(f"images: this artifact takes uint8 (N, {s}, {s}, 3) with N >= 1 "
                             f"(input size {s}: see serving.preprocess), got {images.dtype} "
                             f"{images.shape}")
        index = np.int32(self._class_index(class_name))
        b = self.batch_size
        parts = []
        for start in range(0, len(images), b):
            chunk = images[start:start + b]
            padded = np.concatenate([chunk, np.zeros((b - len(chunk), s, s, 3), np.uint8)])
            out = self._call(self._shared, self._per_class, index, padded)
            parts.append({k: np.asarray(v)[:len(chunk)] for k, v in out.items()})
        result = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        threshold = self._threshold(class_name)
        if threshold is not None:
            result["decision"] = result["image_score"] >= threshold
        return result


def load(directory: str | os.PathLike) -> Artifact:
    """The artifact in `directory` (written by `genclip-jax export`), ready to call."""
    return Artifact(directory)
