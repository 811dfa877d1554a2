"""``directer export``: turn ``directer generate`` outputs into a clean instruction-following training set.

Rows pass through filters in order, each counted for the dataset card: generated without error,
ended by EOS, long enough, fluent under the unsteered model (mean NLL), not repetitive (distinct-2),
verified by IFEval's checkers (rows carrying ``instruction_id_list``/``kwargs``), then, with several
runs, the best verified completion per prompt (lowest NLL), and exact and near-duplicate removal.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from directer.scoring import score_response
from pipeline.inputs import InputError
from pipeline.outputs import RunOutput, replacing
from pipeline.rows import user_message

FORMATS = ("hf", "jsonl", "parquet")
SHARD_ROWS = 50_000
# what an export writes; a new export into the same folder removes an earlier one's first
EXPORT_OUTPUTS = ("dataset", "train.jsonl", "data", "README.md", "histograms.png")


@dataclass(frozen=True)
class ExportConfig:
    runs: tuple[str, ...]
    output: str
    format: str = "hf"
    verify: bool = False
    loose: bool = False
    min_tokens: int = 0
    max_nll: float | None = None
    max_repetition: float | None = None
    dedupe: bool = False
    require_finish: str | None = None
    best_of: bool = False
    near_duplicate_threshold: float = 0.85

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if self.require_finish not in (None, "eos"):
            raise ValueError(f"--require-finish takes eos, got {self.require_finish!r}")
        if len(self.runs) > 1 and not self.best_of:
            raise ValueError("several runs need --best-of (keep one completion per prompt)")


@dataclass
class ExportReport:
    counts: list[tuple[str, int]] = field(default_factory=list)
    pass_rates: dict[str, dict[str, float]] = field(default_factory=dict)
    kept_methods: dict[str, int] = field(default_factory=dict)


def read_runs(runs: tuple[str, ...]) -> list[dict[str, Any]]:
    rows = []
    for run in runs:
        output = RunOutput(Path(run))
        if not output.files():
            raise InputError(f"{run} is not a directer generate output (no data/*.parquet)")
        rows += output.rows()
    return rows


def _verdict(row: dict[str, Any], loose: bool) -> tuple[bool, list[tuple[str, bool]]] | None:
    """IFEval verdicts of a row that carries checker fields; ``None`` for rows without them."""
    if row.get("instruction_id_list") is None or row.get("kwargs") is None:
        return None
    ids = list(row["instruction_id_list"])
    verdict = score_response(user_message(row), ids, row["kwargs"], row["completion"])
    checks = verdict.loose if loose else verdict.strict
    return all(checks), list(zip(ids, checks))


def _normalised(text: str) -> str:
    return re.sub(r"\W+", " ", text.lower()).strip()


def _dedupe(rows: list[dict[str, Any]], threshold: float) -> list[dict[str, Any]]:
    """Drop exact duplicates (after normalising case and punctuation), then near duplicates (MinHash LSH
    over word 3-gram shingles, estimated Jaccard similarity above ``threshold``)."""
    from datasketch import MinHash, MinHashLSH

    seen, kept = set(), []
    for row in rows:
        key = _normalised(row["completion"])
        if key not in seen:
            seen.add(key)
            kept.append(row)
    index = MinHashLSH(threshold=threshold, num_perm=128)
    unique = []
    for position, row in enumerate(kept):
        words = _normalised(row["completion"]).split()
        shingles = {" ".join(words[i : i + 3]) for i in range(max(1, len(words) - 2))}
        signature = MinHash(num_perm=128)
        for shingle in shingles:
            signature.update(shingle.encode())
        if index.query(signature):
            continue
        index.insert(str(position), signature)
        unique.append(row)
    return unique


def export(config: ExportConfig, command: str | None = None) -> ExportReport:
    """Filter the runs' rows and write the training set and its card; returns the counts."""
    rows = read_runs(config.runs)
    report = ExportReport()
    report.counts.append(("rows read", len(rows)))

    def keep(name: str, predicate) -> None:
        nonlocal rows
        rows = [r for r in rows if predicate(r)]
        report.counts.append((name, len(rows)))

    keep("generated without error", lambda r: r["status"] == "ok" and bool(r["completion"]))
    if config.require_finish == "eos":
        keep("ended by EOS", lambda r: r["finish_reason"] == "stop")
    if config.min_tokens:
        keep(f"at least {config.min_tokens} tokens", lambda r: r["completion_tokens"] >= config.min_tokens)
    if config.max_nll is not None:
        if any(r.get("nll") is None for r in rows):
            raise InputError("--max-nll needs NLL scores: generate with --score-nll")
        keep(f"mean NLL at most {config.max_nll}", lambda r: r["nll"] <= config.max_nll)
    if config.max_repetition is not None:
        keep(
            f"repetition (1 - distinct-2) at most {config.max_repetition}",
            lambda r: r["distinct_2"] is None or 1 - r["distinct_2"] <= config.max_repetition,
        )
    if config.verify:
        per_type: dict[str, list[bool]] = defaultdict(list)
        verdicts = {}
        for row in rows:
            verdict = _verdict(row, config.loose)
            verdicts[id(row)] = verdict
            for instruction, ok in verdict[1] if verdict else []:
                per_type[instruction].append(ok)
        report.pass_rates = {k: {"rows": len(v), "pass_rate": sum(v) / len(v)} for k, v in sorted(per_type.items())}
        unchecked = sum(verdict is None for verdict in verdicts.values())
        label = f"verified ({'loose' if config.loose else 'strict'})"
        if unchecked:
            label += f", and {unchecked} rows without checker fields kept unverified"
        keep(label, lambda r: verdicts[id(r)] is None or verdicts[id(r)][0])
    if config.best_of:
        best: dict[str, dict[str, Any]] = {}
        for row in rows:
            current = best.get(row["id"])
            if current is None or (row.get("nll") or float("inf")) < (current.get("nll") or float("inf")):
                best[row["id"]] = row
        keep("best of the runs per prompt (lowest NLL)", lambda r: best[r["id"]] is r)
    if config.dedupe:
        before = rows
        rows = _dedupe(before, config.near_duplicate_threshold)
        report.counts.append(("after exact and near-duplicate removal", len(rows)))
    for row in rows:
        report.kept_methods[row["method"]] = report.kept_methods.get(row["method"], 0) + 1
    records = [_record(row) for row in rows]
    _write(records, config)
    _card(config, report, rows, command)
    return report


