"""Highlighting decodes tokens in runs that form whole characters (shared by the CLI and the report)."""

from __future__ import annotations

import pytest

from directer.models import load_tokenizer
from directer.pieces import steered_pieces


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("smollm2-135m")


@pytest.mark.parametrize(
    "text",
    ["ಕನ್ನಡದಲ್ಲಿ ಉತ್ತರಿಸಿ", "海についての俳句", "हिंदी में उत्तर दें", "English with an emoji 🌊"],
)
def test_pieces_are_whole_characters_and_join_to_the_text(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)  # one token alone decodes to U+FFFD
    pieces = steered_pieces(tokenizer, [(i, False) for i in ids])
    assert "".join(piece for piece, _ in pieces) == text
    assert not any("\ufffd" in piece for piece, _ in pieces)


def test_a_run_is_steered_when_any_of_its_tokens_was(tokenizer):
    ids = tokenizer.encode("海", add_special_tokens=False)
    assert len(ids) > 1  # one character over several byte-level tokens
    changed = [False] * len(ids)
    changed[-1] = True
    assert steered_pieces(tokenizer, list(zip(ids, changed))) == [("海", True)]
    eos = tokenizer.eos_token_id
    assert steered_pieces(tokenizer, [(eos, True)]) == []
