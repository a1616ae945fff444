"""`genclip-jax export` and `genclip_jax.serving`: the artifact scores as `genclip_jax.load`
predicts, pads and splits batches, decides by the calibration, refuses bad input before writing,
and runs without flax, optax, orbax or ml_collections."""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image
from train_helpers import subprocess_env

import genclip_jax
from genclip_jax import calibrate, checkpoint, defaults, export, run_dir, serving
from genclip_jax.clip.model import CLIPConfig
from genclip_jax.data import pipeline, synthetic
from genclip_jax.methods import create_method

REPO = pathlib.Path(__file__).resolve().parents[1]
SIZE = 112
BATCH = 2


def _config(method: str, base: pathlib.Path) -> ml_collections.ConfigDict:
    """The tiny config of `method`; a random params export for a method that learns."""
    config = defaults.tiny_config(method)
    config.train.progress = False
    config.calibrate.min_images = 2
    if method != "winclip":
        params = base / f"params_{method}"
        if not params.exists():
            model = create_method(config, CLIPConfig(**config.model.random_arch.to_dict()))
            checkpoint.save_params(params, model.init(jax.random.PRNGKey(5)))
        config.eval.params = str(params)
    return config


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tmp_path_factory.mktemp("export")


@pytest.fixture(scope="module")
def data(base):
    """2 good train images per class at 128 px (the model resizes them to 112)."""
    return synthetic.write_synthetic_dataset(base / "data", seed=4, n_train_good=2,
                                             n_test_good=1, n_test_defect_per_type=1).parent


