"""``directer export``: turn ``directer generate`` outputs into a clean instruction-following training set.

Rows pass through filters in order, each counted for the dataset card: generated without error,
ended by EOS, long enough, fluent under the unsteered model (mean NLL), not repetitive (distinct-2),
verified by IFEval's checkers (rows carrying ``instruction_id_list``/``kwargs``), then, with several
runs, the best verified completion per prompt (lowest NLL), and exact and near-duplicate removal.
Rows stream through a batch at a time and are written as they pass.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import re
import shutil
import tempfile
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from directer.scoring import score_response
from pipeline.inputs import InputError
from pipeline.outputs import SUMMARY, RunOutput, replacing
from pipeline.progress import tracked
from pipeline.rows import messages_of, user_message

FORMATS = ("hf", "jsonl", "parquet")
SHARD_ROWS = 50_000  # records a written file holds
# what an export writes; a new export into the same folder removes an earlier one's first
EXPORT_OUTPUTS = ("dataset", "train.jsonl", "data", "README.md", "histograms.png")
# what the filters, the checkers and a record read; never the per-step telemetry or token ids (BENCHMARKS.md,
# "Export": read whole, 20,000 rows of 256 steps took 2.5 GB)
READ_COLUMNS = (
    "id", "status", "completion", "finish_reason", "completion_tokens", "nll", "distinct_2", "method",
    "config_fingerprint", "model", "steering", "messages", "prompt", "task", "instruction", "instruction_id_list",
    "kwargs",
)  # fmt: skip
Keyed = tuple[tuple[int, int], dict[str, Any]]  # a row and where it is: (run, place in the run)
Filter = Callable[[dict[str, Any]], bool]


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


class _Verifier:
    """The checkers' filter: keeps rows whose IFEval checkers pass and rows without checker fields, and
    counts the pass rate per instruction type."""

    def __init__(self, loose: bool) -> None:
        self.loose, self.unchecked = loose, 0
        self.per_type: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # passed, checked

    def __call__(self, row: dict[str, Any]) -> bool:
        if row.get("instruction_id_list") is None or row.get("kwargs") is None:
            self.unchecked += 1
            return True
        ids = list(row["instruction_id_list"])
        verdict = score_response(user_message(row), ids, row["kwargs"], row["completion"])
        checks = verdict.loose if self.loose else verdict.strict
        for instruction, ok in zip(ids, checks):
            self.per_type[instruction][0] += ok
            self.per_type[instruction][1] += 1
        return all(checks)

    @property
    def label(self) -> str:
        label = f"verified ({'loose' if self.loose else 'strict'})"
        return label + (f", and {self.unchecked} rows without checker fields kept unverified" if self.unchecked else "")

    def pass_rates(self) -> dict[str, dict[str, float]]:
        return {k: {"rows": n, "pass_rate": passed / n} for k, (passed, n) in sorted(self.per_type.items())}


class _Deduplicator:
    """Keeps a row unless an earlier kept one has the same completion (after normalising case and
    punctuation) or a near-identical one (MinHash LSH over word 3-gram shingles, estimated Jaccard
    similarity above ``threshold``). Holds a digest per distinct completion and a signature per kept row."""

    def __init__(self, threshold: float) -> None:
        from datasketch import MinHashLSH

        self.seen: set[bytes] = set()
        self.index = MinHashLSH(threshold=threshold, num_perm=128)

    def __call__(self, row: dict[str, Any]) -> bool:
        from datasketch import MinHash

        words = _normalised(row["completion"])
        digest = hashlib.blake2b(words.encode(), digest_size=16).digest()
        if digest in self.seen:
            return False
        self.seen.add(digest)
        words = words.split()
        signature = MinHash(num_perm=128)  # all shingles at once: 5 times faster than one by one
        signature.update_batch([" ".join(words[i : i + 3]).encode() for i in range(max(1, len(words) - 2))])
        if self.index.query(signature):
            return False
        self.index.insert(str(len(self.seen)), signature)
        return True


def _normalised(text: str) -> str:
    return re.sub(r"\W+", " ", text.lower()).strip()


def _filters(config: ExportConfig, verifier: _Verifier) -> list[tuple[str, Filter]]:
    """The per-row filters, in order, with the names the card counts them under."""
    filters: list[tuple[str, Filter]] = [
        ("generated without error", lambda r: r["status"] == "ok" and bool(r["completion"]))
    ]
    if config.require_finish == "eos":
        filters.append(("ended by EOS", lambda r: r["finish_reason"] == "stop"))
    if config.min_tokens:
        filters.append((f"at least {config.min_tokens} tokens", lambda r: r["completion_tokens"] >= config.min_tokens))
    if config.max_nll is not None:
        filters.append((f"mean NLL at most {config.max_nll}", lambda r: r["nll"] <= config.max_nll))
    if config.max_repetition is not None:
        filters.append((
            f"repetition (1 - distinct-2) at most {config.max_repetition}",
            lambda r: r["distinct_2"] is None or 1 - r["distinct_2"] <= config.max_repetition,
        ))  # fmt: skip
    if config.verify:
        filters.append(("verified", verifier))
    return filters


def _runs(config: ExportConfig) -> list[RunOutput]:
    runs = [RunOutput(Path(run)) for run in config.runs]
    output = Path(config.output)
    if RunOutput(output).manifest_path.is_file():  # its data/ would be replaced by the export's
        raise InputError(f"--output {output} holds a directer generate run: export to another folder")
    for run in runs:
        if not run.files():
            raise InputError(f"{run.folder} is not a directer generate output (no data/*.parquet)")
    if config.max_nll is not None:
        for run in runs:
            generated = run.read(["status", "nll"])
            if pc.any(pc.and_(pc.equal(generated["status"], "ok"), pc.is_null(generated["nll"]))).as_py():
                raise InputError("--max-nll needs NLL scores: generate with --score-nll")
    return runs


def _rows(runs: list[RunOutput], label: str, progress: bool) -> Iterator[Keyed]:
    """Every row of the runs in order, keyed by (run, place in it), reading only the columns an export uses."""

    def keyed() -> Iterator[Keyed]:
        for number, run in enumerate(runs):
            batches = run.batches(list(READ_COLUMNS))
            rows = itertools.chain.from_iterable(batch.to_pylist() for batch in batches)
            yield from (((number, place), row) for place, row in enumerate(rows))

    return iter(tracked(keyed(), sum(run.count() for run in runs), label, progress))


def _passing(rows: Iterator[Keyed], filters: list[tuple[str, Filter]], counts: list[int]) -> Iterator[Keyed]:
    """The rows every filter keeps; ``counts[0]`` counts the rows read, ``counts[n]`` those past filter n."""
    for key, row in rows:
        counts[0] += 1
        for n, (_, keep) in enumerate(filters, start=1):
            if not keep(row):
                break
            counts[n] += 1
        else:
            yield key, row


def export(config: ExportConfig, command: str | None = None, progress: bool = False) -> ExportReport:
    """Filter the runs' rows and write the training set and its card; returns the counts.

    Rows stream through the filters a batch at a time (``pipeline.outputs.BATCH_ROWS``) and are written as
    they pass, so memory does not grow with the rows' text: what is kept per row is a digest and a MinHash
    signature (``--dedupe``), the prompt's best run (``--best-of``) and two numbers for the card's
    histograms. ``progress`` shows a bar (IFEval's checkers take about 0.6 ms a row on one core: ten minutes
    for a million rows)."""
    runs = _runs(config)
    report = ExportReport()
    verifier = _Verifier(config.loose)
    filters = _filters(config, verifier)
    counts = [0] * (len(filters) + 1)
    if config.best_of:  # a first pass finds each prompt's best row, a second reads the runs again for them
        best: dict[str, tuple[float, tuple[int, int]]] = {}
        for key, row in _passing(_rows(runs, "choosing the best of the runs", progress), filters, counts):
            nll = float("inf") if row.get("nll") is None else row["nll"]
            if row["id"] not in best or nll < best[row["id"]][0]:
                best[row["id"]] = (nll, key)
        chosen = {key for _, key in best.values()}
        passing = ((key, row) for key, row in _rows(runs, "exporting", progress) if key in chosen)
    else:
        passing = _passing(_rows(runs, "exporting", progress), filters, counts)
    deduplicator = _Deduplicator(config.near_duplicate_threshold) if config.dedupe else None
    kept = (row for _, row in passing if deduplicator is None or deduplicator(row))
    with _staging(Path(config.output)) as staging:
        lengths, nlls = _write(kept, config, report, staging)
        report.counts = [("rows read", counts[0])]
        report.counts += [
            (verifier.label if keep is verifier else name, n) for (name, keep), n in zip(filters, counts[1:])
        ]
        if config.best_of:
            report.counts.append(("best of the runs per prompt (lowest NLL)", len(chosen)))
        if config.dedupe:
            report.counts.append(("after exact and near-duplicate removal", len(lengths)))
        report.pass_rates = verifier.pass_rates()
        _card(config, report, lengths, nlls, command, staging)
    return report


@contextlib.contextmanager
def _staging(output: Path) -> Iterator[Path]:
    """A hidden folder in ``output`` to build the export in; once it is whole, its files replace the
    previous export's, so an export that fails leaves the previous one as it was."""
    staging = output / ".export-staging"
    shutil.rmtree(staging, ignore_errors=True)  # what a killed export left
    staging.mkdir(parents=True)
    try:
        yield staging
        for name in EXPORT_OUTPUTS:
            stale = output / name
            if stale.is_dir():
                shutil.rmtree(stale)
            else:
                stale.unlink(missing_ok=True)
            if (staging / name).exists():
                (staging / name).rename(stale)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _conversation(row: dict[str, Any]) -> list[dict[str, str]]:
    """The whole conversation the completion answers (system messages included), then the completion."""
    if messages := messages_of(row):
        asked = [{"role": m["role"], "content": m["content"]} for m in messages]
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


