"""Byte-level BPE via `tokenizers`: round trips on hard strings, specials, save/load, errors."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.tokenizer import EOT, PAD, load_tokenizer, train_tokenizer

HARD = ["", " ", "   leading and trailing   ", "\n\n\t\r\n", "12345678901234567890", "don't I'll WE'RE",
        "emoji 👩‍👩‍👧‍👦 🚀", "中文字符 日本語 한국어", "مرحبا بالعالم", "def f(x):\n    return x  # code",
        "a" * 500, "\u0000 \uffff"]


@pytest.mark.parametrize("text", HARD)
def test_round_trip_hard_strings(story_tokenizer, text):
    ids = story_tokenizer.encode(text, add_special_tokens=False)
    assert story_tokenizer.decode(ids) == text


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_round_trip_any_unicode(story_tokenizer, text):
    assert story_tokenizer.decode(story_tokenizer.encode(text, add_special_tokens=False)) == text


def test_specials_and_vocab(story_tokenizer):
    assert len(story_tokenizer) == 400
    assert story_tokenizer.eos_token == EOT and story_tokenizer.pad_token == PAD
    ids = story_tokenizer.encode(f"Mia{EOT}Tom", add_special_tokens=False)
    assert story_tokenizer.eos_token_id in ids
    # story words become single tokens with their leading space
    assert len(story_tokenizer.tokenize(" had")) == 1   # a frequent story word is one token, leading space included


def test_save_and_load(tmp_path, story_tokenizer):
    story_tokenizer.save_pretrained(tmp_path)
    tok = load_tokenizer(tmp_path)
    text = "Once upon a time, there was a tiny fox named Kai."
    assert tok.encode(text) == story_tokenizer.encode(text)
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "missing")


def test_bad_arguments():
    with pytest.raises(ValueError, match="vocab_size must be an int >= 258"):
        train_tokenizer(["abc"], 100)
    with pytest.raises(TypeError, match="not one string"):
        train_tokenizer("abc", 300)