@pytest.fixture(scope="module")
def calibrated(base, data):
    """An AnomalyCLIP run with a calibration, exported by the command line for cpu and cuda."""
    config = _config("anomalyclip", base)
    run = base / "run"
    calibrate.calibrate(config, str(run), str(data))
    out = base / "artifact_ac"
    result = subprocess.run(
        [sys.executable, "-m", "genclip_jax.cli", "export", "--config=configs/tiny.py",
         f"--config.eval.params={config.eval.params}", f"--workdir={run}", f"--out={out}",
         f"--batch-size={BATCH}", "--platforms=cpu,cuda"],
        cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert f"artifact in {out}" in result.stdout
    return config, run, out


@pytest.fixture(scope="module")
def ac_model(calibrated):
    return genclip_jax.load(calibrated[0].eval.params, config=calibrated[0])


def test_the_artifact_scores_as_predict_at_every_batch_size(calibrated, ac_model):
    _, _, out = calibrated
    artifact = serving.load(out)
    assert (artifact.input_size, artifact.batch_size) == (SIZE, BATCH)
    images = _images(2 * BATCH + 1)
    expected = ac_model.predict(images)
    for n in (1, BATCH, 2 * BATCH + 1):  # padded, exact, split with a padded remainder
        got = artifact(images[:n], class_name="disc")
        assert got["anomaly_map"].shape == (n, SIZE, SIZE) and got["image_score"].shape == (n,)
        np.testing.assert_allclose(got["anomaly_map"], expected.anomaly_map[:n], atol=1e-5)
        np.testing.assert_allclose(got["image_score"], expected.image_score[:n], atol=1e-5)


def test_decisions_use_the_class_threshold_else_the_global_one(calibrated):
    _, run, out = calibrated
    saved = json.loads((run / calibrate.FILE_NAME).read_text())
    artifact = serving.load(out)
    images = _images(3, seed=1)
    for cls in ("disc", "stripes"):
        got = artifact(images, class_name=cls)
        threshold = saved["classes"][cls]["image_threshold"]
        np.testing.assert_array_equal(got["decision"], got["image_score"] >= threshold)
    # a threshold between the scores: some images each way, so the class's threshold matters
    artifact.manifest["calibration"]["classes"]["disc"]["image_threshold"] = float(
        np.median(got["image_score"]))
    decision = artifact(images, class_name="disc")["decision"]
    assert decision.any() and not decision.all()
    with pytest.warns(UserWarning, match="no calibration for class 'bolt'"):
        got = artifact(images, class_name="bolt")  # AnomalyCLIP: the class only picks thresholds
    np.testing.assert_array_equal(got["decision"],
                                  got["image_score"] >= saved["global"]["image_threshold"])


def test_the_manifest_records_the_run_and_the_text_is_folded(calibrated):
    _, run, out = calibrated
    manifest = json.loads((out / export.MANIFEST).read_text())
    assert manifest["platforms"] == ["cpu", "cuda"]
    assert jax.export.deserialize(bytearray((out / export.FUNCTION).read_bytes())).platforms == (
        "cpu", "cuda")
    saved = json.loads((run / calibrate.FILE_NAME).read_text())
    assert manifest["config_hash"] == saved["provenance"]["config_hash"]
    assert manifest["calibration"]["classes"] == saved["classes"]
    assert manifest["classes"] == ["", "checker", "disc", "stripes"]  # the calibration's
    assert (manifest["method"], manifest["input_size"], manifest["batch_size"]) == (
        "anomalyclip", SIZE, BATCH)
    assert manifest["versions"]["genclip_jax"] == genclip_jax.__version__
    names = manifest["arguments"]["shared"]
    # object-agnostic prompts: their text features are constants, the text encoder is gone
    assert manifest["arguments"]["per_class"] == [] and manifest["folded"] > 0
    assert not [n for n in names if n.startswith(("clip_params/text", "params/"))]
    assert any(n.startswith("clip_params/visual") for n in names)


def test_preprocess_reproduces_the_pipeline_resize(calibrated, ac_model, data):
    paths = sorted((data / "disc" / "train" / "good").glob("*.png"))
    assert Image.open(paths[0]).size != (SIZE, SIZE)
    artifact = serving.load(calibrated[2])
    images = np.stack([serving.preprocess(p, SIZE) for p in paths])
    assert images.dtype == np.uint8 and images.shape == (len(paths), SIZE, SIZE, 3)
    np.testing.assert_array_equal(pipeline.normalize(images[0]), pipeline.image_transform(
        pipeline.read_image(paths[0]), SIZE))
    expected = ac_model.predict(np.stack([np.asarray(Image.open(p)) for p in paths]))
    with pytest.warns(UserWarning, match="no calibration for images without a class"):
        got = artifact(images)
    np.testing.assert_allclose(got["image_score"], expected.image_score, atol=1e-5)


def test_bad_images_and_unknown_platforms_name_what_the_artifact_has(calibrated, tmp_path):
    artifact = serving.load(calibrated[2])
    for bad in (_images(1)[..., :2], _images(1).astype(np.float32), _images(1)[0],
                np.zeros((1, 64, 64, 3), np.uint8), _images(0)):
        with pytest.raises(ValueError, match=r"uint8 \(N, 112, 112, 3\) with N >= 1"):
            artifact(bad)
    copy = tmp_path / "tpu_only"
    shutil.copytree(calibrated[2], copy)
    manifest = json.loads((copy / export.MANIFEST).read_text())
    (copy / export.MANIFEST).write_text(json.dumps({**manifest, "platforms": ["tpu"]}))
    with pytest.raises(ValueError, match=r"exported for platforms \['tpu'\], this machine "
                                         r"runs 'cpu'.*--platforms=tpu,cpu"):
        serving.load(copy)
    (copy / export.WEIGHTS).unlink()
    with pytest.raises(FileNotFoundError, match=r"weights\.safetensors is missing"):
        serving.load(copy)


def test_an_existing_folder_or_a_bad_input_stops_before_anything_is_written(
        calibrated, tmp_path):
    config, run, out = calibrated
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(FileExistsError, match="--overwrite"):
        export.export(config, str(run), str(out))
    assert sorted(p.name for p in out.iterdir()) == before
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not an artifact"):
        export.export(config, str(run), str(user), overwrite=True)
    fresh = tmp_path / "fresh"
    with pytest.raises(ValueError, match=r"--platforms: expected names among .*'gpu'"):
        export.export(config, str(run), str(fresh), platforms=["gpu"])
    with pytest.raises(ValueError, match="--batch-size: expected a positive integer, got 0"):
        export.export(config, str(run), str(fresh), batch_size=0)
    other = config.copy_and_resolve_references()
    other.anomalyclip.sigma = 2.0  # another model: the run's calibration does not apply
    with pytest.raises(ValueError, match="calibrated for another model"):
        export.export(other, str(run), str(fresh))
    with pytest.raises(ValueError, match="needs a trained run"):
        export.export(_no_params(config), None, str(fresh))
    assert not fresh.exists() and not list(tmp_path.glob(".fresh*"))
    assert sorted(p.name for p in user.iterdir()) == ["notes.txt"]


def _no_params(config):
    config = config.copy_and_resolve_references()
    config.eval.params = ""
    return config


def _run(config: ml_collections.ConfigDict, run: pathlib.Path) -> ml_collections.ConfigDict:
    """A run directory holding the params export of `config` as its checkpoint (no training);
    the config that reads it."""
    params, _ = checkpoint.load_params(config.eval.params)
    config = config.copy_and_resolve_references()
    config.eval.params = ""
    run_dir.RunDir(run).write_config(config)
    with checkpoint.Checkpointer(run / "checkpoints") as ckpt:
        ckpt.save(1, params, {"step": np.int32(1)})
    return config


def test_genclip_folds_a_set_per_class_and_keeps_the_mvp_text_encoder(base, tmp_path):
    config = _run(_config("genclip", base), tmp_path / "run")
    out = export.export(config, str(tmp_path / "run"), str(tmp_path / "gc"), batch_size=BATCH,
                        classes=["disc", "candle"])
    artifact = serving.load(out)
    manifest = artifact.manifest
    assert manifest["classes"] == ["", "disc", "candle"] and manifest["calibration"] is None
    assert manifest["arguments"]["per_class"]  # the class word's prompt embeddings
    # MVP: the prompts take vision tokens, so the text encoder runs inside the function
    assert any(n.startswith("clip_params/text") for n in manifest["arguments"]["shared"])
    assert manifest["source"].startswith(str(tmp_path / "run" / "checkpoints"))
    model = genclip_jax.load(tmp_path / "run")
    images = _images(3, seed=2)
    for cls, word in (("disc", "disc"), ("candle", "candle"), ("", "object")):
        got = artifact(images, class_name=cls)
        assert "decision" not in got
        expected = model.predict(images, class_name=word)
        np.testing.assert_allclose(got["anomaly_map"], expected.anomaly_map, atol=1e-5)
        np.testing.assert_allclose(got["image_score"], expected.image_score, atol=1e-5)
    assert not np.allclose(artifact(images, class_name="disc")["anomaly_map"],
                           artifact(images, class_name="candle")["anomaly_map"])
    with pytest.raises(ValueError, match=r"exported for the classes \['', 'disc', 'candle'\]"):
        artifact(images, class_name="bottle")
    with pytest.raises(ValueError, match="prompts name the class: pass class_name="):
        artifact(images)


def test_few_shot_banks_are_exported_per_class(base, data, tmp_path, capsys):
    config = _config("anomalyclip", base).copy_and_resolve_references()
    config.fewshot.k = 1
    config.fewshot.reference = str(data)
    out = export.export(config, None, str(tmp_path / "fs"), batch_size=BATCH,
                        classes=["disc", "stripes"])
    assert "classes ['disc', 'stripes']" in capsys.readouterr().out
    artifact = serving.load(out)
    # references of three classes: images without a class have no bank, so no "" entry
    assert artifact.classes == ["disc", "stripes"]
    assert "bank" in artifact.manifest["arguments"]["per_class"]
    model = genclip_jax.load(config.eval.params, config=config)
    zero_shot = genclip_jax.load(config.eval.params, config=_config("anomalyclip", base))
    images = _images(3, seed=4)
    for cls in ("disc", "stripes"):
        got = artifact(images, class_name=cls)
        expected = model.predict(images, class_name=cls)
        np.testing.assert_allclose(got["anomaly_map"], expected.anomaly_map, atol=1e-5)
        np.testing.assert_allclose(got["image_score"], expected.image_score, atol=1e-5)
    assert not np.allclose(got["image_score"], zero_shot.predict(images).image_score, atol=1e-3)
    with pytest.raises(ValueError, match=r"exported for the classes \['disc', 'stripes'\]"):
        artifact(images)


def test_winclip_zero_shot_exports_from_its_config_alone(base, tmp_path):
    config = _config("winclip", base)
    out = export.export(config, None, str(tmp_path / "wc"), batch_size=BATCH, classes=["disc"])
    artifact = serving.load(out)
    model = genclip_jax.load(config=config)
    images = _images(3, seed=3)
    for cls in ("disc", None):
        got = artifact(images, class_name=cls)
        expected = model.predict(images, class_name=cls)
        np.testing.assert_allclose(got["anomaly_map"], expected.anomaly_map, atol=1e-5)
        np.testing.assert_allclose(got["image_score"], expected.image_score, atol=1e-5)


def test_serving_runs_without_flax_optax_orbax_or_ml_collections(calibrated):
    script = textwrap.dedent(f"""
        import sys
        import numpy as np
        from genclip_jax import serving
        artifact = serving.load({str(calibrated[2])!r})
        out = artifact(np.zeros((3, {SIZE}, {SIZE}, 3), np.uint8), class_name="disc")
        assert out["anomaly_map"].shape == (3, {SIZE}, {SIZE}) and out["decision"].shape == (3,)
        loaded = [m for m in ("flax", "optax", "orbax", "ml_collections") if m in sys.modules]
        print("heavy modules:", loaded)
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=subprocess_env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "heavy modules: []" in result.stdout


def test_fold_constants_stores_what_is_worth_it_and_marks_what_changes_by_class():
    def fn(known, x):
        text = known["w"] @ known["batch"]["v"]  # (4, 3) from constants: stored, per class
        mask = jnp.broadcast_to(known["w"][:, :1], (4, 1000))  # large and cheap: recomputed
        return {"y": x @ text, "z": x @ mask[:, :4] + x @ known["u"]}

    rng = np.random.default_rng(0)
    known = {"w": rng.normal(size=(4, 2)).astype(np.float32),
             "u": rng.normal(size=(4, 4)).astype(np.float32),
             "batch": {"v": rng.normal(size=(2, 3)).astype(np.float32)}}
    folded = export.fold_constants(fn, known, jax.ShapeDtypeStruct((6, 4), jnp.float32),
                                   ("batch",))
    assert sorted(zip(folded.names, folded.per_class, strict=True)) == [
        ("folded/0", True), ("u", False), ("w", False)]
    shared, by_class = folded.constants(known)
    np.testing.assert_allclose(by_class[0], known["w"] @ known["batch"]["v"], rtol=1e-6)
    stored = iter(shared), iter(by_class)
    args = [next(stored[c]) for c in folded.per_class]
    x = rng.normal(size=(6, 4)).astype(np.float32)
    got = jax.tree.unflatten(folded.out_tree, folded.staged(*args, x))
    expected = fn(known, x)
    for key in ("y", "z"):
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-5)
