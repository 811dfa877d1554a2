"""``directer eval`` end to end on a small IFEval slice, and on a user's own rows."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from directer import SteeringConfig
from pipeline.evaluate import EvalConfig, evaluate
from pipeline.report import METRICS, build_report

LIMIT = 6
ROOT = Path(__file__).resolve().parents[1]


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
    # steering changed some tokens of these prompts, and the examples highlight them
    assert steering["changed_share"] > 0 and "<mark" in page
    (output / "report.html").unlink()
    build_report(output)
    assert (output / "report.html").is_file()


def test_a_rerun_of_a_finished_evaluation_keeps_the_measured_throughput(evaluation):
    output, summary = evaluation
    config = EvalConfig(output=str(output), limit=LIMIT, steering=SteeringConfig(max_new_tokens=12), batch_size=4)
    again = evaluate(config, progress=False, command="directer eval ifeval")  # every row is done: nothing runs
    assert again["accuracy"] == summary["accuracy"]
    for method in summary["throughput"]:  # each run records the command (an export's card shows it)
        manifest = json.loads((output / "runs" / method / "run.json").read_text())
        assert manifest["invocations"][-1]["command"] == "directer eval ifeval"
    for method, measured in summary["throughput"].items():
        assert again["throughput"][method] == measured and measured["tokens_per_second"] > 0


def test_a_rerun_that_would_change_the_rows_or_the_config_is_refused_until_overwrite(evaluation, tmp_path):
    """Fewer prompts or another max_new_tokens in a finished evaluation's folder: refused before anything is
    written (the runs' rows would be scored against prompts no longer there, or mix two configurations);
    with overwrite the folder holds the new evaluation alone."""
    output = tmp_path / "moved"
    shutil.copytree(evaluation[0], output)  # a folder moved with its inputs resumes as it would in place
    before = {name: (output / name).read_bytes() for name in ("eval.json", "inputs.parquet", "summary.json")}
    fewer = EvalConfig(output=str(output), limit=2, steering=SteeringConfig(max_new_tokens=12), batch_size=4)
    longer = EvalConfig(output=str(output), limit=LIMIT, steering=SteeringConfig(max_new_tokens=13), batch_size=4)
    with pytest.raises(ValueError, match=r"drops or changes \(4, first .*--overwrite"):
        evaluate(fewer, progress=False)
    with pytest.raises(ValueError, match=r"max_new_tokens 12 -> 13\).*--overwrite"):
        evaluate(longer, progress=False)
    assert {name: (output / name).read_bytes() for name in before} == before

    summary = evaluate(replace(fewer, methods=("zero-shot",), overwrite=True), progress=False)
    assert summary["accuracy"]["zero-shot"]["prompts"] == 2
    assert (
        pq.read_table(output / "inputs.parquet").num_rows
        == pads.dataset(output / "runs" / "zero-shot" / "data").count_rows()
        == 2
    )


def test_users_own_rows_in_every_form_are_steered(tmp_path):
    caps, lower = "Answer in all capital letters.", "Use only lowercase letters."
    checks = {"instruction_id_list": ["change_case:english_capital"], "kwargs": [{}]}
    rows = [
        {"id": "caps", "prompt": f"Name a fruit. {caps}", "instruction": caps, **checks},
        {"id": "task", "task": "Name a tree.", "instruction": lower,
         "instruction_id_list": ["change_case:english_lowercase"], "kwargs": [{}]},
        {"id": "chat", "messages": [{"role": "user", "content": f"Name a city. {caps}"}], "instruction": caps,
         **checks},
        {"key": 1000, "prompt": f"Name a river. {caps}", **checks},  # IFEval's own format: spans detected
    ]  # fmt: skip
    source = tmp_path / "mine.jsonl"
    source.write_text("\n".join(json.dumps(r) for r in rows))
    output = tmp_path / "out"
    command = [sys.executable, "-m", "jobs.cli", "eval", str(source), "--methods", "directer", "--spans", "auto",
               "--max-new-tokens", "6", "--output", str(output)]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    steered = {r["id"]: r for r in pads.dataset(str(output / "runs" / "directer" / "data")).to_table().to_pylist()}
    sources = {"caps": "instruction", "task": "task", "chat": "instruction", "1000": "auto"}
    assert {i: r["span_source"] for i, r in steered.items()} == sources
    assert all(r["instruction_tokens"] > 0 for r in steered.values())
    assert "rows by span source: auto 1, instruction 2, task 1" in (output / "report.md").read_text()

    missing = tmp_path / "missing.jsonl"
    missing.write_text(json.dumps({"key": 7, "prompt": "Hi.", "instruction_id_list": []}) + "\n")
    refused = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "eval", str(missing), "--output", str(tmp_path / "bad")],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert refused.returncode == 2 and "row 0 (id '7'): field 'kwargs' is missing" in refused.stderr
    assert not (tmp_path / "bad").exists()


def test_a_sweep_runs_the_grid_in_one_command_and_plots_it(tmp_path):
    output = tmp_path / "sweep"
    command = [sys.executable, "-m", "jobs.cli", "eval", "ifeval", "--methods", "zero-shot,static,directer",
               "--alpha", "10,100", "--beta", "0.3,0.7", "--limit", "3", "--max-new-tokens", "6",
               "--output", str(output)]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((output / "summary.json").read_text())
    labels = [p["label"] for p in summary["sweep"]]
    assert labels == ["zero-shot", "static_alpha10", "static_alpha100", "directer_alpha10_beta0.3",
                      "directer_alpha10_beta0.7", "directer_alpha100_beta0.3", "directer_alpha100_beta0.7"]  # fmt: skip
    for point in summary["sweep"]:
        rows = pads.dataset(str(output / "runs" / point["label"] / "data")).to_table().to_pylist()
        config = json.loads(rows[0]["config"])
        assert (point["alpha"], point["beta"]) == (
            config["alpha"] if point["method"] != "zero-shot" else None,
            config["beta"] if point["method"] == "directer" else None,
        )
        assert set(summary["accuracy"][point["label"]]) >= set(METRICS)
        if point["method"] == "directer":  # each alpha's rankings come from its first beta's run
            expected = "miss" if point["beta"] == 0.3 else "hit"
            assert {r["ranking_cache"] for r in rows if r["instruction_tokens"]} == {expected}
            # a row without a span is not steered: it has no ranking to cache
            assert all(r["ranking_cache"] is None for r in rows if not r["instruction_tokens"])
    assert "diff_vs_zero_shot" in summary["accuracy"]["directer_alpha100_beta0.7"]
    assert (output / "sweep_directer.png").is_file() and (output / "sweep_static.png").is_file()
    assert "## Sweep" in (output / "report.md").read_text()
    bad = subprocess.run([*command[:-2], "--output", str(tmp_path / "bad"), "--beta", "0.3,x"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert bad.returncode == 2 and "--beta takes a number or a comma-separated list" in bad.stderr
