"""`genclip_jax.load`: a run, a params export or a config alone, then arrays in, the same maps
and scores out as the file pipeline gives, at any batch size; and its bad inputs."""

from __future__ import annotations

import csv
import json
import pathlib
import runpy
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from train_helpers import tiny_config, write_dataset

import genclip_jax
from genclip_jax import calibrate, checkpoint, maps, predict, train
from genclip_jax.clip.model import CLIPConfig
from genclip_jax.data import pipeline
from genclip_jax.methods import METHODS, Method, create_method


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def run(data_root, tmp_path_factory):
    config = tiny_config(data_root)
    config.train.epochs = 1
    workdir = tmp_path_factory.mktemp("runs") / "run"
    train.train(config, str(workdir))
    return workdir


@pytest.fixture(scope="module")
def model(run):
    return genclip_jax.load(run)


def _files(data_root: pathlib.Path) -> list[pathlib.Path]:
    return sorted((data_root / "disc" / "test").rglob("*.png"))


def _pixels(paths) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])


def test_a_run_loads_with_its_own_config_and_latest_checkpoint(model, run, data_root):
    assert isinstance(model.method, Method) and model.method.name == "anomalyclip"
    assert model.config.data.train_root == str(data_root)  # the run's config.json
    assert model.source == str(run / "checkpoints" / "1")
    assert model.config.model.image_size == 112 and model.batch_size == 8


def test_arrays_score_exactly_as_their_files_do(model, run, data_root, tmp_path):
    paths = _files(data_root)[:11]  # 11 images: a full batch of 8 and a padded one
    result = model.predict(_pixels(paths))
    assert result.anomaly_map.shape == (11, 112, 112) and result.image_score.shape == (11,)
    folder = tmp_path / "images"
    folder.mkdir()
    for i, p in enumerate(paths):
        (folder / f"{i:02d}.png").write_bytes(p.read_bytes())
    scores = predict.predict_folder(model.config, str(run), str(folder), str(tmp_path / "out"))
    with scores.open() as f:
        expected = np.array([float(r["image_score"]) for r in csv.DictReader(f)])
    np.testing.assert_allclose(result.image_score, expected, rtol=0, atol=5e-7)  # CSV: 6 digits
    one_by_one = np.concatenate([model.predict(_pixels([p])).anomaly_map for p in paths[:3]])
    np.testing.assert_allclose(one_by_one, result.anomaly_map[:3], rtol=0, atol=1e-6)


def test_every_pixel_format_maps_to_the_same_input(model, data_root):
    path = _files(data_root)[0]
    rgb = _pixels([path])
    expected = model.predict(rgb)
    as_float = model.predict(rgb.astype(np.float32) / 255.0)
    as_16bit = model.predict(rgb.astype(np.uint16) * 257)
    single = model.predict(rgb[0])  # (H, W, C): one image
    normalized = model.predict(pipeline.image_transform(Image.open(path), 112)[None],
                               normalized=True)
    for other in (as_float, as_16bit, single, normalized):
        np.testing.assert_array_equal(other.anomaly_map, expected.anomaly_map)
        np.testing.assert_array_equal(other.image_score, expected.image_score)
    gray = np.asarray(Image.open(path).convert("L"))[..., None]
    gray_input = pipeline.image_transform(Image.fromarray(gray[..., 0]), 112)[None]
    np.testing.assert_array_equal(model.predict(gray).anomaly_map,
                                  model.predict(gray_input, normalized=True).anomaly_map)


def test_features_and_text_are_the_methods_own(model, data_root):
    pixels = _pixels(_files(data_root)[:3])
    feats = model.encode_images(pixels)
    assert feats.global_feature.shape == (3, 32) and feats.patch_tokens.shape == (1, 3, 65, 32)
    inference = model._inference
    inputs = np.stack([pipeline.image_transform(Image.fromarray(p), 112) for p in pixels])
    direct = model.method.encode_images(jax.device_get(inference.clip_params), inputs)
    np.testing.assert_allclose(feats.patch_tokens, direct.patch_tokens, rtol=0, atol=1e-5)
    text = model.text_features()
    np.testing.assert_allclose(
        text, model.method.text_features(jax.device_get(inference.params),
                                         jax.device_get(inference.clip_params)),
        rtol=1e-5, atol=1e-6)  # jitted vs op by op: float32 rounding
    np.testing.assert_array_equal(model.text_features("bottle"), text)  # object-agnostic


