"""GenCLIP ablations: train + evaluate config variants over seeds, one comparison table.

A sweep item is `part[+part...]` (`;` also separates parts); a part is a named variant from
`VARIANTS` or a `field=value` override of the run config (`genclip.fusion_w=0.3`). Parts apply
left to right. The named variants form the paper's ablation ladder (genclip spec section 0):

  gqp_only     GQP (+ N_p/A_p) with the class word, no MVP, no CNF, vision branch only
  mvp          + multi-layer vision prompts
  cnf          + class-name filtering (rule B)
  dual_branch  + the query-only branch at inference (fusion_w = 0.5)

Every (variant, seed) trains and evaluates in `<workdir>/<variant>/seed<k>`; after each run
`<workdir>/ablation.{md,csv,json}` are rewritten atomically with what has finished so far.
"""

from __future__ import annotations

import ast
import copy
import csv
import dataclasses
import io
import json
import math
import pathlib
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections

from genclip_jax import metrics
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
# Fields the methods read with `cfg.get(name, default)`: an override may add them to configs
# that predate them (older saved configs).
_BOOLS = {"true": True, "false": False}


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


def _parse_value(text: str) -> Any:
    """A Python literal (numbers, lists, True/False/None, quoted strings), else the text."""
    if text.lower() in _BOOLS:
        return _BOOLS[text.lower()]
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


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


def apply_overrides(
    config: ml_collections.ConfigDict, overrides: Mapping[str, Any]
) -> ml_collections.ConfigDict:
    """A copy of `config` with dotted-path overrides; values given as text are parsed (kept as
    text for string fields). Unknown fields or wrong types raise ValueError naming the field."""
    config = copy.deepcopy(config)
    for field, value in overrides.items():
        *parents, leaf = field.split(".")
        node = config
        for depth, key in enumerate(parents):
            if not isinstance(node, ml_collections.ConfigDict) or key not in node:
                raise ValueError(f"unknown config field {field!r}: "
                                 f"{'.'.join(parents[: depth + 1])!r} does not exist")
            node = node[key]
        if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
            raise ValueError(f"unknown config field {field!r}")
        current = node[leaf]
        if isinstance(value, str) and not isinstance(current, str):
            value = _parse_value(value)
        try:
            node[leaf] = value
        except TypeError as err:
            raise ValueError(f"config field {field!r}: expected a value of type "
                             f"{type(current).__name__}, got {value!r} ({err})") from None
    return config


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


def render(table: Mapping[str, dict]) -> dict[str, str]:
    """{'md', 'csv', 'json'} texts of the comparison table (Markdown x100, 1 decimal, ± std over
    seeds; CSV and JSON full precision)."""
    doc = document(table)
    names = doc["metrics"]
    nan = float("nan")
    md = ["| variant | seeds | " + " | ".join(names) + " |",
          "|---|---|" + "---:|" * len(names)]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["variant", "seeds", *names, *(f"{m}_std" for m in names)])
    for name, entry in table.items():
        seeds = entry["seeds"]
        mean = [entry["mean"].get(m, nan) for m in names]
        std = [entry["std"].get(m, nan) for m in names]
        cells = [_cell(a, b, len(seeds)) for a, b in zip(mean, std, strict=True)]
        md.append(f"| {name} | {','.join(map(str, seeds))} | " + " | ".join(cells) + " |")
        writer.writerow([name, " ".join(map(str, seeds)), *map(repr, mean), *map(repr, std)])
    return {"md": "\n".join(md) + "\n", "csv": buffer.getvalue(),
            "json": json.dumps(doc, indent=1, allow_nan=False) + "\n"}


def run_ablation(
    config: ml_collections.ConfigDict,
    workdir: str,
    sweep: list[str],
    seeds: list[int] | None = None,
) -> dict:
    """Trains and evaluates every sweep item for every seed (default: `train.seed`).

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
    from genclip_jax import train

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
    configs = {v.name: apply_overrides(config, v.overrides) for v in variants}

    out = pathlib.Path(workdir)
    out.mkdir(parents=True, exist_ok=True)
    table: dict[str, dict] = {}
    for variant in variants:
        runs: dict[int, dict] = {}
        for seed in seeds:
            run_config = copy.deepcopy(configs[variant.name])
            run_config.train.seed = seed
            run_dir = out / variant.name / f"seed{seed}"
            run_config.workdir = str(run_dir)
            runs[seed] = train.train_and_evaluate(run_config, str(run_dir))
            table[variant.name] = summarize(variant, runs)
            if jax.process_index() == 0:
                for ext, text in render(table).items():
                    write_atomic(out / f"ablation.{ext}", text)
    return document(table)
