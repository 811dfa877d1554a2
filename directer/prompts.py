"""Prompts and instruction spans: chat template in, token ids and the token positions to steer out.

Spans are given as characters of the user message (an instruction substring or ``[start, end)``
offsets) and mapped to tokens through the tokenizer's offset mapping, never by searching token ids,
so they survive any tokenizer's merges across the span's edges.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

CharSpan = tuple[int, int]


class SpanError(ValueError):
    """An instruction or span that cannot be placed in its prompt."""


@dataclass(frozen=True)
class Prompt:
    """A prompt ready for the engine."""

    text: str  # the rendered prompt, chat template applied
    token_ids: list[int]
    span: list[int]  # token positions whose keys are steered
    char_spans: list[CharSpan]  # the same spans as characters of ``text``

    @property
    def token_span(self) -> tuple[int, int] | None:
        """``[start, end)`` token positions covering every steered token, or ``None``."""
        return (self.span[0], self.span[-1] + 1) if self.span else None


def instruction_spans(message: str, instruction: str) -> list[CharSpan]:
    """The first occurrence of ``instruction`` in ``message`` as a character span."""
    if not instruction.strip():
        raise SpanError("instruction is empty")
    start = message.find(instruction)
    if start < 0:
        raise SpanError(f"instruction {_quote(instruction)} is not in the prompt")
    return [(start, start + len(instruction))]


def check_spans(message: str, spans: Sequence[Sequence[int]]) -> list[CharSpan]:
    """Validate ``[start, end)`` character spans: in range, non-empty, not overlapping."""
    checked: list[CharSpan] = []
    for span in spans:
        if len(span) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in span):
            raise SpanError(f"span {list(span)!r} is not a pair of integers [start, end)")
        start, end = span
        if not 0 <= start < end <= len(message):
            raise SpanError(f"span [{start}, {end}) is empty or outside the prompt (length {len(message)})")
        checked.append((start, end))
    checked.sort()
    for (_, end), (start, _) in zip(checked, checked[1:]):
        if start < end:
            raise SpanError(f"spans overlap at character {start}")
    return checked


def build_prompt(
    tokenizer: PreTrainedTokenizerBase,
    message: str,
    *,
    instruction: str | None = None,
    spans: Sequence[Sequence[int]] | None = None,
    system: str | None = None,
    chat_template: bool = True,
) -> Prompt:
    """Render ``message`` as the user turn and locate its instruction.

    Give the instruction as a substring of ``message`` (its first occurrence is steered) or as
    character ``spans`` of ``message``; with neither, nothing is steered.
    """
    if not isinstance(message, str) or not message.strip():
        raise SpanError("prompt is empty")
    if instruction is not None and spans is not None:
        raise SpanError("give the instruction as text or as spans, not both")
    message_spans = (
        instruction_spans(message, instruction) if instruction is not None else check_spans(message, spans or [])
    )
    templated = chat_template and tokenizer.chat_template is not None
    if templated:
        turns = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": message}]
        text = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
        offset = text.rfind(message)
        if offset < 0:
            raise SpanError("the chat template rewrites the message; cannot place the instruction in it")
    else:
        text, offset = message, 0
    char_spans = [(start + offset, end + offset) for start, end in message_spans]
    encoded = tokenizer(text, add_special_tokens=not templated, return_offsets_mapping=True)
    positions = [
        index
        for index, (token_start, token_end) in enumerate(encoded["offset_mapping"])
        if token_end > token_start and any(token_start < end and token_end > start for start, end in char_spans)
    ]
    if char_spans and not positions:
        raise SpanError("the instruction maps to no token")
    return Prompt(text=text, token_ids=list(encoded["input_ids"]), span=positions, char_spans=char_spans)


def _quote(text: str, limit: int = 80) -> str:
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")
