"""Input pipeline: exact PIL transforms, image modes, bad inputs, batching, sharding, prefetch."""

import threading

import jax
import numpy as np
import pytest
from make_torch_goldens import PIPELINE_SIZE, reference
from PIL import Image

from genclip_jax.clip import preprocess
from genclip_jax.data import pipeline, synthetic

model_input = jax.jit(preprocess.model_input)  # what the vision tower does to a batch's images

S = 32  # output size used in these tests


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    synthetic.write_synthetic_dataset(
        root,
        classes=("disc", "stripes"),
        defects=("spot", "crack"),
        image_size=48,
        n_train_good=1,
        n_test_good=2,
        n_test_defect_per_type=1,
    )  # 2 classes x 4 test images
    return root


def test_load_matches_reference_transform_exactly(tmp_path):
    """specs §1 as PIL + torch's ToTensor/Normalize computed it (tests/make_torch_goldens.py)
    for a non-square image and its mask, through `Dataset.load` and the on-device
    normalisation: bit-identical."""
    ref = reference()
    Image.fromarray(ref["pipeline.image"]).save(tmp_path / "img.png")
    Image.fromarray(ref["pipeline.mask"].astype(np.uint8) * 255).save(tmp_path / "mask.png")
    entries = [dict(img_path=path, mask_path=mask, cls_name="c", specie_name=kind,
                    anomaly=int(bool(mask)))
               for path, mask, kind in (("img.png", "", "good"), ("img.png", "mask.png", "x"))]
    dataset = pipeline.Dataset.from_entries(tmp_path, entries)
    size = PIPELINE_SIZE
    assert 0 < ref["pipeline.ref_mask"].sum() < size * size  # the mask survives the resize
    for i, want_mask in ((0, np.zeros((size, size), np.float32)), (1, ref["pipeline.ref_mask"])):
        sample = dataset.load(i, size)
        assert sample["image"].dtype == np.uint8 and sample["image"].shape == (size, size, 3)
        assert sample["mask"].dtype == bool
        np.testing.assert_array_equal(model_input(sample["image"][None])[0],
                                      ref["pipeline.ref_image"])
        np.testing.assert_array_equal(sample["mask"], want_mask)


def _save(tmp_path, name, image):
    path = tmp_path / name
    image.save(path)
    return path


def test_image_modes(tmp_path):
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (20, 30), dtype=np.uint8)
    rgb = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    opaque = np.full((20, 30), 255, np.uint8)

    def load(image, name):
        return pipeline.image_transform(pipeline.read_image(_save(tmp_path, name, image)), S)

    from_rgb = load(Image.fromarray(rgb), "rgb.png")
    from_l = load(Image.fromarray(gray), "l.png")
    # Gray is replicated to 3 channels: same as giving the RGB image with equal channels.
    np.testing.assert_array_equal(from_l, load(Image.fromarray(np.stack([gray] * 3, -1)), "l3.png"))
    np.testing.assert_array_equal(
        load(Image.fromarray(np.dstack([gray, opaque]), "LA"), "la.png"), from_l
    )
    np.testing.assert_array_equal(
        load(Image.fromarray(np.dstack([rgb, opaque]), "RGBA"), "rgba.png"), from_rgb
    )
    # 16-bit: scaled to 8 bits (v * 257 -> v) instead of the reference's clip to white.
    wide = Image.fromarray(gray.astype(np.uint16) * 257)
    assert pipeline.read_image(_save(tmp_path, "i16.png", wide)).mode == "I;16"
    np.testing.assert_array_equal(load(wide, "i16.png"), from_l)
    # Palette: PIL resizes 'P' with NEAREST before conversion, as the reference does.
    palette = Image.fromarray(rgb).quantize(16)
    expected = np.asarray(palette.convert("RGB").resize((S, S), Image.NEAREST), np.float32) / 255
    np.testing.assert_allclose(
        load(palette, "p.png"), (expected - preprocess.CLIP_MEAN) / preprocess.CLIP_STD,
        atol=1e-6
    )



