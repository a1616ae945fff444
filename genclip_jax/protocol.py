"""The papers' cross-dataset protocol in one command: train on a source set once per seed,
evaluate zero-shot (and k-shot) on every target set, and write the table of the papers' Table 1.

    <workdir>/seed<s>/                    the run trained on the source set with train.seed=s
    <workdir>/seed<s>/eval/<cell>/        its evaluation on a target (tables, heatmaps)
    <workdir>/seed<s>/cells/<cell>.json   the finished (seed, target, k) cell: its class rows
    <workdir>/protocol.{md,csv,json}      rows: target sets (and k-shot rows); columns: the
                                          paper's metrics, mean ± std over seeds of each
                                          seed's class mean
    <workdir>/classes/<cell>.{md,csv,json}  per-class table of a cell, mean ± std over seeds

A cell is named after its target, `<target>_<k>shot` for k > 0 (`--shots`): k references per
class drawn from the target's train split (good images) with `fewshot.seed` = the seed, so the
spread over seeds covers the draw of the references too, as the papers' few-shot tables do.
A finished cell is kept, not recomputed, and a finished training (its `trained.json`) is not
repeated, so a rerun after a crash or with more targets, shots or seeds does only what is
missing. Runs multi-host like `train` (every process runs the loop; process 0 writes the
tables). A method with nothing to train (WinCLIP) is a row without training: evaluated once per
cell, with the first seed, and no checkpoint.
"""

from __future__ import annotations

import copy
import json
import os
import pathlib
from collections.abc import Mapping, Sequence

import jax
import ml_collections
from absl import logging

from genclip_jax import ablate, evaluate, fewshot, train, validate
from genclip_jax.data import meta as meta_lib
from genclip_jax.files import write_atomic
from genclip_jax.methods import needs_training

# The columns of the papers' Table 1, in their order (those the config computes).
PAPER_METRICS = ("image_auroc", "image_ap", "pixel_auroc", "pixel_aupro")
TRAINED_FILE = "trained.json"


def parse_roots(items: Sequence[str]) -> dict[str, str]:
    """['mvtec=/data/mvtec', ...] -> {name: root}."""
    roots = {}
    for item in items:
        name, sep, root = item.partition("=")
        if not sep or not name.strip() or not root.strip():
            raise ValueError(f"--roots: expected name=path items, got {item!r}")
        if name.strip() in roots:
            raise ValueError(f"--roots: {name.strip()!r} is given twice")
        roots[name.strip()] = root.strip()
    return roots


def cell_name(target: str, k: int) -> str:
    """The name of the (target, k) cell: its eval folder, cell file and per-class tables."""
    return f"{target}_{k}shot" if k else target


def _check_references(config: ml_collections.ConfigDict, target: str, root: str, k: int
                      ) -> None:
    """Every test class of `root` has k references in its `fewshot.split` (before training)."""
    classes = {e["cls_name"] for e in meta_lib.split_entries(
        meta_lib.read_meta(pathlib.Path(root) / "meta.json", root=root),
        config.data.test_split, list(config.data.test_classes) or None)}
    paths = fewshot.reference_paths(root, config.fewshot.split)
    for cls in sorted(classes):
        try:
            fewshot.select(paths, cls, k, root)
        except ValueError as err:
            raise ValueError(f"--shots={k}, target {target}: {err}") from err


def _check(source: str, targets: Sequence[str], roots: Mapping[str, str],
           seeds: Sequence[int], shots: Sequence[int]) -> None:
    """Everything that can fail before any training: names, roots, seeds, shots."""
    if not targets:
        raise ValueError("--targets: expected at least one target set")
    if len(set(targets)) != len(targets):
        raise ValueError(f"--targets: each set once, got {list(targets)}")
    missing = [n for n in (source, *targets) if n not in roots]
    if missing:
        raise ValueError(f"--roots: no root for {missing}; give name=path for every set "
                         f"(have {sorted(roots)})")
    for name in (source, *targets):
        if not (pathlib.Path(roots[name]) / "meta.json").is_file():
            raise FileNotFoundError(f"--roots: {name}={roots[name]} has no meta.json (write it "
                                    "with `genclip-jax make-meta`)")
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds: expected distinct training seeds, got {list(seeds)}")
    if not shots or len(set(shots)) != len(shots) or min(shots) < 0:
        raise ValueError(f"--shots: expected distinct numbers of references >= 0 (0: "
                         f"zero-shot), got {list(shots)}")


def _read_rows(path: pathlib.Path, test_root: str) -> dict | None:
    """The rows of a finished cell for `test_root`, None if absent; another root raises."""
    if not path.is_file():
        return None
    cell = ablate.read_cell(path)
    if os.path.normpath(str(cell["test_root"])) != os.path.normpath(test_root):
        raise ValueError(f"{path}: evaluated on {cell['test_root']!r}, the protocol now names "
                         f"{test_root!r}; delete the cell to recompute it or use another workdir")
    return cell["rows"]


