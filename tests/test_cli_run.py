"""``directer run`` as a user types it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def directer(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "jobs.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )


def test_run_json_has_tokens_span_and_telemetry():
    result = directer(
        "run", "Write a haiku about the sea. Answer in all capital letters.",
        "--instruction", "Answer in all capital letters.", "--max-new-tokens", "12", "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    assert len(payload["token_ids"]) == len(payload["telemetry"]) <= 12
    start, end = payload["instruction_token_span"]
    assert 0 <= start < end <= len(payload["prompt_token_ids"])
    assert payload["completion"] and payload["method"] == "directer"
    assert payload["telemetry"][0]["gate_skipped"] is False


def test_run_compare_shows_both_methods():
    args = ["run", "Write a haiku about the sea.", "--instruction", "Answer in all capital letters.",
            "--max-new-tokens", "12"]  # fmt: skip
    shown, both = directer(*args, "--compare"), directer(*args, "--compare", "--json")
    alone = {m: directer(*args, "--method", m, "--json") for m in ("zero-shot", "directer")}
    assert all(r.returncode == 0 for r in (shown, both, *alone.values())), shown.stderr + both.stderr
    # each column holds what that method gives alone
    payload = json.loads(both.stdout)
    for method, result in alone.items():
        assert payload[method]["completion"] == json.loads(result.stdout)["completion"]
    assert payload["zero-shot"]["summary"]["steered"] == 0 < payload["directer"]["summary"]["steered"]
    assert "highlighted)" in shown.stdout  # the steered column's header, not the title
    assert f"{payload['directer']['summary']['steps']} steps:" in shown.stdout


def test_run_compare_names_a_detected_instruction():
    prompt = "Tell me about Mars. Your answer must contain exactly 3 bullet points."
    result = directer("run", prompt, "--compare", "--max-new-tokens", "4")
    assert result.returncode == 0, result.stderr
    shown = " ".join(result.stdout.split())
    assert "instruction: Your answer must contain exactly 3 bullet points. (detected)" in shown


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "no-such-model"], "unknown model"),
        (["--beta", "2"], "beta must lie in"),
        (["--method", "no-such-method"], "method must be one of"),
    ],
)
def test_run_reports_bad_options(args, message):
    result = directer("run", "Say hi.", "--instruction", "Be brief.", *args)
    assert result.returncode == 2
    assert message in result.stderr


def test_non_latin_text_is_printed_whole():
    prompt = "海についての俳句を書いてください。すべて日本語で答えてください。"
    args = ["run", prompt, "-i", "すべて日本語で答えてください。", "--max-new-tokens", "24", "--method", "zero-shot"]
    shown, as_json = directer(*args), directer(*args, "--json")
    assert shown.returncode == 0 and as_json.returncode == 0, shown.stderr + as_json.stderr
    completion = json.loads(as_json.stdout)["completion"]
    assert any(ord(c) > 0x3000 for c in completion), completion  # the model answered in Japanese
    assert "\ufffd" not in shown.stdout
    assert "".join(shown.stdout.split()) == "".join(completion.split())


def test_run_without_an_instruction_and_compare_without_steering():
    plain = directer("run", "Describe Paris.", "--method", "zero-shot", "--max-new-tokens", "2")
    assert plain.returncode == 0 and "instruction detected" not in plain.stderr, plain.stderr
    refused = directer("run", "Describe Paris.", "--method", "zero-shot", "--compare")
    assert refused.returncode == 2 and "--method zero-shot does not steer" in refused.stderr


def test_run_pasta_with_a_head_config_file(tmp_path):
    args = ["run", "Write a haiku about the sea.", "--instruction", "Answer in all capital letters.",
            "--max-new-tokens", "8", "--method", "pasta", "--json"]  # fmt: skip
    heads = tmp_path / "heads.json"
    heads.write_text(json.dumps({"10": [0, 1, 2], "12": [4]}))
    result, default = directer(*args, "--pasta-heads", str(heads)), directer(*args)
    assert result.returncode == 0 == default.returncode, result.stderr + default.stderr
    steps = json.loads(result.stdout)["telemetry"]
    assert {step["layers"] for step in steps} == {2}  # the two layers of the file, every step
    assert {step["layers"] for step in json.loads(default.stdout)["telemetry"]} == {15}  # the middle half of 30
    bad = directer(*args, "--pasta-heads", '{"10": "all"}')
    assert bad.returncode == 2 and "pasta_heads: layer 10 needs a non-empty list" in bad.stderr
    missing = directer(*args, "--pasta-heads", str(tmp_path / "none.json"))
    assert missing.returncode == 2 and "cannot read" in missing.stderr


def test_trust_remote_code_is_off_unless_asked_and_warns_when_on():
    args = ["run", "Name a color.", "--max-new-tokens", "2", "--spans", "none", "--json"]
    quiet, trusting = directer(*args), directer(*args, "--trust-remote-code")
    assert quiet.returncode == 0 == trusting.returncode, quiet.stderr + trusting.stderr
    assert "trust_remote_code is on" not in quiet.stderr
    assert "warning: trust_remote_code is on: Python code from the repository of model 'smollm2-135m'" in (
        " ".join(trusting.stderr.split())
    )
    for command in ("generate", "eval", "bench"):
        assert "--trust-remote-code" in directer(command, "--help").stdout
