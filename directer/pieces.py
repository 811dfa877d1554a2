"""A completion as text pieces, each marked steered or not, for highlighting (the CLI and the report).

Byte-level tokenizers split one character of Japanese, Hindi or Kannada over several tokens, and
decoding such a token alone gives U+FFFD. So tokens are decoded in runs: a run grows until its text
ends in a whole character, and it counts as steered when any of its tokens was changed by steering.
"""

from __future__ import annotations

from collections.abc import Iterable

REPLACEMENT = "\ufffd"
MAX_RUN = 4  # a UTF-8 character has at most 4 bytes, and a byte-level token at least one


def steered_pieces(tokenizer, steps: Iterable[tuple[int, bool]]) -> list[tuple[str, bool]]:
    """``(text, changed)`` runs of the ``(token id, changed)`` steps, special tokens left out."""
    special = set(tokenizer.all_special_ids)
    pieces: list[tuple[str, bool]] = []
    run: list[int] = []
    changed = False
    for token, token_changed in steps:
        if token in special:
            continue
        run.append(token)
        changed = changed or token_changed
        text = tokenizer.decode(run)
        if not text.endswith(REPLACEMENT) or len(run) == MAX_RUN:
            pieces.append((text, changed))
            run, changed = [], False
    if run:  # a character the completion never finished (cut at max_new_tokens)
        pieces.append((tokenizer.decode(run), changed))
    return pieces
