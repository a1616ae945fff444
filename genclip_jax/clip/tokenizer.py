"""OpenAI CLIP's tokenizer on the `tokenizers` library, over the shipped vocabulary.

The vocabulary is CLIP's byte-level BPE file ``bpe_simple_vocab_16e6.txt.gz`` (MIT licence, see
``LICENSE-CLIP-BPE`` next to it), shipped as package data: no network access is needed. The ids
are OpenAI CLIP's: text cleaned as CLIP does (its ``ftfy.fix_text`` reduced to Unicode NFC, as
ftfy is no dependency: prompts and class names are unaffected), split by CLIP's pattern, each
piece's bytes mapped to the GPT-2 byte alphabet, then BPE with ``</w>`` marking a word's end.
The special pieces ``<|startoftext|>`` / ``<|endoftext|>`` map to their ids where CLIP's pattern
cuts them out (in "hi<|endoftext|>", not in "!<|endoftext|>").
"""

from __future__ import annotations

import functools
import gzip
import html
import importlib.resources
import re
import unicodedata
from collections.abc import Sequence

import numpy as np
import tokenizers

BPE_FILE_NAME = "bpe_simple_vocab_16e6.txt.gz"
SOT_TOKEN, EOT_TOKEN = "<|startoftext|>", "<|endoftext|>"
SOT_ID, EOT_ID = 49406, 49407
NUM_MERGES = 49152 - 256 - 2  # the merges CLIP uses (the file holds more)
END_OF_WORD = "</w>"
PATTERN = (r"(?i)<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|"
           r"[^\s\p{L}\p{N}]+")
_WHITESPACE_RUN = re.compile(r"\s+")


def clean_text(text: str) -> str:
    """CLIP's cleaning with ftfy reduced to NFC: html-unescape twice, whitespace, lower-case."""
    text = html.unescape(html.unescape(unicodedata.normalize("NFC", text)))
    return _WHITESPACE_RUN.sub(" ", text).strip().lower()


def _merges() -> list[tuple[str, str]]:
    resource = importlib.resources.files("genclip_jax.clip").joinpath(BPE_FILE_NAME)
    try:
        with resource.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")[1 : 1 + NUM_MERGES]  # line 1 is a version comment
    except FileNotFoundError as err:
        raise FileNotFoundError(f"CLIP BPE vocabulary {BPE_FILE_NAME} is missing from the "
                                f"genclip_jax.clip package data (expected at {resource}); "
                                "reinstall the package") from err
    merges = [tuple(line.split()) for line in lines]
    bad = next((i for i, m in enumerate(merges) if len(m) != 2), None)
    if bad is not None or len(merges) != NUM_MERGES:
        where = f"line {bad + 2}: expected a merge 'a b'" if bad is not None else (
            f"expected {NUM_MERGES} merges, got {len(merges)}")
        raise ValueError(f"{BPE_FILE_NAME} {where}")
    return merges


@functools.cache
def _bpe() -> tokenizers.Tokenizer:
    """BPE over CLIP's vocabulary: byte symbols, the same with </w>, one word per merge, SOT,
    EOT; in the byte map's order (printable Latin-1 first, the other bytes from chr(256))."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    symbols = [chr(b) for b in printable] + [chr(256 + i) for i in range(256 - len(printable))]
    merges = _merges()
    words = [*symbols, *(s + END_OF_WORD for s in symbols), *("".join(m) for m in merges),
             SOT_TOKEN, EOT_TOKEN]
    model = tokenizers.models.BPE(vocab={w: i for i, w in enumerate(words)}, merges=merges,
                                  end_of_word_suffix=END_OF_WORD, continuing_subword_prefix="")
    bpe = tokenizers.Tokenizer(model)
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                            use_regex=False)
    return bpe


_split = tokenizers.pre_tokenizers.Split(tokenizers.Regex(PATTERN), behavior="removed",
                                         invert=True)


def _encoded(text: str) -> list[tuple[int, str]]:
    """(id, BPE symbol) of each token of `text`, without the start/end tokens."""
    if not isinstance(text, str):
        raise ValueError(f"encode: expected a str, got {type(text).__name__}: {text!r}")
    pieces = [p for p, _ in _split.pre_tokenize_str(clean_text(text))]
    out: list[tuple[int, str]] = []
    start = 0
    for end in [*(i for i, p in enumerate(pieces) if p in (SOT_TOKEN, EOT_TOKEN)), len(pieces)]:
        if start < end:
            enc = _bpe().encode(pieces[start:end], is_pretokenized=True, add_special_tokens=False)
            out += zip(enc.ids, enc.tokens, strict=True)
        if end < len(pieces):
            out.append((SOT_ID if pieces[end] == SOT_TOKEN else EOT_ID, pieces[end]))
        start = end + 1
    return out


def encode(text: str) -> list[int]:
    """OpenAI CLIP token ids of `text` without the start/end tokens."""
    return [i for i, _ in _encoded(text)]


def tokens(text: str) -> list[str]:
    """The BPE symbols of `text` (byte-alphabet strings, ``</w>`` ending a word)."""
    return [s for _, s in _encoded(text)]


def is_whole_word_token(word: str) -> bool:
    """Whether CLIP encodes `word` (lower-cased) as the single whole-word token ``word</w>``."""
    symbols = tokens(word)
    return len(symbols) == 1 and symbols[0].endswith(END_OF_WORD)


def tokenize(
    texts: str | Sequence[str], context_length: int = 77, truncate: bool = False
) -> np.ndarray:
    """int32 (N, context_length) ids ``[SOT, ..., EOT, 0, ...]`` of each text.

    A text longer than `context_length` tokens (SOT and EOT included) is an error unless
    `truncate`, which keeps the first `context_length - 1` and puts EOT last.
    """
    texts = [texts] if isinstance(texts, str) else list(texts)
    if context_length < 2:
        raise ValueError(f"tokenize: context_length must be >= 2, got {context_length}")
    out = np.zeros((len(texts), context_length), np.int32)
    for row, text in enumerate(texts):
        ids = [SOT_ID, *encode(text), EOT_ID]
        if len(ids) > context_length:
            if not truncate:
                raise ValueError(f"tokenize: text {text!r} needs {len(ids)} tokens (SOT and EOT "
                                 f"included), more than context_length={context_length}; "
                                 "shorten it or pass truncate=True")
            ids = [*ids[: context_length - 1], EOT_ID]
        out[row, : len(ids)] = ids
    return out
