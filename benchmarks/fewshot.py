"""Cost of few-shot inference: images/s zero-shot vs k-shot, and the bank's size and FLOPs.

Measures the jitted inference of one batch (`evaluate.Model.infer`: the vision forward, the
method's maps and, for k > 0, the nearest-neighbour search against the class's bank fused in)
on the tiny backbone by default, after a warm-up that compiles and builds the bank. Besides the
measured rows, one analytic row per k gives the bank size and the search's matmul FLOPs per
image at a real shape (ViT-L/14@336 run at 518: 1369 patches, 768-d tokens, 4 layers) against
the DPAM forward's (`benchmarks/forward.py`), so the overhead of k = 64 on a GPU is known
without running it. One JSON line per row:

    python benchmarks/fewshot.py --shots 0,4 [--method anomalyclip] [--batch-size 8] [--reps 20]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import tempfile
import time

import jax
import numpy as np
from forward import forward_flops

from genclip_jax import defaults, evaluate, parallel
from genclip_jax.clip.model import ARCHITECTURES, CLIPConfig
from genclip_jax.data import synthetic
from genclip_jax.methods import create_method


def search_flops(k: int, patches: int, dim: int, layers: int) -> float:
    """Matmul FLOPs per image of the bank search: every patch against k * patches rows."""
    return 2.0 * patches * k * patches * dim * layers


def prepared(method_name: str, k: int, batch_size: int, root: pathlib.Path):
    """A compiled `infer` of one batch (bank built), as a no-argument callable."""
    config = defaults.tiny_config(method_name)
    config.eval.batch_size = batch_size
    config.fewshot.k, config.fewshot.reference = k, str(root)
    method = create_method(config, CLIPConfig(**config.model.random_arch.to_dict()))
    model = evaluate.load_model(config, "", params=method.init(jax.random.PRNGKey(0)))
    size = config.model.image_size
    images = np.random.default_rng(0).normal(size=(batch_size, size, size, 3)).astype(np.float32)
    host = {"image": images, "valid": np.ones(batch_size, bool),
            "cls_name": np.array(["disc"] * batch_size, object)}
    host.update(method.host_inputs(host))
    batch = parallel.global_batch(host, model.mesh)
    images = batch.pop("image")
    run = lambda: jax.block_until_ready(model.infer(images, batch, "disc"))
    run()  # compile, build the bank
    return run, size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shots", default="0,4")
    parser.add_argument("--method", default="anomalyclip", choices=("anomalyclip", "genclip"))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args()
    shots = [int(k) for k in args.shots.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        root = synthetic.write_synthetic_dataset(pathlib.Path(tmp) / "refs", image_size=112,
                                                 classes=("disc",), n_train_good=max(shots),
                                                 n_test_good=1, n_test_defect_per_type=1).parent
        runs = {k: prepared(args.method, k, args.batch_size, root) for k in shots}
    best = dict.fromkeys(shots, np.inf)
    for _ in range(args.reps):  # interleaved: a load change on a shared machine hits every k
        for k, (run, _) in runs.items():
            start = time.perf_counter()
            run()
            best[k] = min(best[k], time.perf_counter() - start)
    for k in shots:
        row = {"benchmark": "fewshot", "method": args.method, "k": k,
               "batch_size": args.batch_size, "backbone": "tiny", "image_size": runs[k][1],
               "images_per_s": round(args.batch_size / best[k], 2),
               "platform": jax.devices()[0].platform}
        if 0 in best:
            row["relative_to_zero_shot"] = round(best[0] / best[k], 3)
        print(json.dumps(row), flush=True)
    # Analytic: ViT-L/14@336 at 518, taps 6/12/18/24 (AnomalyCLIP's default).
    arch = ARCHITECTURES["ViT-L/14@336px"].replace(dpam_start=6)
    patches, dim, layers = (518 // arch.vision_patch_size) ** 2, arch.embed_dim, 4
    forward = forward_flops(arch, 518, layers)
    for k in (1, 4, 16, 64):
        flops = search_flops(k, patches, dim, layers)
        print(json.dumps({
            "benchmark": "fewshot_analytic", "backbone": "ViT-L/14@336px", "image_size": 518,
            "k": k, "bank_bytes_fp32": k * patches * dim * layers * 4,
            "search_gflops_per_image": round(flops / 1e9, 1),
            "forward_gflops_per_image": round(forward / 1e9, 1),
            "search_over_forward": round(flops / forward, 3)}), flush=True)


if __name__ == "__main__":
    main()
