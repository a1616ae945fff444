"""Load a trained run and score images held as numpy arrays (e.g. frames from a camera):

    genclip-jax demo --config=configs/tiny.py --workdir=/tmp/genclip_demo
    python examples/predict_arrays.py /tmp/genclip_demo /tmp/genclip_demo/data/disc/test
"""

import pathlib
import sys

import numpy as np
from PIL import Image

import genclip_jax


def main(run: str, folder: str) -> genclip_jax.Prediction:
    model = genclip_jax.load(run)  # the run's latest checkpoint, read-only
    paths = sorted(pathlib.Path(folder).rglob("*.png"))[:4]
    images = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])  # any size
    result = model.predict(images)  # (N, S, S) maps and (N,) scores, S = the model's size
    for path, score in zip(paths, result.image_score, strict=True):
        print(f"{path.relative_to(folder)}: image score {score:.4f}")
    print("anomaly maps:", result.anomaly_map.shape)
    return result


if __name__ == "__main__":
    main(*sys.argv[1:3])