RECORD = pa.schema([
    ("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
    ("source_id", pa.string()), ("method", pa.string()), ("config_fingerprint", pa.string()), ("model", pa.string()),
    ("steering", SUMMARY), ("nll", pa.float32()), ("completion_tokens", pa.int32()),
])  # fmt: skip


def _write(
    rows: Iterable[dict[str, Any]], config: ExportConfig, report: ExportReport, output: Path
) -> tuple[list, list]:
    """Write the rows' records to ``output`` as they come, ``SHARD_ROWS`` at a time; returns the
    completions' lengths and NLLs (for the card) and counts the kept rows per method in ``report``."""
    lengths, nlls = [], []
    with contextlib.ExitStack() as stack:
        if config.format == "jsonl":
            lines = stack.enter_context(open(stack.enter_context(replacing(output / "train.jsonl")), "w"))
        elif config.format == "parquet":
            (output / "data").mkdir()
        else:  # an Arrow stream that ``datasets`` maps from disk, then saves as its own shards
            stream = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=".export-", dir=output))) / "rows"
            arrow = pa.ipc.new_stream(str(stream), RECORD)
        records = map(_record, rows)
        for shard, chunk in enumerate(iter(lambda: list(itertools.islice(records, SHARD_ROWS)), [])):
            table = pa.Table.from_pylist(chunk, schema=RECORD)
            lengths += table.column("completion_tokens").to_pylist()
            nlls += [nll for nll in table.column("nll").to_pylist() if nll is not None]
            for method, count in zip(*pc.value_counts(table.column("method")).flatten()):
                report.kept_methods[method.as_py()] = report.kept_methods.get(method.as_py(), 0) + count.as_py()
            if config.format == "jsonl":
                lines.writelines(json.dumps(record) + "\n" for record in table.to_pylist())
            elif config.format == "parquet":
                with replacing(output / "data" / f"part-{shard:05d}.parquet") as partial:
                    pq.write_table(table, partial)
            else:
                arrow.write_table(table)
        if config.format == "parquet" and not lengths:
            pq.write_table(RECORD.empty_table(), output / "data" / "part-00000.parquet")
        if config.format == "hf":
            arrow.close()
            _save_dataset(stream, output / "dataset")
    return lengths, nlls


def _save_dataset(stream: Path, folder: Path) -> None:
    import datasets

    shown = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # its "Saving the dataset" bar: our own bar has just shown the rows
    try:
        datasets.Dataset.from_file(str(stream)).save_to_disk(str(folder))
    finally:
        if shown:
            datasets.enable_progress_bars()


def _card(
    config: ExportConfig, report: ExportReport, lengths: list, nlls: list, command: str | None, output: Path
) -> None:
    """``README.md`` in ``output``: counts at each filter, pass rates, histograms, the commands."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(8, 3))
    axes[0].hist(lengths or [0], bins=20, color="#d9541e")
    axes[0].set_title("completion tokens")
    axes[1].hist(nlls or [0], bins=20, color="#3b82f6")
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
        f"{len(lengths)} chat records (`messages`: the conversation as asked, system messages included, then the "
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
