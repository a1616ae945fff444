"""Synthetic defects for training from normal images: exact masks, determinism by (seed, epoch,
index) across batch sizes and hosts, the config knobs, and a run that learns from normals only."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from PIL import Image

from genclip_jax import train
from genclip_jax.data import anomaly_synthesis, meta, pipeline
from genclip_jax.data.anomaly_synthesis import KINDS, AnomalySynthesizer
from tests.train_helpers import RecordingWriter, tiny_config

S = 96


def _photo(seed: int = 0, size: int = S) -> np.ndarray:
    """A textured uint8 image: random enough that a pasted patch differs from what it covers."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, size=(size // 8, size // 8, 3)).astype(np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC))
    return np.clip(smooth + rng.normal(0, 12, smooth.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("kind", KINDS)
def test_the_mask_is_exactly_the_changed_region(kind):
    pixels = _photo()
    synth = AnomalySynthesizer(seed=3, fraction=1.0, kinds=(kind,), weights=(1.0,))
    for index in range(6):
        out, mask, name = synth.apply(pixels, index, epoch=0)
        assert name == f"synthetic_{kind}" and out.dtype == np.uint8 and mask.dtype == bool
        changed = (out != pixels).any(-1)
        assert mask.any()
        assert not (changed & ~mask).any(), "a pixel outside the mask changed"
        # Every masked pixel was written: the few that kept their value did so by chance.
        assert changed[mask].mean() > 0.9, (kind, changed[mask].mean())
    assert np.array_equal(pixels, _photo()), "the input must not be modified in place"


def test_cutpaste_pastes_a_patch_of_the_same_image():
    pixels = _photo(1)
    synth = AnomalySynthesizer(seed=0, fraction=1.0, kinds=("cutpaste",), weights=(1.0,))
    out, mask, _ = synth.apply(pixels, 0, 0)
    # Colour-jittered pixels of the same image: their mean is near the image's, unlike a paint.
    assert abs(out[mask].mean() - pixels.mean()) < 60
    ys, xs = np.nonzero(mask)
    assert (ys.max() - ys.min()) < S and (xs.max() - xs.min()) < S


def test_same_seed_epoch_index_same_defect_and_each_changes_it():
    pixels = _photo()
    synth = AnomalySynthesizer(seed=0, fraction=1.0)
    a = synth.apply(pixels, 5, 2)
    b = synth.apply(pixels, 5, 2)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]
    for other in (synth.apply(pixels, 6, 2), synth.apply(pixels, 5, 3),
                  AnomalySynthesizer(seed=1, fraction=1.0).apply(pixels, 5, 2)):
        assert not np.array_equal(other[1], a[1])


def test_the_fraction_of_normal_samples_is_exact_and_defects_are_left_alone():
    labels = np.array([0] * 30 + [1] * 10)
    for fraction, expected in ((0.5, 15), (0.2, 6), (0.0, 0), (1.0, 30)):
        chosen = AnomalySynthesizer(seed=0, fraction=fraction).chosen(labels, epoch=0)
        assert chosen.sum() == expected and not chosen[labels == 1].any()
    synth = AnomalySynthesizer(seed=0, fraction=0.5)
    assert not np.array_equal(synth.chosen(labels, 0), synth.chosen(labels, 1))
    np.testing.assert_array_equal(synth.chosen(labels, 1), synth.chosen(labels, 1))


def test_kinds_follow_their_weights():
    pixels = _photo()
    only_spots = AnomalySynthesizer(seed=0, fraction=1.0, kinds=("cutpaste", "spot"),
                                    weights=(0.0, 1.0))
    assert {only_spots.apply(pixels, i, 0)[2] for i in range(8)} == {"synthetic_spot"}
    mixed = AnomalySynthesizer(seed=0, fraction=1.0, kinds=("cutpaste", "spot"),
                               weights=(3.0, 1.0))
    names = [mixed.apply(pixels, i, 0)[2] for i in range(200)]
    assert 0.65 < names.count("synthetic_cutpaste") / 200 < 0.85


def test_bad_kinds_and_weights_are_refused():
    with pytest.raises(ValueError, match=r"kinds: expected some of .*'paint'"):
        AnomalySynthesizer(seed=0, fraction=0.5, kinds=("paint",), weights=(1.0,))
    with pytest.raises(ValueError, match=r"weights: expected 2 non-negative numbers"):
        AnomalySynthesizer(seed=0, fraction=0.5, kinds=("spot", "crack"), weights=(1.0,))


def test_perlin_noise_is_smooth_and_seeded():
    a = anomaly_synthesis.perlin_noise(np.random.default_rng(0), 300, (4, 4))
    b = anomaly_synthesis.perlin_noise(np.random.default_rng(0), 300, (4, 4))
    assert a.shape == (300, 300) and np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)
    assert np.abs(np.diff(a, axis=0)).max() < 0.1  # neighbours agree: a smooth field


