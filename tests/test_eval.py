"""``directer eval`` end to end on a small IFEval slice, and on a user's own rows."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from directer import SteeringConfig
from pipeline.evaluate import EvalConfig, evaluate
from pipeline.report import METRICS, build_report

LIMIT = 6


@pytest.fixture(scope="module")
def evaluation(tmp_path_factory):
    output = tmp_path_factory.mktemp("eval")
    config = EvalConfig(output=str(output), limit=LIMIT, steering=SteeringConfig(max_new_tokens=12), batch_size=4)
    return output, evaluate(config, progress=False)


def test_all_outputs_are_written(evaluation):
    output, summary = evaluation
    for name in ("scores.parquet", "summary.json", "report.md", "report.html", "accuracy.png", "per_instruction.png",
                 "quality.png", "layers_directer.png", "inputs.parquet"):  # fmt: skip
        assert (output / name).is_file(), name
    assert json.loads((output / "summary.json").read_text()) == summary


def test_scores_cover_every_prompt_instruction_and_method(evaluation):
    output, summary = evaluation
    inputs = pq.read_table(output / "inputs.parquet").to_pylist()
    scores = pq.read_table(output / "scores.parquet").to_pylist()
    instructions = sum(len(r["instruction_id_list"]) for r in inputs)
    assert len(inputs) == LIMIT and len(scores) == 2 * instructions
    for method in ("zero-shot", "directer"):
        rows = [s for s in scores if s["method"] == method]
        prompt_strict = {s["id"]: s["prompt_strict"] for s in rows}
        assert summary["accuracy"][method]["prompt_strict"] == pytest.approx(sum(prompt_strict.values()) / LIMIT)
        assert summary["accuracy"][method]["inst_strict"] == pytest.approx(sum(s["strict"] for s in rows) / len(rows))
    diff = summary["accuracy"]["directer"]["diff_vs_zero_shot"]
    for metric in METRICS:
        low, high = diff[metric]["ci95"]
        assert low <= diff[metric]["diff"] + 1e-9 and diff[metric]["diff"] <= high + 1e-9


def test_report_shows_telemetry_quality_and_examples(evaluation):
    output, summary = evaluation
    steering = summary["steering"]["directer"]
    assert 0 <= steering["steered_share"] <= 1 and set(steering["accepted_layers"]) <= {"30", "15", "7", "3"}
    assert summary["quality"]["directer"]["nll"] > 0
    assert summary["throughput"]["zero-shot"]["tokens_per_second"] > 0
    page = (output / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 4 and 'class="span"' in page and "ifeval-" in page
    assert "<mark" in page or steering["changed_share"] == 0
    (output / "report.html").unlink()
    build_report(output)
    assert (output / "report.html").is_file()


def test_users_own_rows(tmp_path):
    caps, lower = "Answer in all capital letters.", "Use only lowercase letters."
    rows = [
        {"id": "caps", "prompt": f"Name a fruit. {caps}", "instruction": caps,
         "instruction_id_list": ["change_case:english_capital"], "kwargs": [{}]},
        {"id": "lower", "prompt": f"Name a tree. {lower}", "instruction": lower,
         "instruction_id_list": ["change_case:english_lowercase"], "kwargs": [{}]},
    ]  # fmt: skip
    source = tmp_path / "mine.jsonl"
    source.write_text("\n".join(json.dumps(r) for r in rows))
    summary = evaluate(
        EvalConfig(benchmark=str(source), output=str(tmp_path / "out"), methods=("directer",),
                   steering=SteeringConfig(max_new_tokens=6)),
        progress=False,
    )  # fmt: skip
    assert summary["accuracy"]["directer"]["prompts"] == 2
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist([{"id": "x", "prompt": "Hi."}]), bad)
    from pipeline.inputs import InputError

    with pytest.raises(InputError, match="instruction_id_list"):
        evaluate(EvalConfig(benchmark=str(bad), output=str(tmp_path / "bad")), progress=False)
    assert not Path(tmp_path / "bad" / "scores.parquet").exists()
