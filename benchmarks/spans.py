"""Instruction-span detection: precision, recall and speed, on IFEval and on the sets written for it.

    .venv/bin/python benchmarks/spans.py [--json]

Character-level precision and recall (whitespace ignored) of :func:`directer.find_instruction_spans`
against gold spans: on IFEval's prompts whose key is a multiple of 3 (the scorer trained on the
others) and on all 541; on ``benchmarks/spans/dev.jsonl`` (chose the scorer's regularisation and
threshold) and ``benchmarks/spans/heldout.jsonl`` (never used to build the detector). Speed is
prompts per second in this one Python process, i.e. on one core.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from directer.ifeval import literal_coverage, load_ifeval
from directer.spans import DETECTOR, character_scores, find_instruction_spans

SETS = Path(__file__).parent / "spans"


def written(name: str) -> list[dict]:
    return [json.loads(line) for line in (SETS / f"{name}.jsonl").read_text().splitlines() if line.strip()]


def main(as_json: bool = False) -> dict[str, float]:
    ifeval = load_ifeval(spans="gold")
    keys = [int(row["id"].split("-")[1]) for row in ifeval]
    sets = {
        "ifeval_held_out": [row for row, key in zip(ifeval, keys) if key % 3 == 0],
        "ifeval_all": ifeval,
        "dev": written("dev"),
        "held_out": written("heldout"),
    }
    figures: dict[str, float | str] = {"detector": DETECTOR}
    for name, rows in sets.items():
        detected = [find_instruction_spans(row["prompt"]) for row in rows]
        precision, recall = character_scores(
            [row["prompt"] for row in rows], detected, [[tuple(s) for s in row["instruction_spans"]] for row in rows]
        )
        figures[f"{name}_precision"], figures[f"{name}_recall"] = round(precision, 3), round(recall, 3)
        if not as_json:
            print(f"{name:>16}: {len(rows):>3} prompts, precision {precision:.3f}, recall {recall:.3f}")
    covered, total = literal_coverage(ifeval, [find_instruction_spans(row["prompt"]) for row in ifeval])
    figures["ifeval_literal_coverage"] = round(covered / total, 3)
    prompts = [row["prompt"] for rows in sets.values() for row in rows]
    started = time.perf_counter()
    for prompt in prompts * 3:
        find_instruction_spans(prompt)
    figures["prompts_per_second"] = round(3 * len(prompts) / (time.perf_counter() - started))
    if as_json:
        print(json.dumps(figures))
    else:
        print(f"IFEval literal strings inside detected spans: {covered}/{total} prompts ({covered / total:.1%})")
        print(f"speed: {figures['prompts_per_second']:,} prompts/s on one core ({DETECTOR})")
    return figures


if __name__ == "__main__":
    main(as_json="--json" in sys.argv[1:])
