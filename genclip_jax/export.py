"""`genclip-jax export`: a self-contained inference artifact, run by `genclip_jax.serving`.

The artifact folder holds three files:
  manifest.json        what the function takes and gives: method, input size S, batch size B,
                       platforms, classes, the run's config hash, thresholds, versions;
  inference.jax        the inference serialised with `jax.export` (StableHLO) for the named
                       platforms: uint8 (B, S, S, 3) images in; the CLIP normalisation (the
                       vision tower's own, so the input path is `predict`'s bit for bit), the
                       frozen backbone, maps, blur and scores inside; {"anomaly_map",
                       "image_score"} out;
  weights.safetensors  every array the function takes besides the images.

Constants are folded at export, for any method: the inference is traced once with the params,
the backbone and the per-class inputs known and the images unknown, and JAX's partial evaluator
splits it (`fold_constants`). What does not depend on the image (the text features of learned
prompts, the resized position embedding) is computed here once and stored; the rest is exported.
Where the text depends on the image (GenCLIP's MVP branch: prompts built from vision tokens)
the text encoder stays inside the function, and only its image-independent parts (the class
word's token embeddings, the query-only branch) are folded.

The split is traced for one image and the exported function maps it over the batch
(`jax.vmap`): every built-in method scores images independently, and what is stored does not
grow with the batch size.

Classes: the per-class inputs are those of `genclip_jax.Model.inference_step`: the method's
`host_inputs` under the model's adaptation (GenCLIP: the class word's prompt ids, no CNF, as
`Model.predict`; WinCLIP: the class's text embeddings) and, with `fewshot.k` > 0, the class's
memory bank of reference patch tokens. What is folded from them is stored once per exported
class, stacked, and the function takes the class's index. Exported: "" (no class: the method's
generic word; left out when the model cannot run without a class, e.g. few-shot references of
several classes) and `classes` (`--class=a,b`), else the calibration's classes.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import pathlib
import shutil
from collections.abc import Callable, Collection, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import safetensors.numpy
from jax._src.interpreters import partial_eval as pe  # the partial evaluator grad and remat use
from jax.extend.core import ClosedJaxpr, Jaxpr, jaxpr_as_fun

import genclip_jax
from genclip_jax import api, calibrate, files, run_dir, validate
from genclip_jax.methods import needs_training
from genclip_jax.serving import FORMAT_VERSION, FUNCTION, MANIFEST, WEIGHTS

PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
PER_CLASS = ("batch", "bank")  # the `Model.inference_step` inputs that change by class

# Primitives whose results, when no larger than their operands, are worth storing. Everything
# else computed from constants (broadcasts, masks, reshapes, elementwise maths) is cheaper to
# redo on device than to store, and can be far larger than what it comes from: a causal
# attention mask broadcast to every prompt of a batch would weigh more than the backbone.
_WORTH_STORING = frozenset({
    "dot_general", "conv_general_dilated", "gather", "reduce_sum", "reduce_max", "reduce_min",
    "reduce_prod", "argmax", "argmin", "cumsum", "sort", "top_k",
})


def _nbytes(avals: Sequence[Any]) -> int:
    return sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for a in avals)


def _store_policy(prim, *avals, **params):
    """Partial-evaluation policy: which results computed from constants become stored arrays
    (`pe.Saveable`) rather than being recomputed inside the exported function."""
    if prim.name not in _WORTH_STORING:
        return pe.Recompute
    out, _ = prim.abstract_eval(*avals, **params)
    outs = out if isinstance(out, (list, tuple)) else [out]
    return pe.Saveable if _nbytes(outs) <= _nbytes(avals) else pe.Recompute


@dataclasses.dataclass(frozen=True)
class Folded:
    """`fn(known, image)` split by `fold_constants`.

    names: the stored arrays: the known leaf's path when one is passed through unchanged, else
      "folded/N" (a result computed from constants). per_class: whether it depends on the
      `per_class_keys` of `known` (then it differs by class).
    constants: known -> (stored arrays where `per_class` is False, those where it is True).
    staged: (*stored arrays in `names` order, image) -> fn's output leaves.
    """

    names: list[str]
    per_class: list[bool]
    constants: Callable[[Any], tuple[list[jax.Array], list[jax.Array]]]
    staged: Callable[..., list[jax.Array]]
    out_tree: Any


def _dce(jaxpr: Jaxpr, used: Sequence[bool]) -> Callable:
    """Jitted function of `jaxpr` (all its inputs) returning only the `used` outputs."""
    pruned, _ = pe.dce_jaxpr(jaxpr, list(used), instantiate=True)
    return jax.jit(jaxpr_as_fun(ClosedJaxpr(pruned, [])))


def fold_constants(
    fn: Callable[[Any, jax.Array], Any], known: dict, image: jax.ShapeDtypeStruct,
    per_class_keys: Collection[str],
) -> Folded:
    """Splits `fn(known, image)` into what depends on `image` and what is computed once.

    Args:
      fn: traceable; `known` a dict of arrays (those under its `per_class_keys` are the ones
        that change by class), `image` the one unknown input.
    """
    leaves, treedef = jax.tree_util.tree_flatten_with_path(known)
    values = [v for _, v in leaves]

    def flat(*args):
        return fn(jax.tree.unflatten(treedef, args[:-1]), args[-1])

    closed, out_shape = jax.make_jaxpr(flat, return_shape=True)(*values, image)
    jaxpr = pe.convert_constvars_jaxpr(closed.jaxpr)  # closed-over constants are known inputs
    n_known = len(closed.consts) + len(values)
    unknown = [False] * n_known + [True]
    known_jaxpr, staged, _, _, n_res = pe.partial_eval_jaxpr_custom(
        jaxpr, unknown, unknown, True, True, _store_policy)
    # The staged side can hold recomputed equations whose results it never uses.
    staged, used = pe.dce_jaxpr(staged, [True] * len(staged.outvars))
    keep = used[:n_res]
    known_jaxpr, _ = pe.dce_jaxpr(known_jaxpr, keep, instantiate=True)
    inputs = {v: i for i, v in enumerate(known_jaxpr.invars)}
    paths = [f"constant/{i}" for i in range(len(closed.consts))] + [
        jax.tree_util.keystr(p, simple=True, separator="/") for p, _ in leaves]
    folded = iter(range(len(known_jaxpr.outvars)))
    names = [paths[inputs[v]] if v in inputs else f"folded/{next(folded)}"
             for v in known_jaxpr.outvars]
    by_class = [False] * len(closed.consts) + [p[0].key in per_class_keys for p, _ in leaves]
    _, _, per_class, _ = pe.partial_eval_jaxpr_nounits(
        ClosedJaxpr(known_jaxpr, []), by_class, instantiate=False)
    shared_fn = _dce(known_jaxpr, [not c for c in per_class])
    class_fn = _dce(known_jaxpr, per_class)

    def constants(tree: Any) -> tuple[list[jax.Array], list[jax.Array]]:
        args = [*closed.consts, *jax.tree.leaves(tree)]
        return list(shared_fn(*args)), list(class_fn(*args))

    return Folded(names, list(per_class), constants,
                  jaxpr_as_fun(ClosedJaxpr(staged, [])), jax.tree.structure(out_shape))


def load_model(config: ml_collections.ConfigDict, workdir: str | None) -> api.Model:
    """`genclip_jax.load`'s model: `eval.params` (a params export), else the run in `workdir`,
    else the config alone (a method with nothing to train)."""
    if config.eval.params:
        return api.load(config.eval.params, config=config)
    if workdir and run_dir.RunDir(workdir).saved_config() is not None:
        return api.load(workdir, config=config)
    if needs_training(config.method):
        where = f"--workdir={workdir} holds no run (no config.json)" if workdir else "no --workdir"
        raise ValueError(f"{where}: method {config.method!r} needs a trained run, or "
                         "--config.eval.params=<a params export>")
    return api.load(config=config)


def _class_steps(model: api.Model, names: Sequence[str]) -> dict[str, tuple[Callable, dict]]:
    """{class: `Model.inference_step` for one image}: "" (no class) first, unless the model
    cannot run without one (few-shot references of several classes), then `names`."""
    steps = {}
    try:
        steps[""] = model.inference_step("", 1)
    except ValueError as err:
        if not names:
            raise ValueError(f"{err}: give the classes to export (--class=a,b)") from err
        logging.info("no class-less inputs in the artifact: %s", err)
    steps.update((name, model.inference_step(name, 1)) for name in names)
    return steps


def check_platforms(platforms: Sequence[str] | None) -> tuple[str, ...]:
    """The platforms to lower for (default: this machine's), each one of `PLATFORMS`."""
    chosen = tuple(dict.fromkeys(platforms or [jax.export.default_export_platform()]))
    bad = [p for p in chosen if p not in PLATFORMS]
    if bad or not chosen:
        raise ValueError(f"--platforms: expected names among {list(PLATFORMS)}, got {list(chosen)}")
    return chosen


def _check_out(out: str, overwrite: bool) -> pathlib.Path:
    path = pathlib.Path(out).absolute()
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out={path} is a file; expected a folder for the artifact")
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise FileExistsError(f"--out={path} exists and is not empty: give a new folder, or "
                                  "--overwrite to replace the artifact in it")
        if not (path / MANIFEST).is_file():
            raise ValueError(f"--out={path} holds files but no {MANIFEST}: it is not an artifact, "
                             "and --overwrite only replaces an artifact; give a new folder")
    files.check_writable(path.parent, "--out")
    return path


def serving_function(
    folded: Folded, shared: Sequence[Any], stacked: Sequence[np.ndarray],
    images: jax.ShapeDtypeStruct, platforms: Sequence[str],
) -> jax.export.Exported:
    """`folded.staged` (of one image) mapped over a batch `images`, exported: (stored arrays,
    class-stacked arrays, class index int32, images) -> {"anomaly_map", "image_score"}; the
    class's row of each stacked array is picked on device."""

    def serve(shared: list, per_class: list, class_index: jax.Array, images: jax.Array):
        common, by_class = iter(shared), iter(per_class)
        stored = [next(by_class)[class_index] if c else next(common) for c in folded.per_class]

        def one(pixels: jax.Array) -> Any:
            return jax.tree.unflatten(folded.out_tree, folded.staged(*stored, pixels[None]))

        return jax.tree.map(lambda x: x[:, 0], jax.vmap(one)(images))

    spec = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), (shared, stacked))
    return jax.export.export(jax.jit(serve), platforms=platforms)(
        *spec, jax.ShapeDtypeStruct((), jnp.int32), images)


