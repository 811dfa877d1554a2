"""Preprocessing: check one input row and build its prompt, or say which field is wrong."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from directer.prompts import Prompt, PromptError, SpanMode, check_fits, join_task, prompt_from_row
from pipeline.inputs import READ_ERROR, STRUCTURED_FIELDS, TYPE_ERRORS

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


class RowError(ValueError):
    """A row that cannot be generated; the message starts with the field at fault."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")


def _from_json(field: str, text: str) -> Any:
    """A structured field written as JSON text (by its file, or by the reader where shards typed it
    differently)."""
    try:
        return json.loads(text)
    except ValueError:
        raise RowError(field, f"expected a list, got text that is not JSON: {text[:40]!r}") from None


def messages_of(row: dict[str, Any]) -> list[dict[str, str]] | None:
    """The row's chat list, decoded where it is JSON text (as its file gave it, or as the reader wrote it
    where shards typed it apart; passed through so to the output)."""
    messages = row.get("messages")
    return _from_json("messages", messages) if isinstance(messages, str) else messages


def user_message(row: dict[str, Any]) -> str:
    """The user message a row asks (its last user message, its prompt, or its task and instruction):
    what IFEval's checkers and a training record read."""
    if messages := messages_of(row):
        return [m["content"] for m in messages if m["role"] == "user"][-1]
    if row.get("prompt"):
        return row["prompt"]
    return join_task(row["task"], row["instruction"])


def row_id(row: dict[str, Any]) -> str | None:
    """The id as written to the output (non-string ids are written as text, and flagged)."""
    value = row.get("id")
    return None if value is None else value if isinstance(value, str) else str(value)


def prepare_row(
    row: dict[str, Any],
    tokenizer: PreTrainedTokenizerBase,
    *,
    duplicates: dict[str, int],
    context_length: int | None,
    max_new_tokens: int,
    spans: SpanMode = "auto",
) -> Prompt:
    """The row's prompt with its instruction placed, or :class:`RowError`."""
    if row.get(READ_ERROR):
        raise RowError("line", row[READ_ERROR])
    for note in (row.get(TYPE_ERRORS) or "").split(","):
        if note:
            field, kind = note.split("=", 1)
            raise RowError(field, f"expected a string, got {kind}")
    value = row.get("id")
    if value is None or value == "":
        raise RowError("id", "missing or empty")
    if not isinstance(value, str):
        raise RowError("id", f"expected a string, got {type(value).__name__}")
    if value in duplicates:
        raise RowError("id", f"{value!r} appears {duplicates[value]} times in the input; ids must be unique")
    row = {**row, **{name: _from_json(name, row[name]) for name in STRUCTURED_FIELDS if isinstance(row.get(name), str)}}
    try:
        prompt = prompt_from_row(tokenizer, row, spans)
        check_fits(prompt, max_new_tokens, context_length)
    except PromptError as error:
        raise RowError(error.field, error.problem) from None
    return prompt