@pytest.mark.parametrize(("images", "expected"), [
    (np.zeros((2, 5, 5), np.uint8), r"got shape \(2, 5, 5\)"),
    (np.zeros((1, 8, 8, 2), np.uint8), r"C = 1, 3 or 4 .*got shape \(1, 8, 8, 2\)"),
    (np.zeros((0, 8, 8, 3), np.uint8), r"got shape \(0, 8, 8, 3\)"),
    (np.zeros((1, 8, 8, 3), np.int64), "expected uint8, uint16 or float pixels, got int64"),
    (np.full((1, 8, 8, 3), np.nan, np.float32), "images: float image has 192 non-finite"),
])
def test_bad_arrays_name_the_shape_or_values(model, images, expected):
    with pytest.raises(ValueError, match=expected):
        model.predict(images)


def test_normalized_arrays_must_be_at_the_model_size(model):
    with pytest.raises(ValueError, match=r"expected float \(N, 112, 112, 3\), got float32 "
                                         r"\(1, 64, 64, 3\)"):
        model.predict(np.zeros((1, 64, 64, 3), np.float32), normalized=True)


def test_load_refuses_what_it_cannot_read(run, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"neither a run directory \(expected .*config"
                                                r"\.json.*nor a params export"):
        genclip_jax.load(tmp_path)
    with pytest.raises(ValueError, match="learns params: load a run directory or a params"):
        genclip_jax.load(config=str(pathlib.Path(__file__).parents[1] / "configs" / "tiny.py"))
    with pytest.raises(ValueError, match=r"unknown config field 'prompts\.n_ctxx'"):
        genclip_jax.load(run, prompts__n_ctxx=5)
    with pytest.raises(ValueError, match=r"cannot evaluate this run(.|\n)*prompts\.n_ctx: 4 "
                                         r"\(run\) vs 5 \(now\)"):
        genclip_jax.load(run, prompts__n_ctx=5)
    with pytest.raises(ValueError, match="load: give a run directory or params export"):
        genclip_jax.load()


def test_the_backbone_may_be_read_from_elsewhere(run, tmp_path, caplog):
    """`clip=` names the run's weights in another place: trusted with a warning, not compared
    (the other model fields are: see test_load_refuses_what_it_cannot_read)."""
    model = genclip_jax.load(run, clip="random", image_size=56, batch_size=2)
    assert "must hold the same weights" in caplog.text
    assert model.predict(np.zeros((3, 20, 30, 3), np.uint8)).anomaly_map.shape == (3, 56, 56)
    assert model.batch_size == 8  # rounded up to the 8 devices


def test_a_genclip_export_needs_a_class_name(data_root, tmp_path):
    config = tiny_config(data_root)
    config.method = "genclip"
    method = create_method(config, CLIPConfig(**config.model.random_arch.to_dict()))
    checkpoint.save_params(tmp_path / "export", method.init(jax.random.PRNGKey(0)),
                           config.to_dict())  # an export that records its whole config
    model = genclip_jax.load(tmp_path / "export")
    assert model.method.name == "genclip" and model.source == str(tmp_path / "export")
    pixels = _pixels(_files(data_root)[:2])
    with pytest.raises(ValueError, match=r"the genclip prompts name the class: pass class_name="
                                         r".*or the generic word 'object'"):
        model.predict(pixels)
    named = model.predict(pixels, class_name="disc")
    generic = model.predict(pixels, class_name="object")
    assert not np.array_equal(named.anomaly_map, generic.anomaly_map)
    assert not np.array_equal(model.text_features("disc"), model.text_features())
    np.testing.assert_array_equal(model.text_features("object"), model.text_features())


def test_a_converted_export_takes_the_prompt_sizes_it_records(model, run, data_root, tmp_path):
    """What `convert` records: the method and the prompt sizes; the rest are the defaults (the
    paper's backbone at 518) unless overridden."""
    template = jax.eval_shape(model.method.init, jax.random.PRNGKey(0))
    with checkpoint.Checkpointer(run / "checkpoints", read_only=True) as ckpt:
        params = ckpt.restore_params(jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                           sharding=jax.sharding.SingleDeviceSharding(
                                               jax.devices()[0])), template))
    info = {"method": "anomalyclip", "source": "epoch_15.pth", "prompts.n_ctx": 4,
            "prompts.deep_depth": 3, "prompts.deep_length": 2, "text_width": 32}
    checkpoint.save_params(tmp_path / "converted", params, info)
    converted = genclip_jax.load(tmp_path / "converted", clip="random", image_size=112)
    assert converted.config.model.clip == "random" and converted.config.prompts.n_ctx == 4
    pixels = _pixels(_files(data_root)[:2])
    np.testing.assert_array_equal(converted.predict(pixels).anomaly_map,
                                  model.predict(pixels).anomaly_map)
    with pytest.raises(ValueError, match="records no config; pass config="):
        checkpoint.save_params(tmp_path / "bare", params)
        genclip_jax.load(tmp_path / "bare")


EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture
def method_registry():
    """Methods a test registers leave the registry with the test."""
    saved = dict(METHODS)
    yield
    METHODS.clear()
    METHODS.update(saved)