@pytest.fixture(scope="module")
def normal_root(tmp_path_factory):
    """A plain folder of 8 normal images of one class, with its meta.json (all in train)."""
    root = tmp_path_factory.mktemp("normal")
    (root / "part" / "good").mkdir(parents=True)
    for i in range(8):
        Image.fromarray(_photo(i, 64)).save(root / "part" / "good" / f"{i}.png")
    meta.make_meta("folder", str(root), test_fraction=0.0)
    return root


def _epoch(dataset, batch_size, process_count, synth, epoch=1):
    """{dataset index: (image, mask, label, has_mask, specie)} of one epoch over all hosts."""
    rows = {}
    for host in range(process_count):
        plan = pipeline.host_batch_indices(len(dataset), batch_size, shuffle=True, seed=4,
                                           epoch=epoch, process_index=host,
                                           process_count=process_count)
        for batch in pipeline.batches(
            dataset, plan, image_size=S, prefetch=0,
            synthesize=synth.for_epoch(dataset.labels, epoch),
        ):
            for r, i in enumerate(batch["index"]):
                if i >= 0:
                    rows[int(i)] = (batch["image"][r], batch["mask"][r], batch["label"][r],
                                    batch["has_mask"][r], batch["specie_name"][r])
    return rows


def test_the_same_sample_gets_the_same_defect_on_one_and_two_hosts_at_any_batch_size(
    normal_root,
):
    dataset = pipeline.Dataset.from_meta(normal_root, "train")
    synth = AnomalySynthesizer(seed=4, fraction=0.5)
    one = _epoch(dataset, 2, 1, synth)
    for batch_size, hosts in ((2, 2), (4, 2), (8, 1), (3, 1)):
        other = _epoch(dataset, batch_size, hosts, synth)
        assert other.keys() == one.keys() == set(range(8))
        for i in one:
            np.testing.assert_array_equal(other[i][0], one[i][0])
            np.testing.assert_array_equal(other[i][1], one[i][1])
            assert other[i][2:] == one[i][2:]
    labels = np.array([one[i][2] for i in range(8)])
    assert labels.sum() == 4  # half of the 8 normal images
    for i in range(8):
        image, mask, label, has_mask, specie = one[i]
        assert has_mask and (mask.any() == bool(label))
        assert specie.startswith("synthetic_") if label else specie == "good"
        plain = dataset.load(i, S)
        if label:  # outside its mask the image is the original one
            outside = ~mask.astype(bool)
            np.testing.assert_array_equal(image[outside], plain["image"][outside])
        else:
            np.testing.assert_array_equal(image, plain["image"])


def test_a_run_trains_from_normal_images_only_and_its_loss_decreases(normal_root, caplog):
    config = tiny_config(normal_root)
    config.model.image_size = 56
    config.data.train_split = "train"
    config.data.test_root = ""
    config.train.synthetic_anomalies = True
    config.train.cache_features = True  # turned off for this run, with one info line
    config.train.epochs = 6
    config.train.batch_size = 8
    config.train.lr = 0.01
    writer = RecordingWriter()
    with caplog.at_level(logging.INFO):
        train.train(config, str(normal_root.parent / "run_normal_only"), writer)
    assert "train.cache_features is off for this run" in caplog.text
    losses = [v for _, v in writer.scalars["epoch/loss"]]
    local = [v for _, v in writer.scalars["epoch/local_loss"]]
    assert len(losses) == 6 and all(np.isfinite(losses))
    assert min(local) > 0  # the synthetic defects give the pixel loss something to learn
    assert np.mean(losses[-2:]) < np.mean(losses[:2]), losses
