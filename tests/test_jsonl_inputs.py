"""JSONL rows of different forms in one file: absent fields stay absent, passed-through columns keep
their Arrow types, a bad id or a bad line is an error row, and the export keeps the whole conversation;
a file read in parts gives the rows it gives read whole."""

from __future__ import annotations

import json

import datasets
import pyarrow as pa
import pyarrow.dataset as pads
import pytest

from directer import SteeringConfig
from pipeline import inputs
from pipeline.config import GenerateConfig
from pipeline.export import ExportConfig, export
from pipeline.inputs import JsonPart, json_file_rows, json_parts, read_tasks
from pipeline.run import generate

ROWS = [
    {"id": "plain", "prompt": "Name a color. Answer in French.", "instruction": "Answer in French.", "tags": ["a"]},
    {"id": "spans", "prompt": "Name a fruit. Use capital letters.", "instruction_spans": [[14, 34]]},
    {"id": "task", "task": "Name a tree.", "instruction": "Answer in one word.", "tags": ["b", "c"]},
    {"id": "chat", "messages": [{"role": "system", "content": "Answer in French."},
                                {"role": "user", "content": "Name a bird."}]},
    {"id": 7, "prompt": "Name a fish."},
]  # fmt: skip


@pytest.mark.parametrize("part_bytes", [inputs.JSON_PART_BYTES, 100], ids=["whole", "in parts"])
def test_mixed_forms_in_one_jsonl_file(tmp_path, monkeypatch, part_bytes):
    monkeypatch.setattr(inputs, "JSON_PART_BYTES", part_bytes)
    source = tmp_path / "rows.jsonl"
    lines = [json.dumps(row, ensure_ascii=False) for row in ROWS]
    source.write_text("\n".join([*lines[:2], "{not json", *lines[2:]]) + "\n")
    assert (len(json_parts(str(source))) > 1) == (part_bytes < source.stat().st_size)
    output = tmp_path / "out"
    config = GenerateConfig(inputs=(str(source),), output=str(output), steering=SteeringConfig(max_new_tokens=4))
    generate(config, progress=False)

    table = pads.dataset(str(output / "data"), format="parquet").to_table()
    rows = {row["id"]: row for row in table.to_pylist()}
    assert len(table) == len(ROWS) + 1
    for good in ("plain", "spans", "task", "chat"):
        assert rows[good]["status"] == "ok", rows[good]["error"]
    assert {rows[name]["span_source"] for name in ("plain", "spans", "task")} == {
        "instruction", "instruction_spans", "task",
    }  # fmt: skip
    assert rows["7"]["error"] == "id: expected a string, got int"
    (bad_line,) = [row for row in rows.values() if row["error"] and row["error"].startswith("line:")]
    assert "not valid JSON" in bad_line["error"]
    assert table.schema.field("tags").type == pa.list_(pa.string())
    assert rows["spans"]["tags"] is None and rows["task"]["tags"] == ["b", "c"]
    loaded = datasets.Dataset.from_parquet(str(output / "data" / "*.parquet"))
    assert loaded.features["tags"].feature.dtype == "string"

    export(ExportConfig(runs=(str(output),), output=str(tmp_path / "train"), format="jsonl"))
    records = {r["source_id"]: r for r in map(json.loads, (tmp_path / "train" / "train.jsonl").open())}
    assert records["chat"]["messages"][:2] == ROWS[3]["messages"]
    assert records["chat"]["messages"][2]["role"] == "assistant"
    report = export(ExportConfig(runs=(str(output),), output=str(tmp_path / "train"), format="parquet", verify=True))
    assert report.counts[-1] == ("verified (strict), and 4 rows without checker fields kept unverified", 4)
    assert not (tmp_path / "train" / "train.jsonl").exists()  # the earlier export is gone, not left beside


LINES = [
    b'{"id": "a", "prompt": "One."}',
    b"   ",  # a blank line: no row
    b"{not json",
    b'{"id": "b", "prompt": "Two \xe2\x80\xa8 lines."}',  # U+2028 inside a string: not a line break
    b'[{"id": "c"}]',  # a line holding a list: an error row, wherever a part begins
    b'{"id": "d", "prompt": "\xff"}',  # not UTF-8
    b'{"id": "e", "prompt": "Three."}\r',  # a CRLF line end
    b"[1, 2]",
    b'{"id": "f", "prompt": "Four."}',
]
ARRAY = b'  \n[\n  {"id": "a", "prompt": "One."},\n  {"id": "b",\n   "prompt": "Two."},\n  3\n]\n'


@pytest.mark.parametrize(
    "data",
    [b"\n".join(LINES) + b"\n", b"\n".join(LINES), b"\n".join(LINES[4:]), ARRAY, b"", b"\n\n"],
    ids=["lines", "no last line end", "opens with a list", "array", "empty", "blank"],
)
@pytest.mark.parametrize("part_bytes", [1, 7, 40, 1 << 20])
def test_a_json_file_in_parts_gives_the_rows_of_the_whole(tmp_path, monkeypatch, data, part_bytes):
    monkeypatch.setattr(inputs, "JSON_PART_BYTES", part_bytes)
    path = tmp_path / "rows.jsonl"
    path.write_bytes(data)
    parts = json_parts(str(path))
    assert [(p.start, p.end) for p in parts] == list(zip([0, *[p.end for p in parts[:-1]]], [p.end for p in parts]))
    assert (parts[-1].end if parts else 0) == len(data)
    assert all(data[p.end - 1 : p.end] == b"\n" for p in parts[:-1])  # every part but the last ends a line
    if data.lstrip()[:1] != b"[" and len(data) > part_bytes + 60:
        assert len(parts) > 1
    assert [row for part in parts for row in part.rows()] == json_file_rows(data)


def test_small_files_share_a_read_task_and_a_large_part_has_its_own(monkeypatch):
    monkeypatch.setattr(inputs, "JSON_PART_BYTES", 250)
    parts = [JsonPart(f"s{n}.jsonl", 0, 100) for n in range(5)] + [JsonPart("big.jsonl", 0, 400)]
    parts += [JsonPart("big.jsonl", 400, 500), JsonPart("last.jsonl", 0, 100)]
    tasks = [[(p["path"], p["start"]) for p in task["parts"]] for task in read_tasks(parts)]
    assert tasks == [
        [("s0.jsonl", 0), ("s1.jsonl", 0)],
        [("s2.jsonl", 0), ("s3.jsonl", 0)],
        [("s4.jsonl", 0)],
        [("big.jsonl", 0)],
        [("big.jsonl", 400), ("last.jsonl", 0)],
    ]