def test_example_predict_arrays(run, data_root, capsys):
    example = runpy.run_path(str(EXAMPLES / "predict_arrays.py"))
    result = example["main"](str(run), str(data_root / "disc" / "test"))
    expected = genclip_jax.load(run).predict(_pixels(_files(data_root)[:4]))
    np.testing.assert_array_equal(result.image_score, expected.image_score)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"{_files(data_root)[0].relative_to(data_root / 'disc' / 'test')}: " \
                       f"image score {expected.image_score[0]:.4f}"
    assert lines[-1] == "anomaly maps: (4, 112, 112)"


def test_example_custom_method_trains_and_evaluates_outside_the_package(
    tmp_path, method_registry
):
    example = runpy.run_path(str(EXAMPLES / "custom_method.py"))
    rows = example["main"](tmp_path)
    assert set(rows) == {"checker", "disc", "stripes"}
    assert all(0 <= v <= 1 for row in rows.values() for v in row.values())
    saved = json.loads((tmp_path / "run" / "eval" / "data" / "eval.json").read_text())
    assert saved["config"]["method"] == "prototypes"
    model = genclip_jax.load(tmp_path / "run")  # the API runs it too
    assert model.text_features().shape == (2, 32)
    assert model.predict(np.zeros((1, 40, 40, 3), np.uint8)).image_score.shape == (1,)


def test_a_method_without_training_loads_from_a_config_alone(data_root, method_registry):
    prototypes = runpy.run_path(str(EXAMPLES / "custom_method.py"))["Prototypes"]

    class Fixed(prototypes):  # the example's method with fixed, unlearned prototypes
        name = "fixed"

        def init(self, rng):
            return {}

        def text_features(self, params, clip_params, class_name=None):
            return jnp.eye(2, self.clip_config.embed_dim)

        def _probs(self, params, feats):
            probs = maps.patch_probabilities(feats.patch_tokens[-1], self.text_features({}, None))
            return maps.upsample(probs, self.size)

    genclip_jax.register_method("fixed", Fixed)
    config = genclip_jax.base_config()
    config.method, config.model.clip, config.model.image_size = "fixed", "random", 112
    model = genclip_jax.load(config=config)
    assert model.method.name == "fixed" and model.source == "given params"
    result = model.predict(_pixels(_files(data_root)[:2]))
    np.testing.assert_array_equal(result.image_score, result.anomaly_map.max(axis=(1, 2)))
    assert result.anomaly_map.std() > 0  # a real map, not a constant


def test_a_calibrated_run_decides_and_a_changed_config_does_not(run, data_root, tmp_path):
    own = tmp_path / "run"
    shutil.copytree(run, own)
    config = genclip_jax.load(own).config
    config.calibrate.min_images = 4
    calibrate.calibrate(config, str(own), str(data_root / "disc" / "test" / "good"))
    thresholds = json.loads((own / "calibration.json").read_text())["classes"]["good"]
    model = genclip_jax.load(own)
    pixels = _pixels(_files(data_root)[:5])
    result = model.predict(pixels, class_name="good")
    np.testing.assert_array_equal(result.decision,
                                  result.image_score >= thresholds["image_threshold"])
    np.testing.assert_array_equal(result.defect_mask,
                                  result.anomaly_map >= thresholds["pixel_threshold"])
    assert 0 < result.defect_mask.mean() < 1
    # A config changed at load time scores differently: its calibration no longer applies.
    changed = genclip_jax.load(own, anomalyclip__sigma=2.0)
    assert changed.calibration is None and changed.predict(pixels[:1]).decision is None
    with pytest.raises(ValueError, match=r"calibrated for another model"):
        genclip_jax.load(own, calibration=own / "calibration.json", anomalyclip__sigma=2.0)


def test_few_shot_from_the_api_uses_the_class_references(run, data_root, tmp_path):
    good = sorted((data_root / "disc" / "test" / "good").glob("*.png"))
    (tmp_path / "refs" / "disc").mkdir(parents=True)
    shutil.copy(good[0], tmp_path / "refs" / "disc" / good[0].name)
    few = genclip_jax.load(run, fewshot__k=1, fewshot__reference=str(tmp_path / "refs"),
                           fewshot__weight=1.0, fewshot__image_weight=0.0)
    pixels = _pixels([good[0], *_files(data_root)[-2:]])
    maps = few.predict(pixels, class_name="disc").anomaly_map
    np.testing.assert_allclose(maps[0], 0.0, atol=1e-5)  # its own reference
    assert maps[1:].max() > 1e-3
    with pytest.raises(ValueError, match=r"no reference images of class 'bottle'"):
        few.predict(pixels, class_name="bottle")