def paper_columns(table: Mapping[str, dict]) -> dict[str, dict]:
    """The table's entries with the paper's metrics only (those computed), in their order."""
    names = [m for m in PAPER_METRICS if m in ablate.document(table)["metrics"]]
    return {name: {**entry, "mean": {m: entry["mean"][m] for m in names},
                   "std": {m: entry["std"][m] for m in names}}
            for name, entry in table.items()}


def run_protocol(
    config: ml_collections.ConfigDict,
    workdir: str,
    source: str,
    targets: Sequence[str],
    roots: Mapping[str, str],
    seeds: Sequence[int] | None = None,
    shots: Sequence[int] = (0,),
) -> dict:
    """Trains on `roots[source]` once per seed (default `train.seed`) and evaluates on every
    target with each number of references in `shots` (0: zero-shot); writes the tables and
    returns the protocol document {"metrics": [...], "variants": {cell: {"seeds", "mean",
    "std", "per_seed", "classes", ...}}} (values in [0, 1])."""
    seeds = [int(config.train.seed)] if seeds is None else [int(s) for s in seeds]
    shots = [int(k) for k in shots]
    _check(source, targets, roots, seeds, shots)
    base = copy.deepcopy(config)
    base.data.train_root = roots[source]
    base.data.test_root = roots[targets[0]]
    base.fewshot.reference = ""  # each target's own train split
    trained = needs_training(config.method)
    validate.validate(base, "train" if trained else "eval")
    if max(shots):
        few = copy.deepcopy(base)
        few.fewshot.k = max(shots)
        validate.validate(few, "eval")
        for target in targets:
            for k in shots:
                if k:
                    _check_references(base, target, roots[target], k)
    cells_of = [(target, k) for target in targets for k in shots]
    if not trained:  # nothing depends on the seed: one evaluation per target, no checkpoint
        logging.info("protocol: %s needs no training: evaluated once, with seed %d",
                     config.method, seeds[0])
        seeds = seeds[:1]
    out = pathlib.Path(workdir)
    lead = jax.process_index() == 0
    # Every finished cell is read (and checked) before anything runs.
    cells = {(seed, target, k): _read_rows(
        out / f"seed{seed}" / "cells" / f"{cell_name(target, k)}.json", roots[target])
        for seed in seeds for target, k in cells_of}
    for seed in seeds:
        run = out / f"seed{seed}"
        run_config = copy.deepcopy(base)
        run_config.train.seed = seed
        run_config.workdir = str(run)
        todo = [(t, k) for t, k in cells_of if cells[seed, t, k] is None]
        if trained and todo and not (run / TRAINED_FILE).is_file():
            train.train(run_config, str(run))
            if lead:
                write_atomic(run / TRAINED_FILE, json.dumps(
                    {"source": source, "train_root": roots[source], "seed": seed}) + "\n")
        for target, k in todo:
            eval_config = copy.deepcopy(run_config)
            eval_config.data.test_root = roots[target]
            eval_config.fewshot.k, eval_config.fewshot.seed = k, seed
            name = cell_name(target, k)
            rows = evaluate.evaluate(eval_config, str(run), out=str(run / "eval" / name))
            cells[seed, target, k] = rows
            if lead:
                ablate.write_cell(run / "cells" / f"{name}.json", ablate.Variant(name, {}),
                                  seed, roots[target], rows)
        for target, k in cells_of:
            if cells[seed, target, k] is not None and (target, k) not in todo:
                logging.info("protocol: kept the finished cell %s of seed %d",
                             cell_name(target, k), seed)

    label = {(t, k): t if not k else f"{t} {k}-shot" for t, k in cells_of}
    table = {label[t, k]: ablate.summarize(ablate.Variant(label[t, k], {}),
                                           {s: cells[s, t, k] for s in seeds})
             for t, k in cells_of}
    paper = paper_columns(table)
    if lead:
        for ext, text in ablate.render(paper, label="dataset").items():
            write_atomic(out / f"protocol.{ext}", text)
        for target, k in cells_of:
            per_class = {
                cls: ablate.summarize(ablate.Variant(cls, {}),
                                      {s: {cls: cells[s, target, k][cls]} for s in seeds})
                for cls in cells[seeds[0], target, k]
            }
            for ext, text in ablate.render(per_class, label="class").items():
                write_atomic(out / "classes" / f"{cell_name(target, k)}.{ext}", text)
        print(ablate.render(paper, label="dataset")["md"]
              + f"\nprotocol table: {out / 'protocol.md'} (source {source}, seeds {seeds}, "
              f"shots {shots})")
    return ablate.document(paper)
