"""Prompt rendering and instruction spans."""

from __future__ import annotations

import copy

import pytest

from directer.prompts import PromptError, SpanError, build_prompt, check_spans


def test_instruction_maps_to_its_tokens(smollm2):
    tokenizer = smollm2.tokenizer
    message = "Write a haiku about the sea. Answer in all capital letters."
    prompt = build_prompt(tokenizer, message, instruction="Answer in all capital letters.")
    assert prompt.text.startswith("<|im_start|>")
    assert prompt.token_ids == tokenizer.apply_chat_template(
        [{"role": "user", "content": message}], tokenize=True, add_generation_prompt=True, return_dict=False
    )
    assert tokenizer.decode([prompt.token_ids[i] for i in prompt.span]).strip() == "Answer in all capital letters."
    start, end = prompt.token_span
    assert prompt.span == list(range(start, end))


def test_spans_cut_inside_words_take_the_overlapping_tokens(smollm2):
    message = "Describe Paris. Use exactly threewords please."
    prompt = build_prompt(smollm2.tokenizer, message, spans=[[16, 37]])  # ends inside "threewords"
    steered = smollm2.tokenizer.decode([prompt.token_ids[i] for i in prompt.span])
    assert "Use exactly three" in steered and "please" not in steered


def test_missing_instruction_is_named(smollm2):
    with pytest.raises(SpanError, match="'Respond in French.' is not in the prompt"):
        build_prompt(smollm2.tokenizer, "Write a poem.", instruction="Respond in French.")


@pytest.mark.parametrize(
    ("spans", "message"),
    [([[0, 50]], "outside"), ([[3, 3]], "empty"), ([[0, 5], [4, 8]], "overlap"), ([["a", 2]], "integers")],
)
def test_invalid_spans(spans, message):
    with pytest.raises(SpanError, match=message):
        check_spans("A short prompt.", spans)


def test_without_template_the_text_is_the_message(smollm2):
    prompt = build_prompt(smollm2.tokenizer, "Say hi. Be brief.", instruction="Be brief.", chat_template=False)
    assert prompt.text == "Say hi. Be brief."
    assert prompt.char_spans == [(8, 17)]


def test_without_template_turns_that_would_be_lost_are_refused(smollm2):
    """Without a template the text is the user message alone: a system message (holding the instruction, or
    not) or earlier turns would silently vanish, and spans found in the system message land on the user's."""
    chat = [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Tell me about Paris."}]
    with pytest.raises(PromptError, match="^messages: the tokenizer has no chat template"):
        build_prompt(smollm2.tokenizer, messages=chat, instruction="Answer in French.", chat_template=False)
    with pytest.raises(PromptError, match="^system: the tokenizer has no chat template"):
        build_prompt(smollm2.tokenizer, "Say hi.", system="Be brief.", chat_template=False)
    alone = build_prompt(smollm2.tokenizer, messages=chat[1:], instruction="Paris", chat_template=False)
    assert alone.text == "Tell me about Paris." and alone.char_spans == [(14, 19)]


def test_a_prompt_past_the_context_is_refused_by_the_library_and_the_cli(smollm2):
    from test_cli_run import directer as run_cli

    from directer import Directer, PromptError

    long_prompt = "Tell me about the sea. " * 1800  # about 10,800 tokens against a context of 8,192
    with pytest.raises(PromptError, match="new tokens exceed the model's context of 8192"):
        Directer(smollm2).generate(long_prompt, max_new_tokens=8)
    result = run_cli("run", long_prompt, "--max-new-tokens", "8")
    assert result.returncode == 2
    assert "prompt: " in result.stderr and "exceed the model's context of 8192" in result.stderr


REFUSES_SYSTEM = (  # what Gemma's template does with a system turn
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>"
)


def test_a_chat_template_that_refuses_the_conversation_names_the_field(smollm2):
    tokenizer = copy.deepcopy(smollm2.tokenizer)
    tokenizer.chat_template = REFUSES_SYSTEM
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Describe Rome. Be brief."}]
    with pytest.raises(PromptError, match="^messages: the model's chat template refuses it: System role not supported"):
        build_prompt(tokenizer, messages=chat, instruction="Be brief.")
    with pytest.raises(PromptError, match="^prompt: the model's chat template refuses it"):
        build_prompt(tokenizer, "Describe Rome.", system="Be brief.")
    assert build_prompt(tokenizer, messages=chat[1:], instruction="Be brief.").text.startswith("<user>Describe Rome.")
