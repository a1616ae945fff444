"""Where the vision forward's time goes: one traced forward, XLA ops grouped by what they do.

Traces one warm forward of the DPAM vision tower (random weights, as forward.py) with
`jax.profiler`, reads the XLA thunk events back with `jax.profiler.ProfileData` and classifies
every op of the optimised HLO by its source (qkv projection, attention core, MLP, LayerNorm)
and by what it holds (a matmul, only layout copies, or elementwise work and reductions).
Prints one JSON line per class (seconds, share, op count) and a total line; `--top` adds the
slowest single ops. Example:
  python benchmarks/profile_forward.py --image-size 518 --top 15
"""

from __future__ import annotations

import argparse
import collections
import json
import pathlib
import re
import tempfile

import jax
import jax.numpy as jnp

from genclip_jax.clip.model import ARCHITECTURES, CLIP, init_params

# Where an op comes from (its `op_name` metadata) and what it does (the instructions it holds).
PARTS = ("in_proj", "out_proj", "c_fc", "c_proj", "ln_1", "ln_2", "ln_pre", "ln_post", "conv1",
         "attn")
LAYOUT_ONLY = {"parameter", "bitcast", "copy", "transpose", "slice", "concatenate", "reshape",
               "broadcast", "constant", "tuple", "get-tuple-element"}


def _computations(hlo: str) -> dict[str, list[str]]:
    """Computation name -> its instruction lines, from an HLO module dump."""
    out, name = {}, None
    for line in hlo.splitlines():
        head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if head:
            name = head.group(1)
            out[name] = []
        elif line.startswith("}"):
            name = None
        elif name:
            out[name].append(line)
    return out


def _opcodes(line: str, comps: dict[str, list[str]]) -> set[str]:
    ops = set(re.findall(r"= \S+ ([\w\-]+)\(", line))
    for called in re.findall(r"calls=%?([\w.\-]+)", line):
        for inner in comps.get(called, ()):
            ops |= _opcodes(inner, comps)
    return ops


def classify_ops(hlo: str) -> dict[str, str]:
    """Instruction name -> "part: kind"; part from its source (`attn` = the attention core:
    scores, softmax, A V), kind = matmul (holds a dot or convolution), layout (copies,
    transposes, slices only) or elementwise (the rest: exp, reductions, adds). Loops and
    conditionals are left out: their bodies' ops are timed on their own."""
    comps = _computations(hlo)
    result = {}
    for lines in comps.values():
        for line in lines:
            m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = \S+ ([\w\-]+)\(", line)
            if not m or m.group(2) in ("while", "conditional", "call"):
                continue
            source = re.search(r'op_name="([^"]*)"', line)
            source = source.group(1) if source else ""
            part = next((p for p in PARTS if f"/{p}/" in source or source.endswith(f"/{p}")),
                        "other")
            ops = _opcodes(line, comps)
            kind = ("matmul" if ops & {"dot", "convolution"} else
                    "layout" if ops <= LAYOUT_ONLY else "elementwise")
            result[m.group(1)] = f"{part}: {kind}"
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="ViT-L/14@336px", choices=sorted(ARCHITECTURES))
    parser.add_argument("--image-size", type=int, default=518)
    parser.add_argument("--taps", default="6,12,18,24")
    parser.add_argument("--top", type=int, default=0, help="also print the N slowest ops")
    args = parser.parse_args()
    taps = tuple(int(t) for t in args.taps.split(","))
    config = ARCHITECTURES[args.arch].replace(dpam_start=6)
    params = init_params(config)
    model = CLIP(config)
    forward = jax.jit(lambda p, x: model.apply({"params": p}, x, taps, method=CLIP.encode_image))
    images = jax.random.normal(jax.random.PRNGKey(1), (1, args.image_size, args.image_size, 3))
    classes = classify_ops(forward.lower(params, images).compile().as_text())
    jax.block_until_ready(forward(params, images))
    with tempfile.TemporaryDirectory() as logdir:
        with jax.profiler.trace(logdir):
            jax.block_until_ready(forward(params, images))
        xplane = next(pathlib.Path(logdir).rglob("*.xplane.pb"))
        profile = jax.profiler.ProfileData.from_file(str(xplane))
        per_op = collections.Counter()
        for plane in profile.planes:
            for line in plane.lines:
                for event in line.events:
                    if event.name in classes:
                        per_op[event.name] += event.duration_ns / 1e9
    per_class, counts = collections.Counter(), collections.Counter()
    for name, seconds in per_op.items():
        per_class[classes[name]] += seconds
        counts[classes[name]] += 1
    total = sum(per_class.values())
    for cls, seconds in per_class.most_common():
        print(json.dumps({"class": cls, "seconds": round(seconds, 3),
                          "share": round(seconds / total, 3), "ops": counts[cls]}))
    print(json.dumps({"class": "total", "seconds": round(total, 3), "ops": len(per_op)}))
    for name, seconds in per_op.most_common(args.top):
        print(json.dumps({"op": name, "class": classes[name], "seconds": round(seconds, 4)}))


if __name__ == "__main__":
    jnp.zeros(())
    main()
