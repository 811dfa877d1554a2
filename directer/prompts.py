"""Prompts and instruction spans: chat template in, token ids and the token positions to steer out.

Spans are given as characters of the user message (an instruction substring or ``[start, end)``
offsets) and mapped to tokens through the tokenizer's offset mapping, never by searching token ids,
so they survive any tokenizer's merges across the span's edges.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from jinja2 import TemplateError

from directer.spans import find_instruction_spans

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

CharSpan = tuple[int, int]
SpanMode = Literal["auto", "none"]


class PromptError(ValueError):
    """A prompt that cannot be built; ``field`` names the input field at fault."""

    def __init__(self, problem: str, field: str = "prompt") -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


class SpanError(PromptError):
    """An instruction or span that cannot be placed in its prompt."""

    def __init__(self, problem: str, field: str = "instruction") -> None:
        super().__init__(problem, field)


@dataclass(frozen=True)
class Prompt:
    """A prompt ready for the engine."""

    text: str  # the rendered prompt, chat template applied
    token_ids: list[int] = field(repr=False)
    span: list[int]  # token positions whose keys are steered
    char_spans: list[CharSpan]  # the same spans as characters of ``text``
    span_source: str = "none"  # instruction, instruction_spans, task, auto or none

    @property
    def token_span(self) -> tuple[int, int] | None:
        """``[start, end)`` token positions covering every steered token, or ``None``."""
        return (self.span[0], self.span[-1] + 1) if self.span else None


def check_fits(prompt: Prompt, max_new_tokens: int, context_length: int | None) -> None:
    """Refuse a prompt whose tokens and ``max_new_tokens`` would run past the model's context (the
    model would decode garbage there, slowly)."""
    if context_length is not None and len(prompt.token_ids) + max_new_tokens > context_length:
        raise PromptError(
            f"{len(prompt.token_ids)} prompt tokens + {max_new_tokens} new tokens exceed the model's context "
            f"of {context_length}"
        )


def instruction_spans(message: str, instruction: str) -> list[CharSpan]:
    """The first occurrence of ``instruction`` in ``message`` as a character span."""
    if not instruction.strip():
        raise SpanError("empty")
    start = message.find(instruction)
    if start < 0:
        raise SpanError(f"{_quote(instruction)} is not in the prompt")
    return [(start, start + len(instruction))]


def check_spans(message: str, spans: Sequence[Sequence[int]]) -> list[CharSpan]:
    """Validate ``[start, end)`` character spans: in range, non-empty, not overlapping."""
    field = "instruction_spans"
    if isinstance(spans, (str, bytes)) or not hasattr(spans, "__iter__"):
        raise SpanError(f"expected a list of [start, end) pairs, got {type(spans).__name__}", field)
    checked: list[CharSpan] = []
    for span in spans:
        pair = list(span) if hasattr(span, "__iter__") and not isinstance(span, (str, bytes)) else [span]
        if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair):
            raise SpanError(f"span {pair!r} is not a pair of integers [start, end)", field)
        start, end = pair
        if not 0 <= start < end <= len(message):
            raise SpanError(f"span [{start}, {end}) is empty or outside the prompt (length {len(message)})", field)
        checked.append((start, end))
    checked.sort()
    for (_, end), (start, _) in zip(checked, checked[1:]):
        if start < end:
            raise SpanError(f"spans overlap at character {start}", field)
    return checked


def _check_messages(messages: object) -> tuple[list[dict[str, str]], str]:
    """A chat list of ``{role, content}`` dicts; returns it and its last user message."""
    if isinstance(messages, (str, bytes, dict)) or not hasattr(messages, "__iter__"):
        raise PromptError("expected a list of {role, content} messages", "messages")
    turns = []
    for index, turn in enumerate(messages):
        if not isinstance(turn, dict) or not all(isinstance(turn.get(k), str) for k in ("role", "content")):
            raise PromptError(f"message {index} is not a {{role, content}} pair of strings", "messages")
        turns.append({"role": turn["role"], "content": turn["content"]})
    users = [turn["content"] for turn in turns if turn["role"] == "user"]
    if not users or not users[-1].strip():
        raise PromptError("no non-empty user message", "messages")
    return turns, users[-1]


def build_prompt(
    tokenizer: PreTrainedTokenizerBase,
    message: str | None = None,
    *,
    messages: Sequence[dict[str, str]] | None = None,
    instruction: str | None = None,
    spans: Sequence[Sequence[int]] | None = None,
    system: str | None = None,
    chat_template: bool = True,
    span_source: str | None = None,
) -> Prompt:
    """Render a user ``message`` (or a chat list ``messages``) and locate its instruction.

    Give the instruction as a substring of the last user message (its first occurrence is steered;
    with ``messages``, a system message is searched when the user message lacks it), or as character
    ``spans`` of the last user message; with neither, nothing is steered. Without a chat template
    (``chat_template=False`` or a tokenizer with none) the text is the user message alone, so a system
    message or earlier turns are refused rather than dropped.
    """
    culprit = "messages" if messages is not None else "prompt"
    if messages is not None:
        turns, message = _check_messages(messages)
    else:
        if not isinstance(message, str):
            raise PromptError("missing" if message is None else f"expected a string, got {type(message).__name__}")
        if not message.strip():
            raise PromptError("empty")
        turns = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": message}]
    if instruction is not None and spans is not None:
        raise SpanError("give the instruction as text or as spans, not both")
    target, role = message, "user"
    if instruction is not None:
        if not isinstance(instruction, str):
            raise SpanError(f"expected a string, got {type(instruction).__name__}")
        systems = [t["content"] for t in turns if t["role"] == "system" and instruction in t["content"]]
        if instruction not in message and systems:
            target, role = systems[0], "system"
        message_spans = instruction_spans(target, instruction)
    else:
        message_spans = check_spans(message, spans if spans is not None else [])
    templated = chat_template and tokenizer.chat_template is not None
    if templated:
        try:
            text = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
        except TemplateError as error:  # templates refuse what they do not support (a system turn, roles out of turn)
            raise PromptError(f"the model's chat template refuses it: {error}", culprit) from None
        offset = text.rfind(target) if role == "user" else text.find(target)
        if offset < 0:
            raise PromptError("the chat template rewrites the message; cannot place the instruction in it")
    elif len(turns) > 1:
        # the text would be the last user message alone: the other turns (and a system instruction) lost
        raise PromptError(
            "the tokenizer has no chat template to join turns with; give one user message and no system message",
            culprit if messages is not None else "system",
        )
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
        raise SpanError("maps to no token")
    if span_source is None:
        span_source = "instruction" if instruction is not None else "instruction_spans" if char_spans else "none"
    return Prompt(
        text=text,
        token_ids=list(encoded["input_ids"]),
        span=positions,
        char_spans=char_spans,
        span_source=span_source,
    )


def join_task(task: str, instruction: str) -> str:
    """The prompt of a ``task`` + ``instruction`` row: the task, a blank line, the instruction."""
    return f"{task.rstrip()}\n\n{instruction.strip()}"


def prompt_from_row(tokenizer: PreTrainedTokenizerBase, row: Mapping[str, Any], spans: SpanMode = "auto") -> Prompt:
    """Build the prompt of an input row in any of its accepted forms.

    ``prompt`` or ``messages`` (chat list), with ``instruction`` (a substring) or ``instruction_spans``
    (``[start, end)`` character offsets); or ``task`` + ``instruction`` (the prompt is the task, a
    blank line, and the instruction); with no instruction, ``spans="auto"`` detects it with
    :func:`directer.spans.find_instruction_spans` and ``"none"`` steers nothing.
    """
    if spans not in ("auto", "none"):
        raise ValueError(f"spans must be auto or none, got {spans!r}")

    instruction, char_spans = row.get("instruction"), row.get("instruction_spans")
    if instruction is not None and char_spans is not None:
        raise SpanError("give instruction or instruction_spans, not both")
    message, messages, source = row.get("prompt"), row.get("messages"), None
    if message is None and messages is None and row.get("task") is not None:
        task = row["task"]
        if not isinstance(task, str) or not task.strip():
            raise PromptError(
                "missing or empty" if isinstance(task, str) else f"expected a string, got {type(task).__name__}", "task"
            )
        if not isinstance(instruction, str) or not instruction.strip():
            raise SpanError("a task needs an instruction to append")
        message, source = join_task(task, instruction), "task"
        instruction = instruction.strip()
    if instruction is None and char_spans is None and spans == "auto":
        text = _check_messages(messages)[1] if messages is not None else message
        if isinstance(text, str) and text.strip():
            char_spans, source = find_instruction_spans(text), "auto"
    return build_prompt(
        tokenizer,
        message if messages is None else None,
        messages=messages,
        instruction=instruction,
        spans=char_spans,
        span_source=source,
    )


def _quote(text: str, limit: int = 80) -> str:
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")
