"""Offline tokenizer that gives the token ids of OpenAI CLIP's text encoder.

The vocabulary is CLIP's byte-level BPE file ``bpe_simple_vocab_16e6.txt.gz`` (MIT licence, see
``LICENSE-CLIP-BPE`` next to it), shipped as package data, so no network access is needed.

Pipeline (the one of OpenAI CLIP):

1. Clean the text: Unicode NFC, HTML-unescape twice, strip, collapse every run of whitespace to
   one space, lower-case. *Difference from CLIP:* CLIP runs ``ftfy.fix_text`` first, which
   besides NFC repairs mojibake, straightens curly quotes, expands ligatures (``ﬁ`` -> ``fi``),
   narrows full-width characters and drops control characters; ftfy is not a dependency here, so
   only its NFC step is reproduced. Text without such characters (prompts, class names) gives
   identical ids.
2. Pre-tokenise with CLIP's pattern ``<|startoftext|>|<|endoftext|>|'s|'t|'re|'ve|'m|'ll|'d|
   [\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+`` (case-insensitive): runs of letters, single digits,
   runs of other non-space symbols, English contractions. It is implemented here by a small
   scanner over unicode general categories (no third-party ``regex`` module needed).
3. Map each piece's UTF-8 bytes to printable unicode characters (the GPT-2 byte map), mark the
   last character with ``</w>`` and merge adjacent symbols by BPE, lowest merge rank first.
4. Look the symbols up in the vocabulary: 256 byte symbols, the same with ``</w>``, one entry per
   merge (the first 49152 - 256 - 2 merges of the file), then ``<|startoftext|>`` (49406) and
   ``<|endoftext|>`` (49407).
"""

from __future__ import annotations

import functools
import gzip
import html
import importlib.resources
import itertools
import re
import unicodedata
from collections.abc import Sequence

import numpy as np

__all__ = [
    "EOT_ID",
    "SOT_ID",
    "ClipTokenizer",
    "default_tokenizer",
    "encode",
    "is_whole_word_token",
    "tokenize",
    "vocab_words",
]

BPE_FILE_NAME = "bpe_simple_vocab_16e6.txt.gz"
SOT_TOKEN = "<|startoftext|>"
EOT_TOKEN = "<|endoftext|>"
SOT_ID = 49406
EOT_ID = 49407
VOCAB_SIZE = 49408
END_OF_WORD = "</w>"
NUM_MERGES = VOCAB_SIZE - 2 * 256 - 2  # 48894 = 49152 - 256 - 2 merges used (file holds more)

_CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")
_WHITESPACE_RUN = re.compile(r"\s+")


def _byte_vocab_order() -> list[int]:
    """The 256 byte values in vocabulary order: printable Latin-1 first, then the rest."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    printable_set = set(printable)
    return printable + [b for b in range(256) if b not in printable_set]


def byte_to_symbol_table() -> list[str]:
    """Printable stand-in character of each byte value (the GPT-2 byte map), indexed by byte.

    Printable Latin-1 bytes ('!'..'~', '¡'..'¬', '®'..'ÿ') stand for themselves; the other 68
    bytes (controls, space, no-break space, soft hyphen) get the code points 256, 257, ... in
    increasing byte order.
    """
    table = [""] * 256
    extra = 0
    for b in _byte_vocab_order():
        if 0x21 <= b <= 0x7E or 0xA1 <= b <= 0xAC or 0xAE <= b <= 0xFF:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def clean_text(text: str) -> str:
    """CLIP's text cleaning, ftfy replaced by NFC: html-unescape (twice), whitespace, lower-case."""
    text = unicodedata.normalize("NFC", text)
    text = html.unescape(html.unescape(text)).strip()
    return _WHITESPACE_RUN.sub(" ", text).strip().lower()


def _category(ch: str) -> str:
    """'L' for letters, 'N' for numbers, ' ' for whitespace, 'O' for anything else."""
    if ch.isspace():
        return " "
    major = unicodedata.category(ch)[0]
    return major if major in ("L", "N") else "O"


