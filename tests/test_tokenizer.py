"""CLIP tokenizer: known ids, padding, length errors, cross-check with transformers."""

import json
import pathlib

import numpy as np
import pytest
import tokenizers

from genclip_jax.clip import tokenizer as tok

SOT, EOT = 49406, 49407

# CLIP's pre-tokenisation pattern (a fact of the format), used to build independent references.
CLIP_PATTERN = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"""
    r"""[^\s\p{L}\p{N}]+"""
)

VARIED_TEXTS = [
    "a photo of a damaged object.",
    "A PHOTO of a Flawless Bottle!!",
    "it's, they're, we've, I'm, you'll, he'd, don't, O'Neil's",
    "I'M SHOUTING: IT'S LOUD, DON'T",
    "metal_nut screw-thread zipper/toothbrush (pcb1) [pcb4] {candle}",
    "1234567890 3.14159 -42 +7 1e-5 0x1F 50% $9.99 #1",
    "hello   world \t tab\nnewline   ",
    "naïve café résumé façade Ångström coöperate",
    "日本語のテキスト 中文 한국어",
    "emoji 😀🎉👍🏽 and ✓ ✗ ★ → ←",
    "Привет мир, Ελληνικά, עברית, العربية",
    "x² ½ ⅓ Ⅻ ① ٣ ۴ १२",
    "quotes “curly” ‘single’ «guillemets» – — …",
    "a'b 'quoted' ''double'' 'tis' rock'n'roll",
    "&amp; &lt;tag&gt; &quot;q&quot; &#39;",
    "<|startoftext|>hi<|endoftext|> !<|endoftext|>",
    "sub-word-heavy: antidisestablishmentarianism supercalifragilistic",
    "tabs\tand\u00a0nbsp\u2003em-space",
    "mixed123abc456 a1b2c3 99bottles",
    "pill capsules hazelnut transistor wood carpet grid leather tile",
    "macaroni1 macaroni2 pcb1 pcb2 pcb3 pcb4 pipe_fryum chewinggum fryum cashew candle",
    "____ .... ,,,, !!?? ;; :: -- ++ == ** ~~ ^^ `` || \\\\ //",
    "ﬁnance ligature ß straße ǅ ǈ",
    "combining e\u0301 a\u0308 n\u0303",
    "zero\u200bwidth\u200djoiner",
    "control\x01chars\x7f",
    "a" * 40,
    "x" * 3 + " " + "y" * 100,
    "The quick brown fox jumps over the lazy dog. THE QUICK BROWN FOX.",
    "",
    "   ",
]


def test_known_ids():
    ids = tok.tokenize("a photo of a damaged object.")
    assert ids.dtype == np.int32 and ids.shape == (1, 77)
    assert ids[0, :9].tolist() == [SOT, 320, 1125, 539, 320, 13568, 14115, 269, EOT]
    assert not ids[0, 9:].any()


def test_anomalyclip_prompt_ids():
    ids = tok.tokenize(
        ["X X X X X X X X X X X X object.", "X X X X X X X X X X X X damaged object."]
    )
    assert ids[0, :16].tolist() == [SOT] + [343] * 12 + [14115, 269, EOT]
    assert ids[1, :17].tolist() == [SOT] + [343] * 12 + [13568, 14115, 269, EOT]
    assert int(ids[0].argmax()) == 15 and int(ids[1].argmax()) == 16
    assert not ids[0, 16:].any() and not ids[1, 17:].any()


def test_encode_without_specials():
    assert tok.encode("a photo of a damaged object.") == [320, 1125, 539, 320, 13568, 14115, 269]
    assert tok.encode("") == []


def test_matches_fixture_tokens():
    from fixtures import fixture_paths, load_fixture

    for path in fixture_paths():
        arrays = load_fixture(path)
        ids = tok.tokenize(
            ["X X X X X X X X X X X X object.", "X X X X X X X X X X X X damaged object."]
        )
        np.testing.assert_array_equal(ids[0], arrays["tokens.normal"][0])
        np.testing.assert_array_equal(ids[1], arrays["tokens.abnormal"][0])


def test_padding_and_shapes():
    ids = tok.tokenize(["a", "a b c"], context_length=10)
    assert ids.shape == (2, 10) and ids.dtype == np.int32
    assert ids[0].tolist() == [SOT, 320, EOT] + [0] * 7
    assert ids[1, 4] == EOT and not ids[1, 5:].any()
    assert tok.tokenize([]).shape == (0, 77)
    assert tok.tokenize("").tolist()[0][:3] == [SOT, EOT, 0]


def test_too_long_raises_and_truncates():
    text = " ".join(["word"] * 80)
    with pytest.raises(ValueError, match=r"needs 82 tokens.*context_length=77") as err:
        tok.tokenize(["fine", text])
    assert "word word" in str(err.value)
    ids = tok.tokenize(text, truncate=True)
    assert ids.shape == (1, 77) and ids[0, 0] == SOT and ids[0, -1] == EOT
    assert (ids[0, 1:-1] == tok.encode("word")[0]).all()
    exact = " ".join(["word"] * 75)  # 75 + 2 = 77 tokens: fits exactly
    assert tok.tokenize(exact)[0, -1] == EOT
    with pytest.raises(ValueError, match="76"):
        tok.tokenize(exact, context_length=76)


def test_whole_word_tokens():
    assert tok.tokens("a") == ["a</w>"] and tok.encode("a") == [320]
    assert tok.tokens("<|startoftext|>x<|endoftext|>") == ["<|startoftext|>", "x</w>",
                                                          "<|endoftext|>"]
    assert tok.is_whole_word_token("bottle") and tok.is_whole_word_token("Bottle")
    assert tok.is_whole_word_token("screw")
    assert not tok.is_whole_word_token("metal_nut")  # metal, _, nut
    assert not tok.is_whole_word_token("pcb1")  # digits are separate tokens
    assert not tok.is_whole_word_token("toothbrush head")
    assert not tok.is_whole_word_token("antidisestablishmentarianism")
    assert not tok.is_whole_word_token("")


def test_nfc_cleaning():
    assert tok.encode("cafe\u0301") == tok.encode("caf\u00e9")
    assert tok.clean_text("  A&amp;amp;B\t\n C  ") == "a&b c"


def test_bad_input_names_the_type():
    with pytest.raises(ValueError, match="expected a str, got int"):
        tok.encode(3)


def test_ids_and_symbols_match_the_pinned_ones():
    """The ids the hand-written BPE gave (checked against OpenAI's pattern, `tokenizers` and
    transformers) for texts with html, specials, non-Latin scripts, digits and symbols."""
    golden = json.loads((pathlib.Path(__file__).parent / "data" / "clip_tokenizer_ids.json")
                        .read_text(encoding="utf-8"))["texts"]
    assert {e["text"] for e in golden} >= set(VARIED_TEXTS)
    for entry in golden:
        assert tok.encode(entry["text"]) == entry["ids"], entry["text"]
        assert tok.tokens(entry["text"]) == entry["tokens"], entry["text"]


def test_pattern_splits_like_the_regex_module():
    """The Oniguruma pattern `tokenizers` runs cuts text as CLIP's `regex` pattern does."""
    import regex

    pattern = regex.compile(CLIP_PATTERN, regex.IGNORECASE)
    split = tokenizers.pre_tokenizers.Split(tokenizers.Regex(tok.PATTERN), "removed", invert=True)
    for text in VARIED_TEXTS:
        cleaned = tok.clean_text(text)
        assert [p for p, _ in split.pre_tokenize_str(cleaned)] == pattern.findall(cleaned), text


