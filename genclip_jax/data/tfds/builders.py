"""TFDS builders for MVTec AD, VisA, MPDD and BTAD from the user's extracted download.

They yield exactly the meta.json route's samples (same generator, same order: shuffling is
disabled), and build and read without TensorFlow: ArrayRecord files, images stored as the
original file bytes (never re-encoded), masks as binary PNGs ('L', 0/255, the pipeline's mask
rule applied at build time; all-zero for normal samples). Read them with `data_source` below
(`as_dataset()` would need TensorFlow).

    builder = MvtecAd(data_dir=DATA_DIR)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=ROOT))
    dataset = pipeline.Dataset.from_tfds(data_source(builder, "test"))
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from genclip_jax.data import meta as meta_lib
from genclip_jax.data import pipeline

FILE_FORMAT = "array_record"


class _MetaBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Examples = the entries `meta.generate_meta(DATASET, manual_dir)` lists, in that order."""

    DATASET: str
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release: the meta.json route's samples."}  # noqa: RUF012

    def __init__(self, *, file_format: str = FILE_FORMAT, **kwargs):
        super().__init__(file_format=file_format, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(None, None, 3)),
                    "mask": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
                    "label": tfds.features.ClassLabel(names=["normal", "anomaly"]),
                    "cls_name": tfds.features.Text(),
                    "specie_name": tfds.features.Text(),
                    "img_path": tfds.features.Text(),
                }
            ),
            supervised_keys=("image", "label"),
            disable_shuffling=True,  # keep the meta.json order, so indices mean the same
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict:
        root = os.fspath(dl_manager.manual_dir)
        meta = meta_lib.generate_meta(self.DATASET, root)
        meta_lib.validate_meta(meta, source=f"{self.DATASET} layout", root=root, check_files=True)
        splits = {split: meta_lib.split_entries(meta, split) for split in meta_lib.SPLITS}
        return {
            split: self._generate_examples(root, entries)
            for split, entries in splits.items()
            if entries
        }

    def _generate_examples(self, root: str, entries: Sequence[dict]) -> Iterator[tuple[str, dict]]:
        dataset = pipeline.Dataset.from_entries(root, entries)
        for i, entry in enumerate(entries):
            raw = dataset.read(i)
            mask = (
                np.zeros((raw.image.height, raw.image.width), bool)
                if raw.mask is None
                else raw.mask
            )
            yield (
                entry["img_path"],
                {
                    "image": os.path.join(root, entry["img_path"]),
                    "mask": Image.fromarray(mask.astype(np.uint8) * 255),
                    "label": entry["anomaly"],
                    "cls_name": entry["cls_name"],
                    "specie_name": entry["specie_name"],
                    "img_path": entry["img_path"],
                },
            )


class MvtecAd(_MetaBuilder):
    """MVTec AD (https://www.mvtec.com/company/research/datasets/mvtec-ad)."""

    DATASET = "mvtec"
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Download and extract mvtec_anomaly_detection.tar.xz; manual_dir is the folder that holds "
        "bottle/, cable/, ... (each with train/, test/, ground_truth/)."
    )


class Visa(_MetaBuilder):
    """VisA (https://github.com/amazon-science/spot-diff), 1cls split."""

    DATASET = "visa"
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Download VisA_20220922.tar and prepare it with the spot-diff 1cls split script; "
        "manual_dir holds split_csv/1cls.csv and the class folders it lists."
    )


class Mpdd(_MetaBuilder):
    """MPDD (https://github.com/stepanje/MPDD)."""

    DATASET = "mpdd"
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Download and extract MPDD; manual_dir holds bracket_black/, ... in the MVTec layout."
    )


class Btad(_MetaBuilder):
    """BTAD (beanTech, http://avires.dimi.uniud.it/papers/btad/btad.zip)."""

    DATASET = "btad"
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Download and extract btad.zip; manual_dir holds 01/, 02/, 03/ (train/ok, test/ok, "
        "test/ko, ground_truth/ko)."
    )


def data_source(builder: tfds.core.DatasetBuilder, split: str) -> Sequence[dict]:
    """Random-access examples of a prepared builder, images and masks left as encoded bytes so
    `pipeline.Dataset.from_tfds` decodes them with PIL exactly like the meta.json route."""
    skip = tfds.decode.SkipDecoding()
    return builder.as_data_source(split=split, decoders={"image": skip, "mask": skip})