def pre_tokenize(text: str) -> list[str]:
    """Split cleaned text like CLIP's regular expression does (leftmost alternative wins).

    Alternatives tried at each position, in order: the two special tokens, the contractions
    (case-insensitive), a maximal run of letters, one number character, a maximal run of
    characters that are neither whitespace, letters nor numbers. Whitespace is skipped.
    """
    pieces: list[str] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        cat = _category(ch)
        if cat == " ":
            i += 1
            continue
        if ch == "<" and text.startswith((SOT_TOKEN, EOT_TOKEN), i):
            special = SOT_TOKEN if text.startswith(SOT_TOKEN, i) else EOT_TOKEN
            pieces.append(special)
            i += len(special)
            continue
        if ch == "'":
            match = next((c for c in _CONTRACTIONS if text[i : i + len(c)].lower() == c), None)
            if match is not None:
                pieces.append(text[i : i + len(match)])
                i += len(match)
                continue
        if cat == "N":
            pieces.append(ch)
            i += 1
            continue
        j = i + 1
        while j < n and _category(text[j]) == cat:
            j += 1
        pieces.append(text[i:j])
        i = j
    return pieces


def _read_merges() -> list[tuple[str, str]]:
    resource = importlib.resources.files("genclip_jax.clip").joinpath(BPE_FILE_NAME)
    try:
        with resource.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
    except FileNotFoundError as err:
        raise FileNotFoundError(
            f"CLIP BPE vocabulary {BPE_FILE_NAME} is missing from the genclip_jax.clip package "
            f"data (expected at {resource}); reinstall the package"
        ) from err
    merge_lines = lines[1 : 1 + NUM_MERGES]
    merges = []
    for lineno, line in enumerate(merge_lines, start=2):
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"{BPE_FILE_NAME} line {lineno}: expected a merge 'a b', got {line!r}")
        merges.append((parts[0], parts[1]))
    if len(merges) != NUM_MERGES:
        raise ValueError(
            f"{BPE_FILE_NAME}: expected at least {NUM_MERGES} merges, got {len(merges)}"
        )
    return merges


