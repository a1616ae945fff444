"""WinCLIP's compositional prompt ensemble: every template applied to every state of the class.

Normal prompts: each of `winclip.normal_states` (e.g. "flawless {}") filled with the class word,
then put into each of `winclip.templates` (e.g. "a photo of a {}."), states outer and templates
inner; the same for `winclip.anomalous_states` (winclip spec section 1). Nothing is learned.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import ml_collections
import numpy as np

from genclip_jax.clip.tokenizer import tokenize

# anomalib's ensemble (spec section 1): 7 normal and 4 anomalous states, 21 templates with one
# repeated as the reference repeats it (it weighs twice in the mean).
NORMAL_STATES = (
    "{}", "flawless {}", "perfect {}", "unblemished {}", "{} without flaw", "{} without defect",
    "{} without damage",
)
ANOMALOUS_STATES = ("damaged {}", "{} with flaw", "{} with defect", "{} with damage")
TEMPLATES = (
    "a cropped photo of the {}.", "a close-up photo of a {}.", "a close-up photo of the {}.",
    "a bright photo of a {}.", "a bright photo of the {}.", "a dark photo of the {}.",
    "a dark photo of a {}.", "a jpeg corrupted photo of the {}.",
    "a jpeg corrupted photo of the {}.", "a blurry photo of the {}.", "a blurry photo of a {}.",
    "a photo of a {}.", "a photo of the {}.", "a photo of a small {}.",
    "a photo of the small {}.", "a photo of a large {}.", "a photo of the large {}.",
    "a photo of the {} for visual inspection.", "a photo of a {} for visual inspection.",
    "a photo of the {} for anomaly detection.", "a photo of a {} for anomaly detection.",
)


def ensemble(states: Sequence[str], templates: Sequence[str], class_word: str) -> list[str]:
    """len(states) * len(templates) prompt texts, states outer, templates inner."""
    return [t.format(s.format(class_word)) for s in states for t in templates]


@functools.lru_cache(maxsize=256)
def _ids(states: tuple[str, ...], templates: tuple[str, ...], class_word: str,
         context_length: int) -> np.ndarray:
    try:
        return tokenize(ensemble(states, templates, class_word), context_length=context_length)
    except ValueError:
        pass
    for template in templates:  # name the template and state that overflow
        for state in states:
            text = template.format(state.format(class_word))
            try:
                tokenize(text, context_length=context_length)
            except ValueError:
                raise ValueError(
                    f"class {class_word!r}: the WinCLIP prompt {text!r} (template {template!r}, "
                    f"state {state!r}) needs more than the {context_length} tokens of the text "
                    "context; shorten the class name or that template (winclip.templates)"
                ) from None
    raise AssertionError("unreachable: some prompt did not fit")


def token_ids(
    cfg: ml_collections.ConfigDict, class_word: str, context_length: int
) -> tuple[np.ndarray, np.ndarray]:
    """(normal (Nn, context), anomalous (Na, context)) int32 ids of one class word's ensemble.

    Raises ValueError naming the class, template and state of a prompt that does not fit."""
    templates = tuple(cfg.templates)
    return (_ids(tuple(cfg.normal_states), templates, class_word, context_length),
            _ids(tuple(cfg.anomalous_states), templates, class_word, context_length))
