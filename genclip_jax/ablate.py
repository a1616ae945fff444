"""GenCLIP ablations: train + evaluate config variants over seeds, one comparison table.

A sweep item is `part[+part...]` (`;` also separates parts); a part is a named variant from
`VARIANTS` or a `field=value` override of the run config (`genclip.fusion_w=0.3`). Parts apply
left to right. The named variants form the paper's ablation ladder (genclip spec section 0):

  gqp_only     GQP (+ N_p/A_p) with the class word, no MVP, no CNF, vision branch only
  mvp          + multi-layer vision prompts
  cnf          + class-name filtering (rule B)
  dual_branch  + the query-only branch at inference (fusion_w = 0.5)

Every (variant, seed) trains and evaluates in `<workdir>/<variant>/seed<k>` and leaves its result
there (`ablation_cell.json`), so a rerun only trains the cells it lacks. A variant of a method with
nothing to train (`method=winclip`: the training-free baseline row) is evaluated once, with the
first seed. After each run
`<workdir>/ablation.{md,csv,json}` are rewritten atomically: the rows of an earlier table that
this sweep does not touch, and every swept variant over all its finished seeds.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import io
import json
import math
import os
import pathlib
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
from absl import logging

from genclip_jax import config_overrides, metrics
from genclip_jax.files import write_atomic

VARIANTS: dict[str, dict[str, Any]] = {
    "gqp_only": {"method": "genclip", "genclip.use_mvp": False, "genclip.cnf.rule": "off",
                 "genclip.fusion_w": 1.0},
    "mvp": {"method": "genclip", "genclip.use_mvp": True, "genclip.cnf.rule": "off",
            "genclip.fusion_w": 1.0},
    "cnf": {"method": "genclip", "genclip.use_mvp": True, "genclip.cnf.rule": "B",
            "genclip.fusion_w": 1.0},
    "dual_branch": {"method": "genclip", "genclip.use_mvp": True, "genclip.cnf.rule": "B",
                    "genclip.fusion_w": 0.5},
}
CELL_FILE = "ablation_cell.json"
_CELL_KEYS = ("variant", "overrides", "seed", "test_root", "rows")
_ENTRY_KEYS = ("overrides", "seeds", "mean", "std")


@dataclasses.dataclass(frozen=True)
class Variant:
    """One sweep item: its directory name and the field overrides it applies, in order."""

    name: str
    overrides: dict[str, Any]


def split_sweep(text: str) -> list[str]:
    """'gqp_only,genclip.layers=[6,12]' -> items: commas inside brackets/parentheses stay."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += (ch in "([{") - (ch in ")]}")
        if ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    return [item.strip() for item in items if item.strip()]


def parse_item(item: str) -> Variant:
    """A sweep item -> Variant (field names are checked by `apply_overrides`)."""
    overrides: dict[str, Any] = {}
    parts = [p.strip() for p in re.split(r"[+;]", item)]
    if not item.strip() or not all(parts):
        raise ValueError(f"sweep item {item!r}: expected 'variant' or 'field=value' parts "
                         f"joined by '+' or ';' (variants: {sorted(VARIANTS)})")
    for part in parts:
        if part in VARIANTS:
            overrides.update(VARIANTS[part])
        elif "=" in part:
            field, _, value = part.partition("=")
            overrides[field.strip()] = value.strip()
        else:
            raise ValueError(f"sweep item {item!r}: {part!r} is neither a named variant "
                             f"{sorted(VARIANTS)} nor a 'field=value' override")
    name = item.strip() if item.strip() in VARIANTS else re.sub(r"[^\w.=-]+", "_", item.strip())
    return Variant(name, overrides)


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value) of the non-NaN values."""
    defined = [v for v in values if not math.isnan(v)]
    if not defined:
        return float("nan"), float("nan")
    mean = math.fsum(defined) / len(defined)
    if len(defined) == 1:
        return mean, 0.0
    return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in defined) / (len(defined) - 1))


def summarize(variant: Variant, runs: Mapping[int, Mapping[str, Mapping[str, float]]]) -> dict:
    """One variant's entry from {seed: {class: {metric}}}: the class mean of each seed, their
    mean and std over seeds, and each class's metrics averaged over seeds."""
    per_seed = {seed: metrics.class_mean(rows) for seed, rows in runs.items()}
    names = list(next(iter(per_seed.values())))
    over_seeds = {m: _mean_std([row[m] for row in per_seed.values()]) for m in names}
    return {
        "overrides": dict(variant.overrides),
        "seeds": list(runs),
        "mean": {m: mean for m, (mean, _) in over_seeds.items()},
        "std": {m: std for m, (_, std) in over_seeds.items()},
        "per_seed": {str(seed): row for seed, row in per_seed.items()},
        "classes": {
            c: {m: _mean_std([rows[c][m] for rows in runs.values()])[0] for m in names}
            for c in next(iter(runs.values()))
        },
    }


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def _cell(mean: float, std: float, n_seeds: int) -> str:
    if math.isnan(mean):
        return "nan"
    return f"{100 * mean:.1f}" + (f" ± {100 * std:.1f}" if n_seeds > 1 else "")


