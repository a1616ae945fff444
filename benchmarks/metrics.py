"""Speed of the vectorised pixel metrics against a straightforward per-threshold implementation.

One synthetic class: `--n-images` maps at `--size`^2 (default 100 x 518 x 518, the papers'
setting), ~30% anomalous images with several irregular GT regions each, deterministic seed.

Timed, in the same run:
* ours: `pixel_aupro(mode="reference")` + `pixel_auroc`;
* naive: the official evaluator's algorithm written out plainly, with the same per-threshold
  work (binarise the whole stack; per image `skimage.measure.label` + `regionprops` of the mask
  and a sum over each region's coordinates; normal-pixel mask and pooled FPR), plus sklearn
  `roc_auc_score` on the raveled pixels.

Prints one JSON line per measurement, then a summary line with both timings, their ratio and the
largest absolute difference between the values.

    python benchmarks/metrics.py                 # full size (the naive part takes minutes)
    python benchmarks/metrics.py --n-images 10   # quick
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from scipy import ndimage
from skimage import measure
from sklearn.metrics import auc, roc_auc_score

from genclip_jax.metrics import pixel_aupro, pixel_auroc


def make_class(n_images: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(maps (N, S, S) float32, masks (N, S, S) float32 {0, 1}); every third-ish image anomalous."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    maps = np.empty((n_images, size, size), np.float32)
    masks = np.zeros((n_images, size, size), np.float32)
    anomalous = rng.random(n_images) < 0.3
    anomalous[rng.integers(n_images)] = True  # at least one anomalous image
    for i in range(n_images):
        if anomalous[i]:
            for _ in range(rng.integers(2, 6)):  # 2-5 irregular blobs (some may touch)
                cy, cx = rng.uniform(0.1, 0.9, 2)
                ry, rx = rng.uniform(0.03, 0.1, 2)
                angle = rng.uniform(0, np.pi)
                dy, dx = yy - cy, xx - cx
                u = (dy * np.cos(angle) + dx * np.sin(angle)) / ry
                v = (-dy * np.sin(angle) + dx * np.cos(angle)) / rx
                wobble = 1 + 0.3 * np.sin(5 * np.arctan2(v, u) + rng.uniform(0, 6.3))
                masks[i][u * u + v * v < wobble**2] = 1.0
        smooth = ndimage.gaussian_filter(masks[i], size / 60)
        noise = ndimage.gaussian_filter(rng.standard_normal((size, size)).astype(np.float32), 2)
        maps[i] = 0.6 * smooth + 1.5 * noise + 0.2 * rng.random()
    return maps, masks


def naive_reference_aupro(masks, maps, max_step: int = 200, expect_fpr: float = 0.3) -> float:
    """The official evaluator's algorithm and per-threshold work, one threshold at a time.

    Per threshold: binarise the whole stack (two masked assignments), relabel every image's
    mask (`skimage.measure.label`) and sum the prediction over each region's `regionprops`
    coordinates, rebuild the normal-pixel mask and count the pooled false positives.
    """
    lo, hi = maps.min(), maps.max()
    delta = (hi - lo) / max_step
    pros, fprs = [], []
    binary = np.zeros_like(maps, dtype=bool)
    for th in np.arange(lo, hi, delta):
        binary[maps <= th] = False
        binary[maps > th] = True
        overlaps = []
        for pred, mask in zip(binary, masks, strict=True):
            for region in measure.regionprops(measure.label(mask)):
                rows, cols = region.coords[:, 0], region.coords[:, 1]
                overlaps.append(pred[rows, cols].sum() / region.area)
        normal = 1 - masks
        fprs.append(np.logical_and(normal, binary).sum() / normal.sum())
        pros.append(np.mean(overlaps))
    fprs, pros = np.array(fprs), np.array(pros)
    keep = fprs < expect_fpr
    fprs = fprs[keep]
    fprs = (fprs - fprs.min()) / (fprs.max() - fprs.min())
    return float(auc(fprs, pros[keep]))


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    value = fn(*args, **kwargs)
    return value, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-images", type=int, default=100)
    parser.add_argument("--size", type=int, default=518)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-naive", action="store_true", help="time only ours")
    args = parser.parse_args()

    maps, masks = make_class(args.n_images, args.size, args.seed)
    n_regions = sum(int(measure.label(m).max()) for m in masks)
    shape = {"n_images": args.n_images, "size": args.size, "n_regions": n_regions,
             "anomalous_images": int((masks.reshape(len(masks), -1).max(1) > 0).sum()),
             "anomalous_pixel_fraction": float(masks.mean())}
    print(json.dumps({"what": "data", **shape}), flush=True)

    ours = {}
    ours["pixel_aupro"], t_aupro = timed(pixel_aupro, maps, masks, mode="reference")
    ours["pixel_auroc"], t_auroc = timed(pixel_auroc, maps, masks)
    print(json.dumps({"what": "ours", "pixel_aupro_s": t_aupro, "pixel_auroc_s": t_auroc,
                      **ours}), flush=True)
    if args.skip_naive:
        return

    naive = {}
    naive["pixel_aupro"], n_aupro = timed(naive_reference_aupro, masks, maps)
    naive["pixel_auroc"], n_auroc = timed(roc_auc_score, masks.ravel(), maps.ravel())
    naive["pixel_auroc"] = float(naive["pixel_auroc"])
    print(json.dumps({"what": "naive", "pixel_aupro_s": n_aupro, "pixel_auroc_s": n_auroc,
                      **naive}), flush=True)

    ours_s, naive_s = t_aupro + t_auroc, n_aupro + n_auroc
    print(json.dumps({
        "what": "summary", **shape,
        "ours_s": round(ours_s, 3), "naive_s": round(naive_s, 3),
        "speedup": round(naive_s / ours_s, 1),
        "max_abs_diff": max(abs(ours[k] - naive[k]) for k in ours),
    }), flush=True)


if __name__ == "__main__":
    main()
