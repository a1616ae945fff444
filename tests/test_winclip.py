"""WinCLIP as a method: nothing to train, batch-size independent evaluation (zero- and few-shot),
text embeddings cached per class, few-shot references from a meta.json root or class folders,
and the errors of bad input (training it, a class name too long, too few references)."""

from __future__ import annotations

import shutil

import jax
import numpy as np
import pytest
from train_helpers import IMAGE_SIZE

import genclip_jax
from genclip_jax import defaults, evaluate, fewshot, validate
from genclip_jax.clip.model import CLIPConfig
from genclip_jax.data import meta as meta_lib
from genclip_jax.data import pipeline, synthetic
from genclip_jax.methods import create_method, winclip


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """Two classes, 3 good train images each (the references), 5 test images each."""
    root = tmp_path_factory.mktemp("winclip_data")
    synthetic.write_synthetic_dataset(root, image_size=IMAGE_SIZE, classes=("disc", "checker"),
                                      n_train_good=3, n_test_good=1, n_test_defect_per_type=1)
    return root


def winclip_config(data_root, **fields):
    config = defaults.tiny_config("winclip")
    config.data.test_root = str(data_root)
    config.fewshot.reference = str(data_root)
    config.train.progress = False
    for name, value in fields.items():
        section, key = name.split("__")
        config[section][key] = value
    return config


def test_nothing_to_train_and_train_is_refused(data_root):
    config = winclip_config(data_root)
    method = create_method(config, CLIPConfig(**config.model.random_arch.to_dict()))
    assert method.init(jax.random.PRNGKey(0)) == {}
    config.data.train_root = str(data_root)
    with pytest.raises(ValueError, match=r"'winclip' needs no training"):
        validate.validate(config, "train")
    with pytest.raises(ValueError, match=r"needs no training"):
        method.loss({}, None, None, {})


