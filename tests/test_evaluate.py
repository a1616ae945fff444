"""Batched evaluation does not depend on the batch size; `predict` over an arbitrary folder."""

from __future__ import annotations

import csv
import json
import shutil

import jax
import numpy as np
import pytest
from PIL import Image
from train_helpers import tiny_config, write_dataset

from genclip_jax import checkpoint, evaluate, predict
from genclip_jax.clip.model import CLIPConfig
from genclip_jax.data import meta as meta_lib
from genclip_jax.data import pipeline
from genclip_jax.methods import create_method


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data"))


def _prompt_params(config):
    method = create_method(config, CLIPConfig(**config.model.random_arch.to_dict()))
    return method.init(jax.random.PRNGKey(3))


def test_batch_1_on_one_device_equals_batch_8_on_eight(data_root):
    config = tiny_config(data_root)
    params = _prompt_params(config)
    meta = meta_lib.read_meta(data_root / "meta.json", root=data_root)
    entries = meta_lib.split_entries(meta, "test")
    dataset = pipeline.Dataset.from_entries(data_root, entries)
    outcomes = []
    for batch_size, num_devices in ((8, 0), (1, 1)):
        config.eval.batch_size = batch_size
        config.parallel.num_devices = num_devices
        model = evaluate.load_model(config, "", params)
        assert model.mesh.size == (num_devices or 8)
        results = evaluate.predict_dataset(config, model, dataset)
        outcomes.append((results, evaluate.class_rows(entries, results, config)))
    (batched, batched_rows), (single, single_rows) = outcomes
    np.testing.assert_allclose(single["anomaly_map"], batched["anomaly_map"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(single["image_score"], batched["image_score"], rtol=0, atol=1e-6)
    for key in ("mask", "label"):
        np.testing.assert_array_equal(single[key], batched[key])
    assert single_rows.keys() == batched_rows.keys() == {"disc"}
    for name, value in batched_rows["disc"].items():
        assert single_rows["disc"][name] == pytest.approx(value, abs=1e-6), name


def test_num_devices_is_checked(data_root):
    config = tiny_config(data_root)
    config.parallel.num_devices = 9
    with pytest.raises(ValueError, match=r"parallel\.num_devices=9: expected 0 \(all\) or 1\.\.8"):
        evaluate.load_model(config, "", {})


def _folder_with_strays(data_root, folder):
    """4 good images (one in a subfolder), a README, a text file named .png, a truncated PNG."""
    sources = sorted((data_root / "disc" / "test").rglob("*.png"))[:4]
    (folder / "sub").mkdir(parents=True)
    for i, source in enumerate(sources):
        shutil.copy(source, folder / ("sub" if i == 3 else ".") / f"img{i}.png")
    (folder / "README.md").write_text("not an image")
    (folder / "fake.png").write_text("not a png either")
    noise = np.random.default_rng(0).integers(0, 256, (112, 112, 3), dtype=np.uint8)
    Image.fromarray(noise).save(folder / "cut.png")
    data = (folder / "cut.png").read_bytes()
    (folder / "cut.png").write_bytes(data[: len(data) // 2])  # header fine, pixels cut
    return ["img0.png", "img1.png", "img2.png", "sub/img3.png"]


def test_predict_skips_unreadable_files_with_one_warning(data_root, tmp_path, monkeypatch):
    readable = _folder_with_strays(data_root, tmp_path / "images")
    config = tiny_config(data_root)
    checkpoint.save_params(tmp_path / "params", _prompt_params(config))
    config.eval.params = str(tmp_path / "params")
    config.eval.batch_size = 8
    decodes = []
    original = pipeline.decode_image
    monkeypatch.setattr(
        pipeline, "decode_image", lambda *a: decodes.append(a[1]) or original(*a)
    )
    with pytest.warns(UserWarning, match=r"skipped 3 file\(s\).*\['README\.md', 'cut\.png', "
                      r"'fake\.png'\]") as caught:
        scores_path = predict.predict_folder(config, "", str(tmp_path / "images"),
                                             str(tmp_path / "out"))
    assert len([w for w in caught if "skipped" in str(w.message)]) == 1
    assert sorted(decodes) == sorted(str(tmp_path / "images" / n) for n in [*readable, "cut.png"])

    with scores_path.open() as f:
        rows = list(csv.DictReader(f))
    assert [r["image"] for r in rows] == readable
    for row in rows:
        assert 0.0 <= float(row["image_score"]) <= 1.0 and float(row["pixel_max"]) > 0
    assert [r["heatmap"] for r in rows] == [f"heatmaps/{name}" for name in readable]
    panels = sorted(p.relative_to(tmp_path / "out").as_posix()
                    for p in (tmp_path / "out" / "heatmaps").rglob("*.png"))
    assert panels == [f"heatmaps/{name}" for name in readable]
    panel = np.asarray(Image.open(tmp_path / "out" / "heatmaps" / "img0.png"))
    assert panel.shape == (112, 224 + 64, 3)  # image, overlay, colour bar of the run's range
    np.testing.assert_array_equal(  # the left half is the image exactly as the model saw it
        panel[:, :112], np.asarray(Image.open(tmp_path / "images" / "img0.png").convert("RGB"))
    )


def test_eval_panels_show_the_pixels_the_model_saw(data_root, tmp_path):
    meta = meta_lib.read_meta(data_root / "meta.json", root=data_root)
    entries = meta_lib.split_entries(meta, "test")
    dataset = pipeline.Dataset.from_entries(data_root, entries)
    shown = {0: (np.zeros((56, 56), np.float32), None)}
    written = evaluate.write_heatmaps(tmp_path, dataset, entries, shown, (0.0, 1.0))
    panel = np.asarray(Image.open(written[-1]))
    image = Image.open(data_root / entries[0]["img_path"])
    expected = np.asarray(image.resize((56, 56), Image.BICUBIC).convert("RGB"))
    np.testing.assert_array_equal(panel[:, :56], expected)
    np.testing.assert_array_equal(panel[:, :56], dataset.load(0, 56)["image"])



def test_genclip_eval_runs_class_name_filtering_and_saves_it(data_root, tmp_path):
    config = tiny_config(data_root)
    config.method = "genclip"
    config.eval.heatmaps_per_class = 0
    rows = evaluate.evaluate(config, str(tmp_path), _prompt_params(config))
    assert set(rows) == {"disc"}
    decisions = json.loads((tmp_path / "eval" / data_root.name / "class_names.json").read_text())
    assert set(decisions) == {"disc"}
    assert decisions["disc"]["rule"] == "B"
    kept = decisions["disc"]["score_name"] - decisions["disc"]["score_generic"] > 0
    assert decisions["disc"]["kept"] is kept
    assert decisions["disc"]["word"] == ("disc" if kept else "object")


def test_streamed_evaluation_equals_the_whole_set_computation(data_root, tmp_path):
    """eval computes each class as it completes: the same values as the metrics of the whole
    set's maps at once; eval.metric_size changes the pixel metrics only."""
    config = tiny_config(data_root)
    params = _prompt_params(config)
    meta = meta_lib.read_meta(data_root / "meta.json", root=data_root)
    entries = meta_lib.split_entries(meta, "test")
    config.eval.batch_size, config.parallel.num_devices = 3, 1  # batches straddle classes
    model = evaluate.load_model(config, "", params)
    whole = evaluate.class_rows(entries, evaluate.predict_dataset(
        config, model, pipeline.Dataset.from_entries(data_root, entries)), config)
    streamed = evaluate.evaluate(config, "", params, out=str(tmp_path / "out"))
    assert streamed == whole

    config.eval.metric_size = 56
    smaller = evaluate.evaluate(config, "", params, out=str(tmp_path / "out56"))
    for cls, row in smaller.items():
        for name, value in row.items():
            if name.startswith("image_"):
                assert value == whole[cls][name], name
        assert row["pixel_auroc"] != whole[cls]["pixel_auroc"]


def test_stream_holds_one_class_at_a_time(data_root):
    config = tiny_config(data_root)
    meta = meta_lib.read_meta(data_root / "meta.json", root=data_root)
    entries = meta_lib.split_entries(meta, "test")
    entries = entries + [{**e, "cls_name": "copy"} for e in entries]  # two classes
    config.eval.batch_size, config.parallel.num_devices = 3, 1
    model = evaluate.load_model(config, "", _prompt_params(config))
    items = list(evaluate.stream_classes(
        config, model, pipeline.Dataset.from_entries(data_root, entries), entries))
    *classes, value_range = items
    assert [c.name for c in classes] == ["disc", "copy"]
    n = len(entries) // 2
    np.testing.assert_array_equal(classes[1].indices, np.arange(n, 2 * n))
    np.testing.assert_array_equal(classes[0].results["anomaly_map"],
                                  classes[1].results["anomaly_map"])
    assert len(classes[0].shown) == config.eval.heatmaps_per_class
    assert value_range[0] == classes[0].results["anomaly_map"].min()
    assert value_range[1] == classes[0].results["anomaly_map"].max()
