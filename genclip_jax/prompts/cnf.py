"""Class-name filtering (CNF): keep a class name in the vision-enhanced prompts only if CLIP
knows it, else use the generic word (genclip spec section 4).

Rules (`genclip.cnf.rule`):
  "B"   (default, the paper's Fig. 3a: frozen image and text encoders): keep the name iff the
        class's unlabelled test images align better with "a photo of a {name}." than with
        "a photo of an {generic}." by more than `margin` (mean cosine over the images; the
        template's "{}" takes the word with its article, `with_article`);
  "A"   every word of the name is one whole-word BPE token and has no digit;
  "A'"  keep unless the name has a digit or none of its words is recognised, a word being
        recognised if it is one whole-word BPE token or splits into BPE pieces of at least
        `MIN_PIECE_CHARS` characters each (long sub-words are morphemes of real words:
        'transi|stor', 'conne|ctor'; short ones are fragments: 'fr|yum', 'che|wing|gum');
  "off" always keep.
Every decision is returned with its evidence so that runs can log and save it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from genclip_jax.clip.model import CLIP
from genclip_jax.clip.tokenizer import END_OF_WORD, is_whole_word_token, tokenize, tokens
from genclip_jax.prompts.genclip import normalize_class_name

RULES = ("B", "A", "A'", "off")
MIN_PIECE_CHARS = 4


@dataclasses.dataclass(frozen=True)
class Decision:
    """What CNF decided for one class, and why."""

    class_name: str
    word: str  # the word the prompts use: the normalised name, or the generic word
    kept: bool
    rule: str
    score_name: float | None = None  # mean cos(image, "a photo of a {name}.") (rule B)
    score_generic: float | None = None  # mean cos(image, "a photo of an {generic}.") (rule B)


def with_article(word: str) -> str:
    """'bottle' -> 'a bottle', 'object' -> 'an object' (by the first letter: English
    exceptions such as 'an hour' are not worth a dictionary for class names)."""
    return f"{'an' if word[:1].lower() in 'aeiou' else 'a'} {word}"


def _has_digit(name: str) -> bool:
    return any(ch.isdigit() for ch in name)


def _recognised_word(word: str) -> bool:
    """Rule A' word test: a whole-word token, or BPE pieces of >= MIN_PIECE_CHARS characters."""
    if is_whole_word_token(word):
        return True
    return all(len(s.removesuffix(END_OF_WORD)) >= MIN_PIECE_CHARS for s in tokens(word))


def vocabulary_rule(name: str, strict: bool) -> bool:
    """Rule A (strict) / A' on a normalised name."""
    if _has_digit(name):
        return False
    words = name.split()
    if strict:
        return bool(words) and all(is_whole_word_token(w) for w in words)
    return any(_recognised_word(w) for w in words)


def alignment_scores(
    clip: CLIP,
    clip_params,
    image_features: jax.Array,
    words: tuple[str, str],
    template: str,
    context_length: int,
) -> tuple[float, float]:
    """Mean cosine of (N, D) image features (N >= 1) with the template filled by each word and
    its article (cosines in float64 on the host, so decisions do not depend on the device's
    matmul)."""
    ids = jnp.asarray(tokenize([template.format(with_article(w)) for w in words], context_length))
    text = np.asarray(clip.apply({"params": clip_params}, ids, method=CLIP.encode_text),
                      np.float64)
    images = np.asarray(image_features, np.float64)
    text /= np.linalg.norm(text, axis=-1, keepdims=True)
    images = images / np.linalg.norm(images, axis=-1, keepdims=True)
    cos = (images @ text.T).mean(axis=0)
    return float(cos[0]), float(cos[1])


def decide(
    class_name: str,
    cfg: ml_collections.ConfigDict,
    *,
    clip: CLIP | None = None,
    clip_params=None,
    image_features: jax.Array | None = None,
    context_length: int = 77,
) -> Decision:
    """One class's decision under `cfg.rule` (rule B needs the CLIP and the image features)."""
    if cfg.rule not in RULES:
        raise ValueError(f"genclip.cnf.rule: expected one of {RULES}, got {cfg.rule!r}")
    name = normalize_class_name(class_name)
    scores: tuple[float | None, float | None] = (None, None)
    if cfg.rule == "off":
        kept = True
    elif cfg.rule in ("A", "A'"):
        kept = vocabulary_rule(name, strict=cfg.rule == "A")
    else:
        if image_features is None or clip is None:
            raise ValueError(f"CNF rule B, class {class_name!r}: needs the frozen CLIP and the "
                             "class's image features, got none")
        if image_features.ndim != 2 or image_features.shape[0] == 0:
            raise ValueError(f"CNF rule B, class {class_name!r}: needs the (N >= 1, D) image "
                             "embeddings of the class's unlabelled test images, got shape "
                             f"{tuple(image_features.shape)}")
        scores = alignment_scores(clip, clip_params, image_features, (name, cfg.generic_word),
                                  cfg.template, context_length)
        kept = scores[0] - scores[1] > cfg.margin
    return Decision(class_name, name if kept else cfg.generic_word, kept, cfg.rule, *scores)