@pytest.mark.parametrize("k", [0, 2])
def test_batch_1_on_one_device_equals_batch_8_on_eight(data_root, k):
    config = winclip_config(data_root, fewshot__k=k)
    entries = meta_lib.split_entries(meta_lib.read_meta(data_root / "meta.json"), "test")
    dataset = pipeline.Dataset.from_entries(data_root, entries)
    results = []
    for batch_size, devices in ((8, 0), (1, 1)):
        config.eval.batch_size, config.parallel.num_devices = batch_size, devices
        model = evaluate.load_model(config, "")
        assert model.source == "no params: winclip needs no training"
        model = evaluate.adapt_to_classes(config, model, dataset, entries)
        results.append(evaluate.predict_dataset(config, model, dataset))
    batched, single = results
    np.testing.assert_allclose(single["anomaly_map"], batched["anomaly_map"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(single["image_score"], batched["image_score"], rtol=0, atol=1e-6)
    assert batched["anomaly_map"].shape == (len(entries), IMAGE_SIZE, IMAGE_SIZE)


def test_adaptation_holds_each_class_text_once_and_the_method_stays_stateless(data_root):
    config = winclip_config(data_root)
    model = evaluate.load_model(config, "")
    method = model.method
    compiled = winclip._ensemble_means._cache_size()
    adaptation = method.prepare_eval(model.clip_params, ["disc", "checker"], lambda name: None)
    assert winclip._ensemble_means._cache_size() <= compiled + 1  # one compile for every class
    assert sorted(adaptation) == ["", "checker", "disc"]  # "": the generic word
    assert evaluate.adaptation_record(adaptation) == {  # class_names.json: no arrays
        "disc": {"word": "disc", "references": 0}, "checker": {"word": "checker", "references": 0},
        "": {"word": "object", "references": 0}}
    assert vars(method).keys() == vars(create_method(config, method.clip_config)).keys()
    assert method == create_method(config, method.clip_config)  # compares by config
    batch = {"cls_name": np.array(["disc", "checker", "disc", ""], object)}
    text = method.host_inputs(batch, adaptation)["text"]
    np.testing.assert_array_equal(text[0], text[2])
    assert np.abs(text[0] - text[1]).max() > 1e-4
    generic = np.asarray(method.text_features({}, model.clip_params, None))
    np.testing.assert_allclose(text[3], generic, rtol=0, atol=1e-6)
    np.testing.assert_allclose(text[0], method.text_features({}, model.clip_params, "disc"),
                               rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match=r"winclip: no inputs for the classes \['pill'\]"):
        method.host_inputs({"cls_name": np.array(["pill"], object)}, adaptation)
    # The generic word is a knob: another word, other text.
    other = winclip_config(data_root, winclip__generic_word="part")
    other_method = create_method(other, method.clip_config)
    assert other_method != method
    assert np.abs(np.asarray(other_method.text_features({}, model.clip_params, None))
                  - generic).max() > 1e-4


def test_python_api_runs_zero_and_few_shot_from_a_config(data_root):
    images = np.random.default_rng(0).integers(0, 256, (2, 90, 100, 3), dtype=np.uint8)
    zero = genclip_jax.load(config=winclip_config(data_root), batch_size=8)
    a = zero.predict(images, class_name="disc")
    b = zero.predict(images, class_name="checker")
    assert a.anomaly_map.shape == (2, IMAGE_SIZE, IMAGE_SIZE)
    assert np.abs(a.image_score - b.image_score).max() > 1e-6  # the class names the prompts
    feats = zero.encode_images(images)  # padded rows dropped along each leaf's batch axis
    grid = IMAGE_SIZE // 16
    windows = (grid - 1) ** 2 + (grid - 2) ** 2
    assert (feats.image.shape, feats.patches.shape, feats.windows.shape) == (
        (2, 32), (2, grid * grid, 64), (2, windows, 32))
    few = genclip_jax.load(config=winclip_config(data_root, fewshot__k=2), batch_size=8)
    c = few.predict(images, class_name="disc")
    assert np.abs(c.anomaly_map - a.anomaly_map).max() > 1e-4
    # Its own references score near zero on the few-shot side: the map halves at most.
    chosen = fewshot.select(fewshot.reference_paths(str(data_root)), "disc", 2, "", seed=0)
    refs = [pipeline.read_image(p) for p in chosen]
    own = few.predict(np.stack([np.asarray(r.convert("RGB")) for r in refs]), class_name="disc")
    alone = zero.predict(np.stack([np.asarray(r.convert("RGB")) for r in refs]),
                         class_name="disc")
    np.testing.assert_allclose(own.anomaly_map, alone.anomaly_map / 2, rtol=0, atol=1e-5)


def test_references_from_class_folders_equal_meta_json(data_root, tmp_path):
    by_meta = fewshot.reference_paths(str(data_root))
    assert sorted(by_meta) == ["checker", "disc"] and len(by_meta["disc"]) == 3
    for cls, paths in by_meta.items():
        (tmp_path / cls / "sub").mkdir(parents=True)
        for p in paths:
            shutil.copy(p, tmp_path / cls / "sub" / p.name)
    by_folder = fewshot.reference_paths(str(tmp_path))
    assert {c: [p.name for p in v] for c, v in by_folder.items()} == {
        c: [p.name for p in v] for c, v in by_meta.items()}
    assert [p.name for p in fewshot.select(by_folder, "disc", 2, "x")] == [
        p.name for p in fewshot.select(by_meta, "disc", 2, "x")]

    # The good/defect folder layout of make-meta --dataset=folder: its good images only.
    layout = tmp_path.parent / f"{tmp_path.name}_layout"
    for cls, paths in by_meta.items():
        (layout / cls / "good").mkdir(parents=True)
        (layout / cls / "crack").mkdir()
        for p in paths:
            shutil.copy(p, layout / cls / "good" / p.name)
        shutil.copy(paths[0], layout / cls / "crack" / "defect.png")
    assert {c: [p.name for p in v] for c, v in fewshot.reference_paths(str(layout)).items()} == {
        c: [p.name for p in v] for c, v in by_meta.items()}


def test_too_few_references_name_class_k_and_count(data_root):
    paths = fewshot.reference_paths(str(data_root))
    with pytest.raises(ValueError, match=r"class 'disc' has 3 normal reference images, fewer "
                                         r"than fewshot\.k=4"):
        fewshot.select(paths, "disc", 4, str(data_root))
    with pytest.raises(ValueError, match=r"no reference images of class 'pcb1'"):
        fewshot.select(paths, "pcb1", 1, str(data_root))
    with pytest.raises(ValueError, match=r"class is unknown and the references hold 2 classes"):
        fewshot.select(paths, "", 1, str(data_root))
    config = winclip_config(data_root, fewshot__k=4)
    with pytest.raises(ValueError, match=r"class 'checker' has 3 normal reference images"):
        evaluate.evaluate(config, str(data_root / "run"))
    assert not (data_root / "run").exists()  # nothing written


def test_a_class_name_too_long_names_the_class_and_template(data_root):
    config = winclip_config(data_root)
    method = create_method(config, CLIPConfig(**config.model.random_arch.to_dict()))
    long = "very " * 75 + "long"
    with pytest.raises(ValueError, match=r"class '.*long'.*template 'a cropped photo of the "
                                         r"\{\}\.'.*winclip\.templates"):
        method.text_features({}, None, long)


def test_config_errors(data_root):
    config = winclip_config(data_root, winclip__scales=(2, 2), winclip__templates=["a photo"],
                            fewshot__k=1, fewshot__reference=str(data_root / "nowhere"))
    with pytest.raises(ValueError) as err:
        validate.validate(config, "eval")
    text = str(err.value)
    assert "winclip.scales: expected distinct window sides" in text
    assert "winclip.templates[0]: expected a template with one '{}', got 'a photo'" in text
    assert "fewshot.reference: fewshot.k=1 needs a folder" in text
    layers = winclip_config(data_root, fewshot__k=1, fewshot__layers=(12,))
    with pytest.raises(ValueError, match=r"fewshot\.layers: WinCLIP\+ compares the patch and "
                                         r"window embeddings of its last layer"):
        validate.validate(layers, "eval")
    big = winclip_config(data_root, winclip__scales=(2, 8))
    arch = CLIPConfig(**big.model.random_arch.to_dict())
    with pytest.raises(ValueError, match=r"windows of \[8\] patches do not fit the 7x7 patch"):
        validate.check_backbone(big, arch)


def test_demo_evaluates_without_training(tmp_path):
    from genclip_jax import demo

    config = defaults.tiny_config("winclip")
    config.train.progress = False
    config.eval.heatmaps_per_class = 1
    rows = demo.run(config, str(tmp_path))
    assert rows.keys() == {"stripes", "checker", "disc"}
    assert (tmp_path / "eval" / "data" / "metrics.json").is_file()
    assert list((tmp_path / "eval" / "data" / "heatmaps").rglob("*.png"))
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "config.json").exists()