def _conversation(row: dict[str, Any]) -> list[dict[str, str]]:
    """The whole conversation the completion answers (system messages included), then the completion."""
    if row.get("messages"):
        asked = [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
    else:
        asked = [{"role": "user", "content": user_message(row)}]
    return [*asked, {"role": "assistant", "content": row["completion"]}]


def _record(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "messages": _conversation(row),
        "source_id": row["id"],
        "method": row["method"],
        "config_fingerprint": row["config_fingerprint"],
        "model": row["model"],
        "steering": row["steering"],
        "nll": row.get("nll"),
        "completion_tokens": row["completion_tokens"],
    }


def _write(records: list[dict[str, Any]], config: ExportConfig) -> None:
    output = Path(config.output)
    output.mkdir(parents=True, exist_ok=True)
    for name in EXPORT_OUTPUTS:
        stale = output / name
        if stale.is_dir():
            shutil.rmtree(stale)
        elif stale.exists():
            stale.unlink()
    if config.format == "hf":
        import datasets

        datasets.Dataset.from_list(records).save_to_disk(str(output / "dataset"))
    elif config.format == "jsonl":
        with replacing(output / "train.jsonl") as partial, open(partial, "w") as handle:
            for record in records:
                handle.write(json.dumps(record) + "\n")
    else:
        folder = output / "data"
        folder.mkdir(exist_ok=True)
        for shard, start in enumerate(range(0, max(len(records), 1), SHARD_ROWS)):
            with replacing(folder / f"part-{shard:05d}.parquet") as partial:
                pq.write_table(pa.Table.from_pylist(records[start : start + SHARD_ROWS]), partial)


def _card(config: ExportConfig, report: ExportReport, rows: list[dict[str, Any]], command: str | None) -> None:
    """``README.md`` in the export: counts at each filter, pass rates, histograms, the commands."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    output = Path(config.output)
    figure, axes = plt.subplots(1, 2, figsize=(8, 3))
    axes[0].hist([r["completion_tokens"] for r in rows] or [0], bins=20, color="#d9541e")
    axes[0].set_title("completion tokens")
    axes[1].hist([r["nll"] for r in rows if r.get("nll") is not None] or [0], bins=20, color="#3b82f6")
    axes[1].set_title("mean NLL (unsteered model)")
    figure.tight_layout()
    figure.savefig(output / "histograms.png", dpi=110)
    plt.close(figure)
    generate_commands = []
    for run in config.runs:
        manifest = RunOutput(Path(run)).manifest() or {"invocations": []}
        generate_commands += [i["command"] for i in manifest["invocations"] if i.get("command")]
    lines = [
        "---", "task_categories: [text-generation]", "tags: [instruction-following, synthetic, directer]", "---", "",
        "# Instruction-following training set", "",
        f"{len(rows)} chat records (`messages`: the conversation as asked, system messages included, then the "
        "assistant completion) with provenance columns "
        "(`source_id`, `method`, `config_fingerprint`, `model`, `steering`, `nll`), exported by directer "
        f"from {', '.join(f'`{r}`' for r in config.runs)} in `{config.format}` format.", "",
        "## Rows kept at each filter", "", "| filter | rows |", "| --- | --- |",
    ]  # fmt: skip
    lines += [f"| {name} | {count} |" for name, count in report.counts]
    if report.kept_methods:
        lines += ["", "Kept per method: " + ", ".join(f"{m} {n}" for m, n in sorted(report.kept_methods.items()))]
    if report.pass_rates:
        lines += [
            "",
            "## Pass rates per instruction type",
            "",
            "| instruction | rows | pass rate |",
            "| --- | --- | --- |",
        ]
        lines += [f"| {k} | {v['rows']} | {v['pass_rate']:.1%} |" for k, v in report.pass_rates.items()]
    lines += ["", "## Lengths and fluency", "", "![histograms](histograms.png)", "", "## How it was made", "", "```sh"]
    lines += generate_commands + [command or "directer export " + " ".join(config.runs)] + ["```", ""]
    (output / "README.md").write_text("\n".join(lines))


def current_command() -> str:
    """The command line that is running, as a user would type it."""
    return shlex.join(["directer", *sys.argv[1:]])