def test_special_token_text_follows_clip_regex():
    assert tok.encode("<|startoftext|>hi<|endoftext|>") == [SOT, 1883, EOT]
    # "!<|" is one punctuation run for CLIP's pattern, so the special is not recognised here
    expected = tok.encode("!<|") + tok.encode("endoftext") + tok.encode("|>")
    assert tok.encode("!<|endoftext|>") == expected
    assert EOT not in expected


def test_cross_check_transformers_fast(tmp_path):
    import transformers

    tok._bpe().model.save(str(tmp_path))  # vocab.json, merges.txt
    hf = transformers.CLIPTokenizerFast.from_pretrained(str(tmp_path))
    compared = 0
    for text in VARIED_TEXTS:
        # HF's fast CLIP tokenizer does not html-unescape and cuts specials out first: compare
        # only where both agree.
        if "&" in text or "<|" in text:
            continue
        ids = hf(text, padding="max_length", max_length=77, truncation=True)["input_ids"]
        ours = tok.tokenize(text, truncate=True)[0]
        # HF pads with EOT instead of 0: compare up to and including the first EOT.
        n = int(np.argmax(ours == EOT)) + 1
        assert ids[:n] == ours[:n].tolist(), (text, ids[:n], ours[:n].tolist())
        compared += 1
    assert compared >= 20