def document(table: Mapping[str, dict]) -> dict:
    """The JSON document: the union of the metric names, in first-seen order, and the table."""
    names = list(dict.fromkeys(m for entry in table.values() for m in entry["mean"]))
    return {"metrics": names, "variants": _json_safe(dict(table))}


def render(table: Mapping[str, dict], label: str = "variant") -> dict[str, str]:
    """{'md', 'csv', 'json'} texts of the comparison table, one row per entry (its first column
    headed `label`): Markdown x100, 1 decimal, ± std over seeds; CSV and JSON full precision."""
    doc = document(table)
    names = doc["metrics"]
    nan = float("nan")
    md = [f"| {label} | seeds | " + " | ".join(names) + " |",
          "|---|---|" + "---:|" * len(names)]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([label, "seeds", *names, *(f"{m}_std" for m in names)])
    for name, entry in table.items():
        seeds = entry["seeds"]
        mean = [entry["mean"].get(m, nan) for m in names]
        std = [entry["std"].get(m, nan) for m in names]
        cells = [_cell(a, b, len(seeds)) for a, b in zip(mean, std, strict=True)]
        md.append(f"| {name} | {','.join(map(str, seeds))} | " + " | ".join(cells) + " |")
        writer.writerow([name, " ".join(map(str, seeds)), *map(repr, mean), *map(repr, std)])
    return {"md": "\n".join(md) + "\n", "csv": buffer.getvalue(),
            "json": json.dumps(doc, indent=1, allow_nan=False) + "\n"}


def _null_to_nan(value: Any) -> Any:
    if value is None:
        return float("nan")
    if isinstance(value, dict):
        return {k: _null_to_nan(v) for k, v in value.items()}
    return value