def test_non_8bit_images_are_mapped_by_their_range(tmp_path):
    gray = np.random.default_rng(1).integers(0, 256, (20, 30), dtype=np.uint8)
    gray[0, :2] = (0, 255)
    from_l = pipeline.image_transform(Image.fromarray(gray), S)
    as_float = gray.astype(np.float32)
    for name, image in {
        "unit.tif": Image.fromarray(as_float / 255),  # PIL alone would make this black
        "byte.tif": Image.fromarray(as_float),
        "word.tif": Image.fromarray(as_float * 257),
        "int32.tif": Image.fromarray(gray.astype(np.int32) * 257),
    }.items():
        read = pipeline.read_image(_save(tmp_path, name, image))
        assert read.mode == ("I" if name == "int32.tif" else "F")
        np.testing.assert_array_equal(np.asarray(pipeline.to_8bit(read, name)), gray, name)
        np.testing.assert_array_equal(pipeline.image_transform(read, S), from_l, name)
    # 16-bit PNG: rounded x / 257, so 257 * k -> k and 65535 -> 255.
    wide = np.array([[0, 128, 129, 257, 514, 257 * 200, 65535]], np.uint16)
    read = pipeline.read_image(_save(tmp_path, "wide.png", Image.fromarray(wide)))
    assert read.mode == "I;16"
    assert np.asarray(pipeline.to_8bit(read, "wide.png")).tolist() == [[0, 0, 1, 1, 2, 200, 255]]
    int32 = Image.fromarray(np.array([[0, 257, 65535]], np.int32))
    assert np.asarray(pipeline.to_8bit(int32, "i")).tolist() == [[0, 1, 255]]
    assert pipeline.to_8bit(Image.fromarray(gray), "l").mode == "L"  # 8-bit: untouched


def _folder_dataset(folder, images):
    """A predict-style dataset: every file of `images` {name: PIL image} saved under `folder`."""
    folder.mkdir()
    for name, image in images.items():
        image.save(folder / name)
    entries, skipped = pipeline.scan_image_folder(folder)
    assert not skipped  # bad pixel values still have a readable header
    return pipeline.Dataset.from_entries(folder, entries)


def test_unmappable_pixel_ranges_raise_naming_the_file(tmp_path):
    bad = np.linspace(0, 1, 24, dtype=np.float32).reshape(4, 6)
    with_inf, with_nan = bad.copy(), bad.copy()
    with_inf[0, :2] = (np.inf, -np.inf)
    with_nan[1:3, 1] = np.nan
    errors = {
        "inf.tif": (with_inf, r"inf\.tif: float image has 2 non-finite \(NaN or inf\) pixel"),
        "nan.tif": (with_nan, r"nan\.tif: float image has 2 non-finite"),
        "negative.tif": (
            bad - 0.5,
            r"negative\.tif: float image has values in \[-0\.5, 0\.5\]; expected them all in "
            r"\[0, 1\], \[0, 255\] or \[0, 65535\]",
        ),
        "huge.tif": (bad * 70000, r"huge\.tif: float image has values in \[0, 70000\]"),
        "int32.tif": (
            np.array([[-1, 0], [70000, 3]], np.int32),
            r"int32\.tif: 32-bit integer image has values in \[-1, 70000\]; expected \[0, 65535\]",
        ),
    }
    dataset = _folder_dataset(
        tmp_path / "bad", {name: Image.fromarray(values) for name, (values, _) in errors.items()}
    )
    for i in range(len(dataset)):
        path = dataset.read(i, with_image=False).img_path
        with pytest.raises(ValueError, match=errors[path][1]):
            dataset.load(i, S)
    with pytest.raises(ValueError, match=r"^image: float image has 2 non-finite"):
        pipeline.image_transform(Image.fromarray(with_nan), S)  # no file name given
    with pytest.raises(ValueError, match=r"^n\.tif: float image has 2 non-finite"):
        pipeline.image_transform(Image.fromarray(with_nan), S, name="n.tif")


def test_skip_unreadable_turns_a_nan_image_into_an_invalid_row(tmp_path):
    nan = np.zeros((8, 8), np.float32)
    nan[3, 3] = np.nan
    good = Image.new("RGB", (8, 8), (10, 20, 30))
    dataset = _folder_dataset(tmp_path / "imgs", {"a.png": good, "b.tif": Image.fromarray(nan)})
    kwargs = dict(image_size=S, prefetch=0)
    (batch,) = pipeline.batches(dataset, _plan(dataset, 2), skip_unreadable=True, **kwargs)
    assert batch["valid"].tolist() == [True, False] and batch["index"].tolist() == [0, 1]
    assert batch["img_path"].tolist() == ["a.png", ""] and not batch["image"][1].any()
    np.testing.assert_array_equal(model_input(batch["image"])[0], pipeline.image_transform(good, S))
    with pytest.raises(ValueError, match=r"b\.tif: float image has 1 non-finite"):
        list(pipeline.batches(dataset, _plan(dataset, 2), **kwargs))

def _plan(dataset, batch_size, **order):
    """The batches' dataset indices on this (single) host."""
    return pipeline.host_batch_indices(len(dataset), batch_size, **order)


