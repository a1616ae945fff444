"""Our vision forward against the official PyTorch one, interleaved on the same machine.

Runs forward_torch.py (with `--torch-python`, a Python that has torch) and forward.py (fp32) in
alternating subprocesses, `--rounds` times each, so that both see the same load on a shared
machine; keeps the fastest step of each and prints every run's JSON line, then one summary line:
  python benchmarks/forward_vs_torch.py --torch-python /tmp/torchvenv/bin/python --rounds 3
`speedup` = torch step / ours (> 1: we are faster); `load` is the 1-minute load average before
and after, `cpu` the model name from /proc/cpuinfo.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent


def cpu_name() -> str:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def run(command: list[str]) -> dict:
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    line = json.loads(out.strip().splitlines()[-1])
    print(json.dumps(line), flush=True)
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--torch-python", required=True, help="a Python with torch installed")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2, help="timed forwards per run")
    parser.add_argument("--image-size", type=int, default=518)
    parser.add_argument("--taps", default="6,12,18,24")
    args = parser.parse_args()
    common = ["--image-size", str(args.image_size), "--taps", args.taps, "--batch-sizes", "1",
              "--repeats", str(args.repeats)]
    commands = {
        "torch": [args.torch_python, str(HERE / "forward_torch.py"), *common],
        "jax": [sys.executable, str(HERE / "forward.py"), "--dtypes", "float32", *common],
    }
    load_before = os.getloadavg()[0]
    best = {"torch": float("inf"), "jax": float("inf")}
    for r in range(args.rounds):
        order = ("torch", "jax") if r % 2 == 0 else ("jax", "torch")
        for name in order:
            best[name] = min(best[name], run(commands[name])["step_min_s"])
    print(json.dumps({
        "benchmark": "vision_forward_vs_torch", "cpu": cpu_name(), "cores": os.cpu_count(),
        "image_size": args.image_size, "batch": 1, "taps": [int(t) for t in args.taps.split(",")],
        "rounds": args.rounds, "repeats": args.repeats, "torch_step_s": best["torch"],
        "jax_step_s": best["jax"], "speedup": round(best["torch"] / best["jax"], 3),
        "load": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }), flush=True)


if __name__ == "__main__":
    main()
