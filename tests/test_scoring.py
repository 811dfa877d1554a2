"""IFEval scoring with lm-eval's checkers, offline, on hand-written responses with known verdicts."""

from __future__ import annotations

import pytest

from directer.scoring import ensure_punkt, score_response


def test_punkt_is_available_offline():
    folder = ensure_punkt()
    assert all((folder / name).is_file() for name in ("abbrev_types.txt", "sent_starters.txt", "ortho_context.tab"))
    from nltk.tokenize import sent_tokenize

    assert sent_tokenize("Dr. Smith arrived at 5 p.m. He was late.") == ["Dr. Smith arrived at 5 p.m.", "He was late."]


@pytest.mark.parametrize(
    ("instruction", "kwargs", "response", "strict"),
    [
        ("change_case:english_capital", {}, "THE SEA IS WIDE AND DEEP.", True),
        ("change_case:english_capital", {}, "The sea is wide.", False),
        ("change_case:english_lowercase", {}, "the sea is wide.", True),
        ("punctuation:no_comma", {}, "No commas here at all.", True),
        ("punctuation:no_comma", {}, "One, two.", False),
        ("length_constraints:number_words", {"relation": "less than", "num_words": 5}, "Three short words", True),
        ("length_constraints:number_words", {"relation": "at least", "num_words": 5}, "Too short", False),
        (
            "length_constraints:number_sentences",
            {"relation": "less than", "num_sentences": 3},
            "One. Two. Three.",
            False,
        ),
        (
            "length_constraints:number_sentences",
            {"relation": "less than", "num_sentences": 3},
            "Mr. Li came. He sat.",
            True,
        ),
        ("detectable_format:title", {}, "<<A Title>>\nBody text.", True),
        ("detectable_format:title", {}, "A Title\nBody text.", False),
        ("detectable_format:json_format", {}, '{"a": 1}', True),
        ("detectable_format:json_format", {}, "a: 1", False),
        ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* one\n* two", True),
        ("detectable_format:number_bullet_lists", {"num_bullets": 3}, "* one\n* two", False),
        ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Hello.\n\nP.S. Bye.", True),
        ("startend:end_checker", {"end_phrase": "Any questions?"}, "Here it is. Any questions?", True),
        ("startend:quotation", {}, '"Wrapped in quotes."', True),
        ("keywords:existence", {"keywords": ["owl", "moon"]}, "An owl under the moon.", True),
        ("keywords:forbidden_words", {"forbidden_words": ["rain"]}, "It will rain today.", False),
        (
            "language:response_language",
            {"language": "fr"},
            "Bonjour, je suis très content de vous voir aujourd'hui.",
            True,
        ),
        ("language:response_language", {"language": "fr"}, "Hello, I am very happy to see you today.", False),
    ],
)
def test_known_verdicts(instruction, kwargs, response, strict):
    verdict = score_response("A prompt.", [instruction], [kwargs], response)
    assert verdict.strict == [strict]
    assert verdict.prompt_strict is strict


def test_loose_forgives_a_leading_line_and_markdown():
    verdict = score_response("Answer.", ["startend:quotation"], "[{}]", 'Sure, here you go:\n"Wrapped."')
    assert verdict.strict == [False] and verdict.loose == [True]


def test_prompt_level_needs_every_instruction():
    verdict = score_response(
        "Answer.", ["change_case:english_lowercase", "punctuation:no_comma"], [{}, {}], "all lowercase, with a comma"
    )
    assert verdict.strict == [True, False] and not verdict.prompt_strict


def test_the_language_check_gives_one_verdict_per_response():
    """langdetect samples; unseeded, this response (seen in a full IFEval run) was English in one run and
    French in the next."""
    numbers = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven")
    response = "".join(f"* Bullet point {n}.\n" for n in (*numbers, *["twelve"] * 10)) + "* Bullet"
    verdicts = {
        score_response("Answer in English.", ["language:response_language"], [{"language": "en"}], response).strict[0]
        for _ in range(30)
    }
    assert len(verdicts) == 1
