"""Train the instruction-span scorer shipped in ``directer/data/span_scorer.json``.

    .venv/bin/python benchmarks/train_span_scorer.py

Training data: IFEval's gold spans on the prompts whose key is not a multiple of 3 (the other third
stays held out, as in ``benchmarks/spans.py``) and the prompts written for this project in other
styles, ``benchmarks/spans/train.jsonl`` and ``dev.jsonl``. A phrase is a positive example when at
least half of its characters lie in a gold span. Logistic regression (scikit-learn, only here: the
weights ship, and scoring needs nothing but Python); its regularisation and the decision threshold
are chosen by 5-fold cross-validation over the written prompts, for the highest lower of precision
and recall, since both must be high. ``benchmarks/spans/heldout.jsonl`` is never read here.
Deterministic: the same data gives the same weights. Bump ``directer.spans.DETECTOR`` when they change.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from sklearn.feature_extraction import DictVectorizer
from sklearn.linear_model import LogisticRegression

from directer.ifeval import load_ifeval
from directer.spans import DETECTOR, SCORER, SpanScorer, character_scores, features, phrases

SETS = Path(__file__).parent / "spans"
FOLDS = 5
THRESHOLDS = (-0.5, -0.25, 0.0, 0.125, 0.25, 0.375, 0.5, 0.75, 1.0)


def read_set(name: str) -> list[tuple[str, list[tuple[int, int]]]]:
    rows = [json.loads(line) for line in (SETS / f"{name}.jsonl").read_text().splitlines() if line.strip()]
    return [(row["prompt"], [tuple(s) for s in row["instruction_spans"]]) for row in rows]


def ifeval(keep) -> list[tuple[str, list[tuple[int, int]]]]:
    rows = load_ifeval(spans="gold")
    return [
        (row["prompt"], [tuple(s) for s in row["instruction_spans"]])
        for row in rows
        if keep(int(row["id"].split("-")[1]))
    ]


def examples(prompts) -> tuple[list[dict[str, float]], list[bool]]:
    """Each phrase's features and its label."""
    rows, labels = [], []
    for text, gold in prompts:
        cut = phrases(text)
        inside = {i for a, b in gold for i in range(a, b)}
        truth = []
        for phrase in cut:
            chars = [i for i in range(phrase.start, phrase.end) if not text[i].isspace()]
            truth.append(sum(i in inside for i in chars) * 2 >= max(len(chars), 1))
        for names, label in zip(features(text, cut, truth), truth):
            rows.append(dict.fromkeys(names, 1.0))
            labels.append(label)
    return rows, labels


def detect(prompts, scorer: SpanScorer) -> list[list[tuple[int, int]]]:
    return [scorer.spans(text) for text, _ in prompts]


def scores(prompts, found) -> tuple[float, float]:
    return character_scores([t for t, _ in prompts], found, [g for _, g in prompts])


def fit(prompts, c: float) -> tuple[dict[str, float], float]:
    rows, labels = examples(prompts)
    vectorizer = DictVectorizer()
    model = LogisticRegression(C=c, max_iter=3000).fit(vectorizer.fit_transform(rows), np.array(labels))
    return dict(zip(vectorizer.get_feature_names_out(), model.coef_[0])), float(model.intercept_[0])


def main() -> None:
    base, written = ifeval(lambda key: key % 3 != 0), read_set("train") + read_set("dev")
    print(f"training prompts: {len(base)} from IFEval, {len(written)} written (train and dev)")
    best = None
    for c in (0.3, 1.0, 3.0):
        found: dict[float, list] = {threshold: [None] * len(written) for threshold in THRESHOLDS}
        for fold in range(FOLDS):  # each written prompt is judged by a scorer that did not see it
            held = [i for i in range(len(written)) if i % FOLDS == fold]
            weights, bias = fit(base + [p for i, p in enumerate(written) if i % FOLDS != fold], c)
            for threshold in THRESHOLDS:
                scorer = SpanScorer(weights, bias, threshold)
                for i, spans in zip(held, detect([written[i] for i in held], scorer)):
                    found[threshold][i] = spans
        for threshold in THRESHOLDS:
            precision, recall = scores(written, found[threshold])
            print(f"C={c:<4} threshold={threshold:+.2f}: cross-validated precision {precision:.3f} recall {recall:.3f}")
            if best is None or min(precision, recall) > best[0]:  # both must reach the target
                best = (min(precision, recall), c, threshold)
    _, c, threshold = best
    print(f"chose C={c}, threshold {threshold:+.2f}")
    weights, bias = fit(base + written, c)
    kept = {name: round(float(w), 4) for name, w in sorted(weights.items()) if abs(w) >= 1e-3}
    model = {"version": DETECTOR, "C": c, "threshold": threshold, "bias": round(bias, 4), "weights": kept}
    SCORER.write_text(json.dumps(model, separators=(",", ":")))
    print(f"{len(kept)} weights written to {SCORER}")


if __name__ == "__main__":
    main()