def _write(out_dir: pathlib.Path, weights: dict[str, np.ndarray],
           exported: jax.export.Exported, manifest: dict) -> None:
    """The three files, staged beside `out_dir`, then swapped in as a whole."""
    staging = out_dir.with_name(f".{out_dir.name}.incoming")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        safetensors.numpy.save_file({k: np.ascontiguousarray(v) for k, v in weights.items()},
                                    str(staging / WEIGHTS))
        (staging / WEIGHTS).chmod(0o644)  # written 0600, but meant to be deployed
        (staging / FUNCTION).write_bytes(exported.serialize())
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        files.swap_directory(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def export(
    config: ml_collections.ConfigDict,
    workdir: str | None,
    out: str,
    *,
    batch_size: int | None = None,
    platforms: Sequence[str] | None = None,
    classes: Sequence[str] | None = None,
    calibration: str | None = None,
    overwrite: bool = False,
) -> pathlib.Path:
    """Writes the artifact folder `out` (staged beside it, then renamed into place).

    Args:
      batch_size: the function's fixed batch B (default `eval.batch_size`); `serving` pads or
        splits other batches.
      platforms: lowered for these (`PLATFORMS`; default: this machine's). Lowering needs no
        device of that platform.
      classes: the classes to fold per-class inputs for (default: the calibration's).
      calibration: a calibration file (default: `workdir`/calibration.json when it exists),
        checked against this config; its thresholds go into the manifest.
    Every input is checked before the model loads or anything is written.
    """
    validate.validate(config, "predict")
    out_dir = _check_out(out, overwrite)
    platforms = check_platforms(platforms)
    batch = config.eval.batch_size if batch_size is None else batch_size
    if batch < 1:
        raise ValueError(f"--batch-size: expected a positive integer, got {batch}")
    default = run_dir.RunDir(workdir).path / calibrate.FILE_NAME if workdir else None
    if calibration is None and default is not None and default.is_file():
        calibration = str(default)
    thresholds = calibrate.load(calibration, config) if calibration else None
    names = list(dict.fromkeys(classes or (thresholds.classes if thresholds else [])))
    validate.check_class_names(names, "--class")

    model = load_model(config, workdir)
    by_class = _class_steps(model, names)
    names = list(by_class)
    size = config.model.image_size
    step, first = by_class[names[0]]
    folded = fold_constants(step, first,
                            jax.ShapeDtypeStruct((1, size, size, 3), jnp.uint8), PER_CLASS)
    shared, _ = folded.constants(first)
    per_class = [folded.constants(inputs)[1] for _, inputs in by_class.values()]
    stacked = [np.stack(arrays) for arrays in zip(*per_class, strict=True)] if per_class[0] else []
    exported = serving_function(folded, shared, stacked,
                                jax.ShapeDtypeStruct((batch, size, size, 3), jnp.uint8), platforms)
    flags = folded.per_class
    shared_names = [n for n, c in zip(folded.names, flags, strict=True) if not c]
    class_names = [n for n, c in zip(folded.names, flags, strict=True) if c]
    weights = {**dict(zip(shared_names, map(np.asarray, shared), strict=True)),
               **dict(zip(class_names, stacked, strict=True))}
    manifest = {
        "format_version": FORMAT_VERSION,
        "method": config.method,
        "input_size": size,
        "batch_size": batch,
        "platforms": list(platforms),
        "config_hash": run_dir.config_hash(config),
        "source": model.source,
        "classes": names,
        "needs_class_name": bool(model.method.needs_class_name),
        "arguments": {"shared": shared_names, "per_class": class_names},
        "folded": sum(n.startswith("folded/") for n in folded.names),
        "calibration": None if thresholds is None else {
            "file": str(thresholds.path), "classes": thresholds.classes,
            "global": thresholds.glob},
        "versions": {"jax": jax.__version__, "genclip_jax": genclip_jax.__version__},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    _write(out_dir, weights, exported, manifest)
    print(f"artifact in {out_dir}: {config.method}, {batch} x {size}x{size} uint8 images, "
          f"platforms {', '.join(platforms)}, classes {[n for n in names if n] or 'none'}"
          + (", calibrated" if thresholds else ""))
    return out_dir