def test_mask_rule(tmp_path):
    values = np.array([[0, 1, 128, 255]] * 4, np.uint8).repeat(4, 1)  # 4x16, non-binary
    expected = values > 0
    np.testing.assert_array_equal(pipeline.mask_array(Image.fromarray(values), "m"), expected)
    grey_rgb = Image.fromarray(np.stack([values] * 3, -1))
    np.testing.assert_array_equal(pipeline.mask_array(grey_rgb, "m"), expected)
    np.testing.assert_array_equal(
        pipeline.mask_array(Image.fromarray(values.astype(np.uint16)), "m"), expected
    )
    # Float masks are compared raw: 'L' would round 0.3 to 0 (normal); NaN is an error.
    floats = Image.fromarray(np.array([[0.0, 0.3, 1.0, 7.5, -1.0]], np.float32))
    assert pipeline.mask_array(floats, "f").tolist() == [[False, True, True, True, False]]
    with pytest.raises(ValueError, match=r"f\.tif: float mask has 1 NaN pixel"):
        pipeline.mask_array(Image.fromarray(np.array([[0.0, np.nan]], np.float32)), "f.tif")
    colour = np.zeros((4, 16, 3), np.uint8)
    colour[0, 0] = (255, 0, 0)
    with pytest.raises(ValueError, match=r"red\.png: mask is a colour image"):
        pipeline.mask_array(Image.fromarray(colour), "red.png")
    # A thin mask that downsampling blurs below 0.5 vanishes, one that stays >= 128 survives.
    thin = np.zeros((64, 64), bool)
    thin[:, 10] = True
    thin[20:40, 30:50] = True
    out = pipeline.mask_transform(thin, 16)
    assert set(np.unique(out)) == {0.0, 1.0}
    assert out[:, 2].sum() == 0 and out[6:9, 8:12].all()


def _tree(tmp_path, image, mask=None):
    """A one-class meta.json dataset holding `image` (and its defect `mask`)."""
    (tmp_path / "c/test/bad").mkdir(parents=True)
    image.save(tmp_path / "c/test/bad/0.png")
    entry = {
        "img_path": "c/test/bad/0.png",
        "mask_path": "",
        "cls_name": "c",
        "specie_name": "bad",
        "anomaly": 1,
    }
    if mask is not None:
        (tmp_path / "c/ground_truth/bad").mkdir(parents=True)
        mask.save(tmp_path / "c/ground_truth/bad/0_mask.png")
        entry["mask_path"] = "c/ground_truth/bad/0_mask.png"
    return pipeline.Dataset.from_entries(tmp_path, [entry])


def test_bad_inputs(tmp_path):
    rgb = Image.new("RGB", (20, 10), (9, 9, 9))
    with pytest.raises(
        ValueError,
        match=r"0_mask\.png: mask size 10x20 \(WxH\) differs from its "
        r"image c/test/bad/0\.png size 20x10",
    ):
        _tree(tmp_path / "size", rgb, Image.new("L", (10, 20))).load(0, S)
    dataset = _tree(tmp_path / "missing", rgb)
    (tmp_path / "missing/c/test/bad/0.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"c/test/bad/0\.png not found"):
        dataset.load(0, S)
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"definitely not a png")
    with pytest.raises(ValueError, match=r"garbage\.png: cannot decode image"):
        pipeline.read_image(garbage)
    good = _save(
        tmp_path,
        "full.png",
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)),
    )
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:-2000])
    with pytest.raises(ValueError, match=r"truncated\.png: cannot decode image"):
        pipeline.read_image(truncated)
    with pytest.raises(IndexError):
        dataset.read(1)


def test_scan_image_folder(tmp_path):
    Image.new("RGB", (12, 8), (1, 2, 3)).save(tmp_path / "b.png")
    (tmp_path / "sub").mkdir()
    Image.new("L", (8, 8), 7).save(tmp_path / "sub" / "a.jpg")
    (tmp_path / "notes.txt").write_text("hello")
    good = tmp_path / "c.png"
    Image.new("RGB", (64, 64), (5, 5, 5)).save(good)
    (tmp_path / "cut.png").write_bytes(good.read_bytes()[:40])
    entries, skipped = pipeline.scan_image_folder(tmp_path)
    assert skipped == ["cut.png", "notes.txt"]
    with pytest.warns(UserWarning, match=r"skipped 2 file\(s\).*\['cut\.png', 'notes\.txt'\]"):
        pipeline.warn_skipped(tmp_path, skipped)
    dataset = pipeline.Dataset.from_entries(tmp_path, entries)
    assert len(dataset) == 3
    assert [dataset.read(i).img_path for i in range(3)] == ["b.png", "c.png", "sub/a.jpg"]
    sample = dataset.load(2, S)
    assert sample["label"] == -1 and sample["mask"].sum() == 0
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="at least one readable image"):
        pipeline.scan_image_folder(tmp_path / "empty")


