"""IFEval (Zhou et al. 2023) as input rows: its 541 prompts with gold or detected instruction spans.

The data ships with the package (Apache-2.0; gold spans derived from microsoft/llm-steer-instruct,
MIT; see ``data/ifeval/NOTICE.md``). ``kwargs`` stay JSON text so that rows fit one Parquet schema.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

from directer.spans import find_instruction_spans

DATA = Path(__file__).parent / "data" / "ifeval"
IfevalSpans = Literal["gold", "auto", "none"]


def load_ifeval(
    path: str | Path | None = None, spans: IfevalSpans = "gold", limit: int | None = None
) -> list[dict[str, Any]]:
    """Input rows: ``id``, ``prompt``, ``instruction_spans``, ``instruction_id_list``, ``kwargs`` (JSON).

    ``spans="gold"`` reads ``instruction_spans.jsonl`` beside the prompts file; ``"auto"`` detects
    them; ``"none"`` leaves them empty (nothing is steered).
    """
    source = Path(path) if path else DATA / "input_data.jsonl"
    if not source.is_file():
        raise FileNotFoundError(f"IFEval prompts not found: {source}")
    records = [json.loads(line) for line in source.read_text().splitlines() if line.strip()]
    gold: dict[int, list[list[int]]] = {}
    if spans == "gold":
        spans_file = source.with_name("instruction_spans.jsonl")
        if not spans_file.is_file():
            raise FileNotFoundError(f"gold spans need {spans_file}; without it, detect them: --spans auto")
        gold = {r["key"]: r["instruction_spans"] for r in map(json.loads, spans_file.read_text().splitlines())}
    elif spans not in ("auto", "none"):
        raise ValueError(f"spans must be gold, auto or none, got {spans!r}")
    rows = []
    for record in records[:limit]:
        prompt = record["prompt"]
        if spans == "gold":
            chosen = [list(s) for s in gold.get(record["key"], [])]
        elif spans == "auto":
            chosen = [list(s) for s in find_instruction_spans(prompt)]
        else:
            chosen = []
        rows.append(
            {
                "id": f"ifeval-{record['key']}",
                "prompt": prompt,
                "instruction_spans": chosen,
                "instruction_id_list": record["instruction_id_list"],
                "kwargs": json.dumps(record["kwargs"]),
            }
        )
    return rows


LITERAL_FIELDS = ("keywords", "forbidden_words", "end_phrase", "postscript_marker", "section_spliter", "first_word")


def literal_coverage(rows: list[dict], detected: list[list[tuple[int, int]]]) -> tuple[int, int]:
    """Prompts whose kwargs name literal strings, and those whose strings all fall in detected spans."""
    covered = total = 0
    for row, spans in zip(rows, detected):
        literals = []
        for kwargs in json.loads(row["kwargs"]):
            for field in LITERAL_FIELDS:
                value = (kwargs or {}).get(field)
                literals += value if isinstance(value, list) else [value] if value else []
        prompt = row["prompt"].lower()
        found = [[m.start() for m in re.finditer(re.escape(s.lower()), prompt)] for s in literals]
        found = [(s, starts) for s, starts in zip(literals, found) if starts]
        if not found:
            continue
        total += 1
        covered += all(any(a <= i and i + len(s) <= b for i in starts for a, b in spans) for s, starts in found)
    return covered, total
