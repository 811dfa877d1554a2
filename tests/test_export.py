"""``directer export``: generate -> verify, filter, dedupe -> a training set that loads with datasets."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import datasets
import pyarrow.dataset as pads
import pytest

from directer import SteeringConfig
from directer.scoring import score_response
from pipeline.config import GenerateConfig
from pipeline.export import ExportConfig, export
from pipeline.inputs import InputError
from pipeline.run import generate

ROWS = [
    ("comma", "Name one animal. Do not use any commas in your response.", ["punctuation:no_comma"], [{}]),
    ("zebra-1", "Describe the sky. Do not include the word zebra.", ["keywords:forbidden_words"],
     [{"forbidden_words": ["zebra"]}]),
    ("zebra-2", "Describe the sky. Do not include the word zebra.", ["keywords:forbidden_words"],
     [{"forbidden_words": ["zebra"]}]),
    ("caps", "Name a city. Answer in all capital letters.", ["change_case:english_capital"], [{}]),
    ("french", "Name a fruit. Answer only in French, no other language.", ["language:response_language"],
     [{"language": "fr"}]),
]  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("export")
    source = folder / "rows.jsonl"
    lines = [{"id": i, "prompt": p, "instruction_id_list": ids, "kwargs": json.dumps(kw)} for i, p, ids, kw in ROWS]
    source.write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    outputs = []
    for method in ("zero-shot", "directer"):
        config = GenerateConfig(
            inputs=(str(source),), output=str(folder / method), score_nll=True,
            steering=SteeringConfig(method=method, max_new_tokens=12),
        )  # fmt: skip
        generate(config, progress=False, command=f"directer generate rows.jsonl --method {method} --score-nll")
        outputs.append(str(folder / method))
    return folder, tuple(outputs)


def test_best_of_verified_deduplicated_dataset(runs):
    folder, outputs = runs
    config = ExportConfig(runs=outputs, output=str(folder / "train"), verify=True, dedupe=True, best_of=True,
                          min_tokens=1)  # fmt: skip
    report = export(config, command="directer export zero-shot directer --best-of --verify --dedupe")
    dataset = datasets.load_from_disk(str(folder / "train" / "dataset"))
    counts = [count for _, count in report.counts]
    assert counts[0] == 2 * len(ROWS) and counts == sorted(counts, reverse=True) and counts[-1] == len(dataset)
    assert len(dataset) >= 1
    completions = [r["messages"][1]["content"] for r in dataset]
    assert len(set(completions)) == len(completions)
    assert len({r["source_id"] for r in dataset}) == len(dataset)
    rows = {i: (p, ids, kw) for i, p, ids, kw in ROWS}
    for record in dataset:
        prompt, ids, kwargs = rows[record["source_id"]]
        assert record["messages"][0] == {"role": "user", "content": prompt}
        assert score_response(prompt, ids, kwargs, record["messages"][1]["content"]).prompt_strict
        assert record["method"] in ("zero-shot", "directer") and record["model"] and record["config_fingerprint"]
        assert record["nll"] is not None
    card = (folder / "train" / "README.md").read_text()
    for name, count in report.counts:
        assert f"| {name} | {count} |" in card
    assert "directer generate rows.jsonl --method directer --score-nll" in card and "--best-of" in card
    assert (folder / "train" / "histograms.png").is_file()
    assert report.pass_rates and all(0 <= v["pass_rate"] <= 1 for v in report.pass_rates.values())


def test_formats_and_filters(runs):
    folder, outputs = runs
    export(ExportConfig(runs=outputs[:1], output=str(folder / "jsonl"), format="jsonl", require_finish=None))
    lines = (folder / "jsonl" / "train.jsonl").read_text().splitlines()
    assert len(lines) == len(ROWS) and all(json.loads(line)["messages"][1]["role"] == "assistant" for line in lines)
    export(ExportConfig(runs=outputs[:1], output=str(folder / "pq"), format="parquet", max_nll=0.0))
    assert pads.dataset(str(folder / "pq" / "data"), format="parquet").count_rows() == 0
    report = export(ExportConfig(runs=outputs[:1], output=str(folder / "eos"), format="jsonl", require_finish="eos"))
    finished = [r for r in pads.dataset(str(Path(outputs[0]) / "data"), format="parquet").to_table().to_pylist()
                if r["finish_reason"] == "stop"]  # fmt: skip
    assert report.counts[-1][1] == len(finished)


def test_bad_exports_fail_clearly(runs, tmp_path):
    folder, outputs = runs
    with pytest.raises(ValueError, match="--best-of"):
        ExportConfig(runs=outputs, output=str(tmp_path / "x"))
    with pytest.raises(InputError, match="not a directer generate output"):
        export(ExportConfig(runs=(str(tmp_path),), output=str(tmp_path / "y")))
    before = sorted(path.name for path in (Path(outputs[0]) / "data").iterdir())
    with pytest.raises(InputError, match=f"--output {outputs[0]} holds a directer generate run"):
        export(ExportConfig(runs=outputs[:1], output=outputs[0], format="parquet"))
    assert sorted(path.name for path in (Path(outputs[0]) / "data").iterdir()) == before  # its rows are still there


def test_an_export_that_fails_leaves_the_previous_one_as_it_was(runs, tmp_path, monkeypatch):
    folder, outputs = runs
    config = ExportConfig(runs=outputs[:1], output=str(tmp_path / "train"), format="parquet")
    export(config)
    written = {path: path.read_bytes() for path in (tmp_path / "train").rglob("*") if path.is_file()}

    def fail(*args, **kwargs):  # an injected fault: the card cannot be written
        raise OSError("disk full")

    monkeypatch.setattr("pipeline.export._card", fail)
    with pytest.raises(OSError, match="disk full"):
        export(replace(config, min_tokens=10**6))  # would keep no row
    assert {path: path.read_bytes() for path in (tmp_path / "train").rglob("*") if path.is_file()} == written
    assert not (tmp_path / "train" / ".export-staging").exists()


def test_the_command_writes_nothing_but_its_table_to_a_log(runs):
    """Off a terminal, the ``datasets`` save bar used to print twice into the log."""
    folder, outputs = runs
    result = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "export", outputs[1], "--output", str(folder / "cli"), "--verify"],
        cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0 and result.stderr == "", result.stderr
    counts = dict(re.findall(r"│ ([a-z ()]+?) +│ +(\d+) │", result.stdout))
    assert counts["rows read"] == str(len(ROWS)), result.stdout
    assert counts["verified (strict)"] == str(len(datasets.load_from_disk(str(folder / "cli" / "dataset"))))


@pytest.mark.parametrize("format", ["parquet", "hf", "jsonl"])
def test_rows_stream_through_in_batches_and_shards_as_they_would_in_one(runs, monkeypatch, format):
    """A large run is read ``BATCH_ROWS`` and written ``SHARD_ROWS`` at a time: with both made tiny, the
    export (two runs, best of them, deduplicated) is the one written in one batch and one shard."""
    folder, outputs = runs

    def records(name: str) -> tuple[list[dict], list[tuple[str, int]], int]:
        """The records, the counts, and how many files hold them."""
        config = ExportConfig(runs=outputs, output=str(folder / name), format=format, best_of=True, dedupe=True)
        counts = export(config).counts
        if format == "parquet":
            files = sorted((folder / name / "data").glob("*.parquet"))
            return pads.dataset([str(f) for f in files]).to_table().to_pylist(), counts, len(files)
        if format == "jsonl":
            return [json.loads(line) for line in (folder / name / "train.jsonl").open()], counts, 1
        return datasets.load_from_disk(str(folder / name / "dataset")).to_list(), counts, 1

    whole, counts, files = records(f"whole-{format}")
    monkeypatch.setattr("pipeline.outputs.BATCH_ROWS", 3)
    monkeypatch.setattr("pipeline.export.SHARD_ROWS", 2)
    streamed, streamed_counts, streamed_files = records(f"streamed-{format}")
    assert streamed == whole and streamed_counts == counts and len(whole) == counts[-1][1] >= 3
    assert files == 1 and streamed_files == (-(-len(whole) // 2) if format == "parquet" else 1)
    assert len({record["source_id"] for record in whole}) == len(whole)  # one record per prompt


def test_a_conversation_written_as_json_text_is_read_as_its_messages():
    """``messages`` reach a run's output as JSON text where their file gave them so, or where shards typed
    them apart; the training record and IFEval's checkers read the conversation, not its characters."""
    from pipeline.export import _record
    from pipeline.rows import user_message

    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Describe Rome."}]
    row = {"id": "r", "messages": json.dumps(chat), "completion": "Rome is old.", "method": "directer",
           "config_fingerprint": "f", "model": "m", "steering": None, "nll": 1.0, "completion_tokens": 4}  # fmt: skip
    assert user_message(row) == "Describe Rome."
    assert _record(row)["messages"] == [*chat, {"role": "assistant", "content": "Rome is old."}]