def _load_json(path: pathlib.Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: expected JSON, got unreadable text ({err})") from None


def _keys(value: Any) -> str:
    return f"keys {sorted(value)}" if isinstance(value, dict) else type(value).__name__


def _comparable(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Overrides as runs compare them: text values parsed, so '[6, 12]' equals '[6,12]'."""
    parsed = {k: config_overrides.parse_value(v) if isinstance(v, str) else v
              for k, v in overrides.items()}
    return json.loads(json.dumps(parsed, default=repr))


def _override_changes(before: Mapping[str, Any], now: Mapping[str, Any]) -> str:
    """'' when equal, else 'field: before -> now' for each field that differs."""
    a, b = _comparable(before), _comparable(now)
    shown = lambda d, k: repr(d[k]) if k in d else "unset"
    return "; ".join(f"{k}: {shown(before, k)} -> {shown(now, k)}"
                     for k in dict.fromkeys([*a, *b]) if k not in a or k not in b or a[k] != b[k])


def write_cell(path: str | os.PathLike, variant: Variant, seed: int, test_root: str,
               rows: Mapping[str, Mapping[str, float]]) -> None:
    """Records one finished (variant, seed) run, so a rerun of the sweep keeps it."""
    cell = {"variant": variant.name, "overrides": dict(variant.overrides), "seed": seed,
            "test_root": test_root,
            "rows": {c: {m: float(v) for m, v in row.items()} for c, row in rows.items()}}
    write_atomic(path, json.dumps(_json_safe(cell), indent=1, allow_nan=False) + "\n")


def read_cell(path: str | os.PathLike) -> dict:
    """A cell written by `write_cell` (NaN for null); malformed raises ValueError naming it."""
    path = pathlib.Path(path)
    cell = _load_json(path)
    rows = cell.get("rows") if isinstance(cell, dict) else None
    if not (isinstance(cell, dict) and set(_CELL_KEYS) <= cell.keys()
            and isinstance(cell["overrides"], dict) and type(cell["seed"]) is int
            and isinstance(rows, dict) and rows
            and all(isinstance(row, dict) and all(v is None or type(v) in (int, float)
                                                  for v in row.values())
                    for row in rows.values())):
        raise ValueError(f"{path}: expected an ablation cell {{{', '.join(_CELL_KEYS)}}} with "
                         f"rows {{class: {{metric: number}}}}, got {_keys(cell)}")
    return {**cell, "rows": _null_to_nan(rows)}


def _finished_runs(out: pathlib.Path, variant: Variant, test_root: str) -> dict[int, dict]:
    """{seed: rows} of the variant's cells on disk; a cell of other settings raises."""
    runs = {}
    for path in sorted((out / variant.name).glob(f"seed*/{CELL_FILE}")):
        if not re.fullmatch(r"seed\d+", path.parent.name):
            continue
        cell = read_cell(path)
        if path.parent.name != f"seed{cell['seed']}":
            raise ValueError(f"{path}: expected seed {path.parent.name[4:]} (its folder), "
                             f"got seed {cell['seed']}")
        if changes := _override_changes(cell["overrides"], variant.overrides):
            raise ValueError(f"{path}: this run of {variant.name!r} has other overrides than the "
                             f"sweep now ({changes}); delete {path.parent} to retrain it or use "
                             "another workdir")
        if os.path.normpath(str(cell["test_root"])) != os.path.normpath(test_root):
            raise ValueError(f"{path}: this run was evaluated on test_root "
                             f"{cell['test_root']!r}, the sweep now on {test_root!r}; delete "
                             f"{path.parent} to retrain it or use another workdir")
        runs[cell["seed"]] = cell["rows"]
    return runs


def read_table(path: str | os.PathLike) -> dict[str, dict]:
    """The variants of an existing ablation.json in their order (NaN for null); {} if absent."""
    path = pathlib.Path(path)
    if not path.exists():
        return {}
    doc = _load_json(path)
    variants = doc.get("variants") if isinstance(doc, dict) else None
    if not isinstance(variants, dict):
        raise ValueError(f"{path}: expected an ablation table {{'metrics', 'variants'}}, "
                         f"got {_keys(doc)}")
    for name, entry in variants.items():
        if not (isinstance(entry, dict) and set(_ENTRY_KEYS) <= entry.keys()
                and isinstance(entry["overrides"], dict)):
            raise ValueError(f"{path}: variant {name!r}: expected an entry with "
                             f"{list(_ENTRY_KEYS)}, got {_keys(entry)}")
    numbers = ("mean", "std", "per_seed", "classes")
    return {name: {k: _null_to_nan(v) if k in numbers else v for k, v in entry.items()}
            for name, entry in variants.items()}


def run_ablation(
    config: ml_collections.ConfigDict,
    workdir: str,
    sweep: list[str],
    seeds: list[int] | None = None,
) -> dict:
    """Trains and evaluates every sweep item for every seed (default: `train.seed`).

    A (variant, seed) whose `ablation_cell.json` is in its run folder is kept, not retrained;
    variants of an earlier `ablation.json` that this sweep leaves out keep their rows. Cells or
    table entries with other overrides (or cells of another test root) raise ValueError before
    any training. Process 0 prints the final Markdown table and its path.

    Args:
      config: the base run config (`data.train_root` and `data.test_root` set).
      workdir: output folder; runs go to `<workdir>/<variant>/seed<k>`.
      sweep: items such as "mvp", "dual_branch+genclip.gqp_len=4", "genclip.fusion_w=0.3".
      seeds: training seeds (`train.seed`); the backbone is the same for all.

    Returns:
      The JSON document written to `<workdir>/ablation.json`:
      {"metrics": [...], "variants": {name: {"overrides", "seeds", "mean", "std", "per_seed",
      "classes"}}} (metric values in [0, 1], NaN as None).
    """
    from genclip_jax import evaluate, train_eval
    from genclip_jax.methods import needs_training

    if not sweep:
        raise ValueError("sweep: expected at least one variant, got none")
    if not config.data.test_root:
        raise ValueError("data.test_root: an ablation evaluates every run; set the test dataset")
    seeds = [int(config.train.seed)] if seeds is None else [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds: expected distinct training seeds, got {seeds}")
    variants = [parse_item(item) for item in sweep]
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise ValueError(f"sweep: variant names repeat: {names}")
    # Build every config before training anything: a bad field fails the sweep at once.
    configs = {v.name: config_overrides.apply_overrides(config, v.overrides) for v in variants}

    out = pathlib.Path(workdir)
    test_root = str(config.data.test_root)
    # Check everything on disk before training anything.
    table = read_table(out / "ablation.json")
    for variant in variants:
        if variant.name in table and (
                changes := _override_changes(table[variant.name]["overrides"], variant.overrides)):
            raise ValueError(f"{out / 'ablation.json'}: variant {variant.name!r} has other "
                             f"overrides there than in the sweep now ({changes})")
    finished = {v.name: _finished_runs(out, v, test_root) for v in variants}

    out.mkdir(parents=True, exist_ok=True)
    lead = jax.process_index() == 0

    def write_table() -> dict[str, str]:
        texts = render(table)
        if lead:
            for ext, text in texts.items():
                write_atomic(out / f"ablation.{ext}", text)
        return texts

    for variant in variants:
        runs = finished[variant.name]
        for seed in sorted(runs):
            logging.info("ablation: kept the finished run %s",
                         out / variant.name / f"seed{seed}" / CELL_FILE)
        # A training-free method (WinCLIP) is one evaluation: its seeds would repeat it.
        trained = needs_training(configs[variant.name].method)
        for seed in [s for s in (seeds if trained else seeds[:1]) if s not in runs]:
            run_dir = out / variant.name / f"seed{seed}"
            run_config = copy.deepcopy(configs[variant.name])
            run_config.train.seed = seed
            run_config.workdir = str(run_dir)
            run = train_eval.train_and_evaluate if trained else evaluate.evaluate
            runs[seed] = run(run_config, str(run_dir))
            if lead:
                write_cell(run_dir / CELL_FILE, variant, seed, test_root, runs[seed])
            table[variant.name] = summarize(variant, dict(sorted(runs.items())))
            write_table()
        table[variant.name] = summarize(variant, dict(sorted(runs.items())))
    texts = write_table()
    if lead:
        print(texts["md"] + f"\nablation table: {out / 'ablation.md'}")
    return document(table)
