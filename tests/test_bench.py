"""``directer bench --json`` as a user types it, cut down to a few prompts and tokens."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from directer.models import model_source

ROOT = Path(__file__).resolve().parents[1]

RATIO_KEYS = {
    "zero_shot_vs_hf_b1", "zero_shot_vs_hf_b16", "directer_vs_zero_shot_b1", "directer_vs_zero_shot_b16",
    "directer_b1_vs_plain_b1", "directer_b16_vs_plain_b1", "memory_directer_vs_zero_shot", "pipeline_vs_engine_b16",
}  # fmt: skip


def test_bench_json_has_every_ratio_and_the_same_tokens_per_method():
    result = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "bench", "--prompts", "3", "--b1-prompts", "2", "--max-new-tokens", "6",
         "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    assert set(payload["ratios"]) == RATIO_KEYS
    assert all(value > 0 for value in payload["ratios"].values())
    measured = payload["measurements"]
    assert set(measured) == {f"{m}_b{s}" for m in ("hf", "zero_shot", "directer") for s in (1, 16)} | {"plain_b1"}
    # greedy everywhere: generate and the zero-shot engine emit the same tokens, so the same count
    assert measured["hf_b1"]["tokens"] == measured["zero_shot_b1"]["tokens"]
    assert measured["hf_b16"]["tokens"] == measured["zero_shot_b16"]["tokens"]
    assert measured["directer_b1"]["tokens"] == measured["plain_b1"]["tokens"]
    assert payload["pipeline"]["tokens"] == measured["directer_b16"]["tokens"]
    assert payload["pipeline"]["startup_seconds"] > 0 and payload["pipeline"]["model_load_seconds"] > 0


def test_bench_names_its_figures_after_the_method():
    result = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "bench", "--method", "pasta+gate", "--prompts", "2", "--b1-prompts", "1",
         "--batch-sizes", "1,2", "--max-new-tokens", "4", "--no-pipeline", "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    assert set(payload["measurements"]) == {f"{m}_b{s}" for m in ("hf", "zero_shot", "pasta+gate") for s in (1, 2)}
    assert set(payload["ratios"]) == {"zero_shot_vs_hf_b1", "zero_shot_vs_hf_b2", "pasta+gate_vs_zero_shot_b1",
                                      "pasta+gate_vs_zero_shot_b2", "memory_pasta+gate_vs_zero_shot"}  # fmt: skip


def test_the_device_check_runs_on_a_cpu_where_every_setting_agrees(smollm2, tmp_path):
    """``benchmarks/gpu_check.py`` is what a GPU machine runs; on the CPU against itself it must agree. Given
    only the bundled model's config and tokenizer files (what travels to a GPU machine that cannot hold its
    weights), it says it skips that model and goes on to the next."""
    converted, _ = model_source("smollm2-135m")
    tokenizer_only = tmp_path / "models" / "smollm2-135m"
    tokenizer_only.mkdir(parents=True)
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "chat_template.jinja"):  # fmt: skip
        shutil.copy(Path(converted) / name, tokenizer_only)
    result = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", "--device", "cpu", "--dtypes", "float32",
         "--models", f"smollm2-135m,{converted}", "--prompts", "2", "--max-new-tokens", "4"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "DIRECTER_CACHE": str(tmp_path)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    skipped, *records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert skipped["model"] == "smollm2-135m" and "model.safetensors" in skipped["skipped"]
    assert [(r["model"], r["method"]) for r in records] == [(str(converted), "zero-shot"), (str(converted), "directer")]
    for record in records:
        identical, total = record["tokens_agreeing"].split("/")
        assert record["prompts_identical"] == "2/2" and identical == total and int(total) > 0
        weights = sum(p.numel() * p.element_size() for p in smollm2.model.parameters())
        assert record["planned_mib"] > weights / 2**20  # the weights and a batch


def test_the_continuous_batching_measurement_ends_rows_early_with_an_end_share():
    """``benchmarks/continuous.py`` as the device check runs it: with ``--end-share`` rows end at drawn
    tokens too (a random-weight model never reaches its end-of-sequence id), so refills happen."""
    result = subprocess.run(
        [sys.executable, "benchmarks/continuous.py", "--prompts", "4", "--batch-size", "2", "--max-new-tokens", "6",
         "--end-share", "0.3"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": f"benchmarks{os.pathsep}."},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    payload = json.loads(result.stdout.splitlines()[0])
    static, continuous = payload["static"], payload["continuous"]
    assert 0 < static["generated"] < 4 * 6 and 0 < continuous["generated"] < 4 * 6
    assert continuous["passes_with_prefills"] >= 2  # the first pass's, and at least one refill's
