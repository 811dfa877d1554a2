"""Instruction-span detection on IFEval: precision, recall and speed.

    .venv/bin/python benchmarks/spans.py

The rules were tuned on the prompts whose key is not a multiple of 3 and are reported on the others
(held out) as well as on all 541.
"""

from __future__ import annotations

import time

from directer.ifeval import literal_coverage, load_ifeval
from directer.spans import character_scores, find_instruction_spans


def main() -> dict[str, float]:
    rows = load_ifeval(spans="gold")
    started = time.perf_counter()
    rounds = 5
    for _ in range(rounds):
        detected = [find_instruction_spans(row["prompt"]) for row in rows]
    speed = rounds * len(rows) / (time.perf_counter() - started)
    figures: dict[str, float] = {"prompts_per_second": speed}
    keys = [int(row["id"].split("-")[1]) for row in rows]
    for name, keep in (("tuned", lambda k: k % 3 != 0), ("held_out", lambda k: k % 3 == 0), ("all", lambda k: True)):
        chosen = [i for i, k in enumerate(keys) if keep(k)]
        precision, recall = character_scores(
            [rows[i]["prompt"] for i in chosen],
            [detected[i] for i in chosen],
            [[tuple(s) for s in rows[i]["instruction_spans"]] for i in chosen],
        )
        figures[f"{name}_precision"], figures[f"{name}_recall"] = precision, recall
        print(f"{name:>8}: {len(chosen)} prompts, precision {precision:.3f}, recall {recall:.3f}")
    covered, total = literal_coverage(rows, detected)
    figures["literal_coverage"] = covered / total
    print(f"literal strings inside detected spans: {covered}/{total} prompts ({covered / total:.1%})")
    print(f"speed: {speed:,.0f} prompts/s on one core")
    return figures


if __name__ == "__main__":
    main()