class ClipTokenizer:
    """Byte-level BPE tokenizer with CLIP's vocabulary (ids identical to OpenAI CLIP).

    Args:
        merges: ordered BPE merges; default: the first 48894 merges of CLIP's file.
    """

    def __init__(self, merges: Sequence[tuple[str, str]] | None = None):
        if merges is None:
            merges = _read_merges()
        self.merges = list(merges)
        self.byte_to_symbol = byte_to_symbol_table()
        symbols = [self.byte_to_symbol[b] for b in _byte_vocab_order()]
        words = symbols + [s + END_OF_WORD for s in symbols]
        words += [a + b for a, b in self.merges]
        words += [SOT_TOKEN, EOT_TOKEN]
        self.words: tuple[str, ...] = tuple(words)
        self.word_to_id: dict[str, int] = {w: i for i, w in enumerate(self.words)}
        if len(self.word_to_id) != len(self.words):
            raise ValueError("CLIP vocabulary: merges produce duplicate vocabulary entries")
        self.merge_rank: dict[tuple[str, str], int] = {m: i for i, m in enumerate(self.merges)}
        self.sot_id = self.word_to_id[SOT_TOKEN]
        self.eot_id = self.word_to_id[EOT_TOKEN]
        # Per-instance cache (a method decorated with lru_cache would keep `self` alive).
        self.bpe = functools.lru_cache(maxsize=65536)(self._bpe)

    def _bpe(self, piece: str) -> tuple[str, ...]:
        """BPE symbols of one pre-tokenised piece, given as byte symbols (see ``encode``).

        The last symbol carries the ``</w>`` end-of-word mark. Repeatedly, the adjacent pair
        with the lowest merge rank is merged everywhere (left to right, non-overlapping) until
        no adjacent pair is a known merge.
        """
        if piece in (SOT_TOKEN, EOT_TOKEN):
            return (piece,)
        word = [*piece[:-1], piece[-1] + END_OF_WORD]
        rank = self.merge_rank
        while len(word) > 1:
            best = min(
                itertools.pairwise(word),
                key=lambda pair: rank.get(pair, NUM_MERGES + 1),
            )
            if best not in rank:
                break
            first, second = best
            merged: list[str] = []
            i = 0
            while i < len(word):
                if i < len(word) - 1 and word[i] == first and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        return tuple(word)

    def pieces(self, text: str) -> list[str]:
        """Cleaned, pre-tokenised text as byte-symbol strings (input of ``bpe``)."""
        out = []
        for piece in pre_tokenize(clean_text(text)):
            if piece in (SOT_TOKEN, EOT_TOKEN):
                out.append(piece)
            else:
                out.append("".join(self.byte_to_symbol[b] for b in piece.encode("utf-8")))
        return out

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without the start/end tokens."""
        if not isinstance(text, str):
            raise ValueError(f"encode: expected a str, got {type(text).__name__}: {text!r}")
        return [self.word_to_id[s] for piece in self.pieces(text) for s in self.bpe(piece)]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of token ids (SOT skipped, stops at EOT); lossy (cleaning), for debugging."""
        symbol_to_byte = {s: b for b, s in enumerate(self.byte_to_symbol)}
        symbols = []
        for i in ids:
            if int(i) == self.eot_id:
                break
            if int(i) != self.sot_id:
                symbols.append(self.words[int(i)])
        words = "".join(symbols).split(END_OF_WORD)
        data = b" ".join(bytes(symbol_to_byte[c] for c in w) for w in words)
        return data.decode("utf-8", errors="replace").strip()

    def is_whole_word_token(self, word: str) -> bool:
        """Whether ``word`` (after CLIP's cleaning, i.e. lower-cased) is ONE token ``word</w>``."""
        symbols = [s for piece in self.pieces(word) for s in self.bpe(piece)]
        return len(symbols) == 1 and symbols[0].endswith(END_OF_WORD)

    def tokenize(
        self, texts: str | Sequence[str], context_length: int = 77, truncate: bool = False
    ) -> np.ndarray:
        """Ids ``[SOT, ..., EOT, 0, ...]`` of each text, int32 array (N, context_length).

        Raises ValueError if a text needs more than ``context_length`` tokens (SOT and EOT
        included) unless ``truncate``, which keeps the first ``context_length - 1`` tokens and
        puts EOT last.
        """
        if isinstance(texts, str):
            texts = [texts]
        if context_length < 2:
            raise ValueError(f"tokenize: context_length must be >= 2, got {context_length}")
        out = np.zeros((len(texts), context_length), dtype=np.int32)
        for row, text in enumerate(texts):
            ids = [self.sot_id, *self.encode(text), self.eot_id]
            if len(ids) > context_length:
                if not truncate:
                    raise ValueError(
                        f"tokenize: text {text!r} needs {len(ids)} tokens (SOT and EOT "
                        f"included), more than context_length={context_length}; shorten it "
                        "or pass truncate=True"
                    )
                ids = [*ids[: context_length - 1], self.eot_id]
            out[row, : len(ids)] = ids
        return out


@functools.lru_cache(maxsize=1)
def default_tokenizer() -> ClipTokenizer:
    """The shared tokenizer built from the packaged CLIP vocabulary (built once, ~0.3 s)."""
    return ClipTokenizer()


def tokenize(
    texts: str | Sequence[str], context_length: int = 77, truncate: bool = False
) -> np.ndarray:
    """OpenAI CLIP token ids, int32 (N, context_length); see ``ClipTokenizer.tokenize``."""
    return default_tokenizer().tokenize(texts, context_length=context_length, truncate=truncate)


def encode(text: str) -> list[int]:
    """OpenAI CLIP token ids of ``text`` without SOT/EOT."""
    return default_tokenizer().encode(text)


def vocab_words() -> tuple[str, ...]:
    """The 49408 vocabulary entries in id order (byte-symbol strings, ``</w>`` marks word ends)."""
    return default_tokenizer().words


def is_whole_word_token(word: str) -> bool:
    """Whether CLIP encodes ``word`` as the single whole-word token ``word</w>``."""
    return default_tokenizer().is_whole_word_token(word)
