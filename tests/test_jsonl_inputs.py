"""JSONL rows of different forms in one file: absent fields stay absent, passed-through columns keep
their Arrow types, a bad id or a bad line is an error row, and the export keeps the whole conversation."""

from __future__ import annotations

import json

import datasets
import pyarrow as pa
import pyarrow.dataset as pads

from directer import SteeringConfig
from pipeline.config import GenerateConfig
from pipeline.export import ExportConfig, export
from pipeline.run import generate

ROWS = [
    {"id": "plain", "prompt": "Name a color. Answer in French.", "instruction": "Answer in French.", "tags": ["a"]},
    {"id": "spans", "prompt": "Name a fruit. Use capital letters.", "instruction_spans": [[14, 34]]},
    {"id": "task", "task": "Name a tree.", "instruction": "Answer in one word.", "tags": ["b", "c"]},
    {"id": "chat", "messages": [{"role": "system", "content": "Answer in French."},
                                {"role": "user", "content": "Name a bird."}]},
    {"id": 7, "prompt": "Name a fish."},
]  # fmt: skip


def test_mixed_forms_in_one_jsonl_file(tmp_path):
    source = tmp_path / "rows.jsonl"
    lines = [json.dumps(row, ensure_ascii=False) for row in ROWS]
    source.write_text("\n".join([*lines[:2], "{not json", *lines[2:]]) + "\n")
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
