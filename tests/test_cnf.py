"""Class-name filtering: vocabulary rules A / A' / off, and the frozen-CLIP alignment rule B on
constructed image features (tiny random CLIP text encoder)."""

from __future__ import annotations

import functools

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from genclip_jax import defaults
from genclip_jax.backbone import load_backbone
from genclip_jax.clip.model import CLIP
from genclip_jax.clip.tokenizer import tokenize
from genclip_jax.prompts import cnf


def cnf_config(rule: str, margin: float = 0.0) -> ml_collections.ConfigDict:
    cfg = defaults.base_config().genclip.cnf
    cfg.rule, cfg.margin = rule, margin
    return cfg


@functools.lru_cache(maxsize=1)
def tiny_clip() -> tuple[CLIP, dict]:
    clip_config, clip_params = load_backbone(defaults.tiny_config("genclip").model)
    return CLIP(clip_config), clip_params


def template_feature(word: str) -> np.ndarray:
    """(D,) frozen text embedding of the CNF template filled with `word`."""
    clip, params = tiny_clip()
    ids = jnp.asarray(tokenize([cnf_config("B").template.format(cnf.with_article(word))]))
    return np.asarray(clip.apply({"params": params}, ids, method=CLIP.encode_text))[0]


def images_like(word: str, n: int = 4, noise: float = 0.01, seed: int = 0) -> np.ndarray:
    """(n, D) 'image embeddings' = the text embedding of `word` plus relative noise."""
    t = template_feature(word)
    rng = np.random.default_rng(seed)
    return t + noise * np.linalg.norm(t) * rng.standard_normal((n, t.size)) / np.sqrt(t.size)


def decide_b(name: str, images: np.ndarray, margin: float = 0.0) -> cnf.Decision:
    clip, params = tiny_clip()
    return cnf.decide(name, cnf_config("B", margin), clip=clip, clip_params=params,
                      image_features=images)


@pytest.mark.parametrize(("name", "kept_a", "kept_a_prime"), [
    ("bottle", True, True), ("metal_nut", True, True), ("transistor", False, True),
    ("connector", False, True), ("pipe_fryum", False, True), ("pcb1", False, False),
    ("fryum", False, False), ("chewinggum", False, False), ("01", False, False),
    ("macaroni2", False, False),
])
def test_vocabulary_rules(name, kept_a, kept_a_prime):
    for rule, kept in (("A", kept_a), ("A'", kept_a_prime), ("off", True)):
        d = cnf.decide(name, cnf_config(rule))
        assert (d.kept, d.rule) == (kept, rule), (name, rule)
        word = " ".join(name.replace("_", " ").split())
        assert d.word == (word if kept else "object")
        assert d.score_name is None and d.score_generic is None


def test_rule_b_keeps_an_aligned_name_and_replaces_an_unaligned_one():
    kept = decide_b("bottle", images_like("bottle"))
    assert kept.kept and kept.word == "bottle" and kept.rule == "B"
    assert kept.score_name > kept.score_generic
    # Images that look like "a photo of an object." (generic) -> the name is replaced.
    replaced = decide_b("pcb1", images_like("object"))
    assert not replaced.kept and replaced.word == "object"
    assert replaced.score_generic > replaced.score_name
    # The test does not hinge on the name alone: the same name with generic-looking images.
    assert not decide_b("bottle", images_like("object")).kept


def test_template_takes_the_word_with_its_article():
    assert cnf_config("B").template.format(cnf.with_article("object")) == "a photo of an object."
    assert [cnf.with_article(w) for w in ("bottle", "Object", "metal nut", "egg carton")] == [
        "a bottle", "an Object", "a metal nut", "an egg carton"]
    # Rule B scores the generic word as "an object": images equal to that text embedding
    # align with it exactly (cosine 1), not with "a object".
    clip, params = tiny_clip()
    exact = template_feature("object")[None]
    wrong_ids = jnp.asarray(tokenize(["a photo of a object."]))
    wrong = np.asarray(clip.apply({"params": params}, wrong_ids, method=CLIP.encode_text))
    d = decide_b("bottle", exact)
    assert d.score_generic == pytest.approx(1.0, abs=1e-9)
    cos_wrong = float((exact @ wrong.T).item() / np.linalg.norm(exact) / np.linalg.norm(wrong))
    assert cos_wrong < 1.0 - 1e-6


def test_rule_b_margin_is_a_strict_threshold_on_the_score_gap():
    images = images_like("bottle")
    base = decide_b("bottle", images)
    gap = base.score_name - base.score_generic
    assert gap > 0
    assert decide_b("bottle", images, margin=gap - 1e-6).kept
    above = decide_b("bottle", images, margin=gap + 1e-6)
    assert not above.kept and above.word == "object"
    assert (above.score_name, above.score_generic) == (base.score_name, base.score_generic)
    # A negative margin keeps a name that aligns slightly worse than the generic word.
    worse = decide_b("pcb1", images_like("object"))
    loose = worse.score_name - worse.score_generic - 1e-6
    assert decide_b("pcb1", images_like("object"), margin=loose).kept


def test_rule_b_is_deterministic():
    images = images_like("bottle", seed=3)
    assert decide_b("bottle", images) == decide_b("bottle", images.copy())


def test_rule_b_without_images_names_the_class():
    with pytest.raises(ValueError, match=r"'metal_nut'.*unlabelled test images"):
        decide_b("metal_nut", np.zeros((0, template_feature("x").size)))
    with pytest.raises(ValueError, match="'metal_nut'"):
        cnf.decide("metal_nut", cnf_config("B"))


def test_unknown_rule_raises():
    with pytest.raises(ValueError, match=r"genclip\.cnf\.rule"):
        cnf.decide("bottle", cnf_config("C"))