def test_batches_padding_and_keys(root):
    dataset = pipeline.Dataset.from_meta(root)  # 8 samples
    out = list(pipeline.batches(dataset, _plan(dataset, 3), image_size=S))
    assert len(out) == pipeline.num_batches(8, 3) == 3
    last = out[-1]
    assert last["valid"].tolist() == [True, True, False]
    assert last["index"].tolist() == [6, 7, -1]
    assert last["has_mask"].tolist() == [True, True, False]  # padding has no pixel labels
    assert not last["image"][2].any() and last["img_path"][2] == ""
    assert {k: (v.dtype, v.shape) for k, v in out[0].items()} == {
        "image": (np.uint8, (3, S, S, 3)),
        "mask": (np.bool_, (3, S, S)),
        "label": (np.int32, (3,)),
        "has_mask": (np.bool_, (3,)),
        "valid": (np.bool_, (3,)),
        "index": (np.int32, (3,)),
        "cls_name": (object, (3,)),
        "specie_name": (object, (3,)),
        "img_path": (object, (3,)),
    }
    np.testing.assert_array_equal(out[1]["image"][0], dataset.load(3, S)["image"])
    assert out[1]["label"][0] == dataset.read(3).label


def test_device_normalised_batches_are_the_host_transform_bit_for_bit(root):
    """What the model sees of a batch (uint8 pixels, normalised on device) is `image_transform`
    of each file: same float32 bits."""
    dataset = pipeline.Dataset.from_meta(root)
    for batch in pipeline.batches(dataset, _plan(dataset, 4), image_size=S):
        want = np.stack([pipeline.image_transform(dataset.read(int(i)).image, S)
                         for i in batch["index"]])
        got = np.asarray(model_input(batch["image"]))
        np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


def test_shuffle_is_deterministic_per_seed_and_epoch():
    plan = pipeline.host_batch_indices(10, 4, shuffle=True, seed=3, epoch=1)
    again = pipeline.host_batch_indices(10, 4, shuffle=True, seed=3, epoch=1)
    np.testing.assert_array_equal(plan, again)
    assert sorted(plan[plan >= 0].tolist()) == list(range(10)) and (plan < 0).sum() == 2
    other = pipeline.host_batch_indices(10, 4, shuffle=True, seed=3, epoch=2)
    assert not np.array_equal(plan, other)
    in_order = pipeline.host_batch_indices(10, 4)
    assert in_order.ravel().tolist() == [*range(10), -1, -1]


@pytest.mark.parametrize("hosts", [2, 4])
def test_host_shards_union_is_the_global_batch(hosts):
    single = pipeline.host_batch_indices(11, 8, shuffle=True, seed=5, epoch=7)
    shards = [
        pipeline.host_batch_indices(
            11, 8, shuffle=True, seed=5, epoch=7, process_index=h, process_count=hosts
        )
        for h in range(hosts)
    ]
    np.testing.assert_array_equal(np.concatenate(shards, axis=1), single)
    with pytest.raises(ValueError, match="multiple of process_count"):
        pipeline.host_batch_indices(11, 6, process_count=4)


def test_host_batches_concatenate_to_single_host(root):
    dataset = pipeline.Dataset.from_meta(root)
    order = dict(shuffle=True, seed=1, epoch=2)
    single = list(pipeline.batches(dataset, _plan(dataset, 6, **order), image_size=16))
    hosts = [
        list(pipeline.batches(dataset, _plan(dataset, 6, process_index=h, process_count=2,
                                             **order), image_size=16))
        for h in range(2)
    ]
    assert len(hosts[0]) == len(hosts[1]) == len(single) == 2
    for step, batch in enumerate(single):
        for key, value in batch.items():
            joined = np.concatenate([hosts[0][step][key], hosts[1][step][key]])
            np.testing.assert_array_equal(joined, value, err_msg=key)


def test_prefetch_same_batches_errors_and_early_stop(root, tmp_path):
    dataset = pipeline.Dataset.from_meta(root)
    kwargs = dict(image_size=16)
    sync = list(pipeline.batches(dataset, _plan(dataset, 3), prefetch=0, **kwargs))
    ahead = list(pipeline.batches(dataset, _plan(dataset, 3), prefetch=3, num_threads=2, **kwargs))
    for a, b in zip(sync, ahead, strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])

    iterator = pipeline.batches(dataset, _plan(dataset, 2), prefetch=1, **kwargs)
    next(iterator)
    iterator.close()  # the consumer stops early: the background thread must end
    assert not [t for t in threading.enumerate() if t.name == "genclip-prefetch"]

    broken = _tree(tmp_path, Image.new("RGB", (8, 8)))
    (tmp_path / "c/test/bad/0.png").write_bytes(b"broken")
    with pytest.raises(ValueError, match=r"0\.png: cannot decode image"):
        list(pipeline.batches(broken, _plan(broken, 1), prefetch=2, **kwargs))


def test_from_meta_classes(root):
    dataset = pipeline.Dataset.from_meta(root, classes=["stripes"])
    assert len(dataset) == 4
    assert {dataset.read(i).cls_name for i in range(4)} == {"stripes"}
    assert len(pipeline.Dataset.from_meta(root, split="train")) == 2
