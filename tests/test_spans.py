"""Instruction spans: every row form, errors, several tokenizers, and automatic detection on IFEval."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from directer.ifeval import literal_coverage, load_ifeval
from directer.prompts import PromptError, SpanError, build_prompt, prompt_from_row
from directer.spans import DETECTOR, character_scores, find_instruction_spans

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def trained(kind: str, texts: list[str]) -> PreTrainedTokenizerFast:
    """A small real tokenizer of the given kind, trained here on IFEval's prompts."""
    specials = ["<unk>", "<s>", "</s>", "<|user|>", "<|system|>", "<|assistant|>"]
    if kind == "byte-bpe":
        tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=600, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        )
    elif kind == "wordpiece":
        tokenizer = Tokenizer(models.WordPiece(unk_token="<unk>"))
        tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tokenizer.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=600, special_tokens=specials)
    else:
        tokenizer = Tokenizer(models.Unigram())
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
        tokenizer.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(vocab_size=400, special_tokens=specials, unk_token="<unk>")
    tokenizer.train_from_iterator(texts, trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    wrapped.chat_template = TEMPLATE
    return wrapped


@pytest.fixture(scope="module", params=["smollm2", "byte-bpe", "wordpiece", "unigram"])
def tokenizer(request, ifeval_rows):
    if request.param == "smollm2":
        return request.getfixturevalue("smollm2").tokenizer
    return trained(request.param, [row["prompt"] for row in ifeval_rows])


def assert_tokens_cover(prompt, tokenizer):
    """Steered tokens are exactly those whose characters overlap a span."""
    offsets = tokenizer(prompt.text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    overlapping = [
        i
        for i, (a, b) in enumerate(offsets)
        if b > a and any(a < end and b > start for start, end in prompt.char_spans)
    ]
    assert prompt.span == overlapping and prompt.span
    first, last = offsets[prompt.span[0]], offsets[prompt.span[-1]]
    for start, end in prompt.char_spans:
        assert first[0] <= start and end <= last[1]


def test_instruction_substring(tokenizer):
    row = {
        "prompt": "Write about owls. Use exactly two sentences. Use exactly two sentences.",
        "instruction": "Use exactly two sentences.",
    }
    prompt = prompt_from_row(tokenizer, row)
    assert prompt.span_source == "instruction"
    assert [prompt.text[a:b] for a, b in prompt.char_spans] == ["Use exactly two sentences."]
    assert prompt.char_spans[0][0] < prompt.text.rfind("Use exactly")  # the first occurrence
    assert_tokens_cover(prompt, tokenizer)


def test_several_character_spans(tokenizer):
    message = "Answer in French. Describe Lyon. Do not use commas."
    prompt = prompt_from_row(tokenizer, {"prompt": message, "instruction_spans": [[33, 51], [0, 17]]})
    assert [prompt.text[a:b] for a, b in prompt.char_spans] == ["Answer in French.", "Do not use commas."]
    assert prompt.span_source == "instruction_spans"
    assert_tokens_cover(prompt, tokenizer)


def test_task_and_instruction_columns(tokenizer):
    prompt = prompt_from_row(tokenizer, {"task": "Describe a harbour.", "instruction": "Answer in lowercase."})
    assert "Describe a harbour.\n\nAnswer in lowercase." in prompt.text
    assert prompt.span_source == "task"
    assert [prompt.text[a:b] for a, b in prompt.char_spans] == ["Answer in lowercase."]
    assert_tokens_cover(prompt, tokenizer)


def test_messages_steer_the_last_user_message_or_a_system_message(tokenizer):
    messages = [
        {"role": "system", "content": "Always answer in French."},
        {"role": "user", "content": "Name a fruit. Be brief."},
        {"role": "assistant", "content": "Pomme."},
        {"role": "user", "content": "Name a tree. Be brief."},
    ]
    in_user = prompt_from_row(tokenizer, {"messages": messages, "instruction": "Be brief."})
    assert in_user.char_spans[0][0] > in_user.text.index("Name a tree")
    in_system = prompt_from_row(tokenizer, {"messages": messages, "instruction": "Always answer in French."})
    assert in_system.text[slice(*in_system.char_spans[0])] == "Always answer in French."
    spans = prompt_from_row(tokenizer, {"messages": messages, "instruction_spans": [[13, 22]]})
    assert spans.text[slice(*spans.char_spans[0])] == "Be brief." and spans.char_spans[0][0] > spans.text.index("Pomme")
    for prompt in (in_user, in_system, spans):
        assert_tokens_cover(prompt, tokenizer)


def test_no_instruction_detects_or_steers_nothing(smollm2):
    row = {"prompt": "Tell me about Mars. Your answer must contain exactly 3 bullet points."}
    detected = prompt_from_row(smollm2.tokenizer, row, spans="auto")
    assert detected.span_source == "auto"
    assert [detected.text[a:b] for a, b in detected.char_spans] == ["Your answer must contain exactly 3 bullet points."]
    nothing = prompt_from_row(smollm2.tokenizer, row, spans="none")
    assert nothing.span == [] and nothing.span_source == "none"


@pytest.mark.parametrize(
    ("row", "field", "problem"),
    [
        ({"prompt": "Hi there.", "instruction_spans": [[0, 40]]}, "instruction_spans", "outside the prompt"),
        ({"prompt": "Hi there.", "instruction_spans": [[3, 3]]}, "instruction_spans", "empty"),
        ({"prompt": "Hi there.", "instruction_spans": [[0, 5], [2, 7]]}, "instruction_spans", "overlap"),
        ({"prompt": "Hi there.", "instruction_spans": [[0, "x"]]}, "instruction_spans", "pair of integers"),
        ({"prompt": "Hi there.", "instruction_spans": "0-3"}, "instruction_spans", "expected a list"),
        ({"prompt": "Hi.", "instruction": "Be brief.", "instruction_spans": [[0, 2]]}, "instruction", "not both"),
        ({"prompt": "Hi.", "instruction": 7}, "instruction", "expected a string, got int"),
        ({"prompt": 12}, "prompt", "expected a string, got int"),
        ({"task": "Describe Rome."}, "instruction", "a task needs an instruction"),
        ({"messages": [{"role": "user"}]}, "messages", "not a {role, content} pair"),
        ({"messages": "hello"}, "messages", "expected a list"),
    ],
)
def test_invalid_rows_name_their_field(smollm2, row, field, problem):
    with pytest.raises(PromptError) as raised:
        prompt_from_row(smollm2.tokenizer, row)
    assert raised.value.field == field and problem in str(raised.value)
    assert str(raised.value).startswith(f"{field}: ")


def test_build_prompt_rejects_missing_instruction(smollm2):
    with pytest.raises(SpanError, match="instruction: 'Respond in Latin.' is not in the prompt"):
        build_prompt(smollm2.tokenizer, "Write a poem.", instruction="Respond in Latin.")


def test_detection_quality_on_ifeval():
    rows = load_ifeval(spans="gold")
    detected = [find_instruction_spans(row["prompt"]) for row in rows]
    precision, recall = character_scores(
        [row["prompt"] for row in rows], detected, [[tuple(s) for s in row["instruction_spans"]] for row in rows]
    )
    assert precision >= 0.85 and recall >= 0.85, (precision, recall)


FAMILY_CASES = {  # family: prompt, its spans marked [[...]] (written for this test, not trained on)
    "count-words": "Tell me why bread goes stale. [[Don't go past forty words.]]",
    "count-sentences": "Summarise the plot of Hamlet [[in three sentences at most.]]",
    "count-items": "I'm packing for a ski trip. [[Give me exactly five items, no more.]]",
    "count-paragraphs": "Write to my landlord about the broken heater. [[Two paragraphs will do.]]",
    "position-start": "[[Open your reply with the word 'Honestly'.]] Should I learn piano or guitar first?",
    "position-end": "Explain how a vaccine works and [[finish with a question for the reader.]]",
    "template": "Rate this movie idea: a heist on the moon. [[Reply in the form:\nScore: <1-10>\nWhy: <one line>]]",
    "word-length": "Describe a thunderstorm [[using no word longer than five letters.]]",
    "word-start": "Write a slogan for a bakery [[where all the words begin with the letter b.]]",
    "alliteration": "Make up a name for a pet snail. [[It should be alliterative.]]",
    "letter-avoid": "Describe the ocean [[without ever using the letter a.]]",
    "letter-count": "Write a tongue twister. [[The letter k should show up at least six times.]]",
    "line-end-emoji": "Give me four reasons to drink water, [[one per line, each ending with an emoji.]]",
    "one-word-per-line": "Write a poem about silence [[with only one word on each line.]]",
    "sentence-start": "Describe your ideal weekend. [[Every sentence must begin with 'I'.]]",
    "copy": "My question is: what makes a good leader? [[Repeat my question word for word before answering it.]]",
    "list-draw": "Plan a three-course dinner [[using only these ingredients: rice, eggs, spinach, lemons and garlic.]]",
    "options": "How was the service at the cafe, judging by this note: 'slow but friendly'? "
    "[[Answer with one word from: good, mixed, bad.]]",
    "constraint-in-middle": "I run a small bookshop. [[Keep everything under 100 words.]] "
    "Write a welcome sign for the door.",
    "long-clause": "Write a cover letter for a barista job, [[making sure it mentions my latte art, keeps a warm tone "
    "and ends with my name, Priya.]]",
    "no-break": "give me a riddle about clocks [[no longer than two lines]]",
    "language": "What is a good way to say thank you to a neighbour? [[Reply in Italian.]]",
    "format": "List the planets by size. [[Format the list as a markdown table with two columns.]]",
    "negative-title": "What is the title of the third Harry Potter book?",
    "negative-section": "Which section of a newspaper covers local elections?",
    "negative-words": "What do the words 'carpe diem' mean?",
    "negative-letter": "Write a letter to my grandmother about my new job.",
}


def unmarked(marked: str) -> tuple[str, list[tuple[int, int]]]:
    """The prompt without its ``[[...]]`` marks, and the marked character spans."""
    pieces = marked.replace("]]", "[[").split("[[")
    text, spans = "", []
    for index, piece in enumerate(pieces):
        if index % 2:
            spans.append((len(text), len(text) + len(piece)))
        text += piece
    return text, spans


# what the detector misses among them, said in the README; strict, so a detector that finds them says so
KNOWN_MISSES = {
    "count-paragraphs": "a bare count with no verb or answer word ('Two paragraphs will do.')",
    "alliteration": "a style word it never saw in training ('alliterative')",
    "letter-avoid": "a constraint's opening words cut off before the rule ('without ever | using ...')",
    "line-end-emoji": "the task clause taken with a per-line rule that follows a comma",
}


@pytest.mark.parametrize(
    "family",
    [
        pytest.param(f, marks=pytest.mark.xfail(strict=True, reason=KNOWN_MISSES[f])) if f in KNOWN_MISSES else f
        for f in FAMILY_CASES
    ],
)
def test_detection_finds_each_family_of_constraint(family):
    text, expected = unmarked(FAMILY_CASES[family])
    found = find_instruction_spans(text)
    if not expected:
        assert found == [], [text[a:b] for a, b in found]
        return
    precision, recall = character_scores([text], [found], [expected])
    assert precision >= 0.8 and recall >= 0.8, ([text[a:b] for a, b in found], [text[a:b] for a, b in expected])


def test_detection_on_the_written_held_out_set():
    """The held-out set was never used to build the detector (the rules scored 0.775 / 0.502 on it)."""
    rows = [json.loads(line) for line in (BENCHMARKS / "spans" / "heldout.jsonl").read_text().splitlines()]
    precision, recall = character_scores(
        [row["prompt"] for row in rows],
        [find_instruction_spans(row["prompt"]) for row in rows],
        [[tuple(s) for s in row["instruction_spans"]] for row in rows],
    )
    assert precision >= 0.85 and recall >= 0.85, (precision, recall)


def test_literal_constraint_strings_fall_inside_detected_spans():
    rows = load_ifeval(spans="none")
    covered, total = literal_coverage(rows, [find_instruction_spans(row["prompt"]) for row in rows])
    assert total > 100 and covered / total >= 0.9


def test_ifeval_rows(tmp_path):
    gold = load_ifeval(spans="gold")
    assert len(gold) == 541 and gold[0]["id"].startswith("ifeval-")
    assert sum(bool(r["instruction_spans"]) for r in gold) == 535
    auto = load_ifeval(spans="auto", limit=10)
    assert len(auto) == 10 and all(
        r["instruction_spans"] == [list(s) for s in find_instruction_spans(r["prompt"])] for r in auto
    )
    assert all(r["instruction_spans"] == [] for r in load_ifeval(spans="none", limit=5))
    with pytest.raises(FileNotFoundError):
        load_ifeval(tmp_path / "missing.jsonl")


def test_the_spans_command_marks_a_prompt_and_each_row_of_a_file(tmp_path):
    root = Path(__file__).resolve().parents[1]
    rows = [{"id": "a", "prompt": "Name a tree. Answer in French."}, {"id": "b", "prompt": "Why is the sky blue?"}]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))

    def spans(*arguments: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "jobs.cli", "spans", *arguments]
        return subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=120)

    shown = spans("Describe Rome. Answer in exactly two sentences.")
    assert shown.returncode == 0 and f"prompt (1 span, {DETECTOR})" in shown.stdout
    listed = spans(str(tmp_path / "rows.jsonl"), "--json")
    records = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [(r["id"], r["texts"], r["detector"]) for r in records] == [
        ("a", ["Answer in French."], DETECTOR),
        ("b", [], DETECTOR),
    ]
