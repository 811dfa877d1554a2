"""The memory plan: its buffers against what the engine allocates, its total against measured peak
memory, the batch size it chooses, and failing before anything loads when a batch cannot fit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from directer import Directer
from directer.cache import KVCache
from directer.config import SteeringConfig
from directer.memory import MemoryPlanError
from directer.prompts import build_prompt, prompt_from_row

ROOT = Path(__file__).resolve().parents[1]


def prompts_of(directer: Directer, count: int, words: int = 40):
    """``count`` prompts of one token length, each with an instruction of one token length."""
    task = " ".join(["sea"] * words)
    return [build_prompt(directer.tokenizer, f"{task} Answer in capitals.", instruction="Answer in capitals.")] * count


@pytest.mark.parametrize("method", ["directer", "pasta"])
def test_the_plans_buffers_are_what_the_engine_allocates(smollm2, monkeypatch, method):
    """Every cache buffer (keys, values and the scaled instruction copies) summed at its largest, per row,
    equals the plan's ``kv_cache`` + ``instruction_keys`` exactly."""
    largest = {"bytes": 0}
    scaled_span = KVCache.scaled_span

    def spy(cache, layer, scale):
        out = scaled_span(cache, layer, scale)
        stores = (cache.keys, cache.values, cache.span_keys, cache.span_values)
        held = sum(t.numel() * t.element_size() for store in stores for t in store.values())
        largest["bytes"] = max(largest["bytes"], held)
        return out

    monkeypatch.setattr(KVCache, "scaled_span", spy)
    write_prompt = KVCache.write_prompt

    def spy_prompt(cache, layer, key, value, rows, first_slot):
        write_prompt(cache, layer, key, value, rows, first_slot)
        held = sum(t.numel() * t.element_size() for store in (cache.keys, cache.values) for t in store.values())
        largest["bytes"] = max(largest["bytes"], held)

    monkeypatch.setattr(KVCache, "write_prompt", spy_prompt)
    directer = Directer(smollm2)
    config = SteeringConfig(method=method, max_new_tokens=4)
    prompts = prompts_of(directer, 3)
    directer.complete(prompts, config, batch_size=3)
    plan = directer.plan_batch(prompts, config)
    assert largest["bytes"] == 3 * (plan.per_row["kv_cache"] + plan.per_row.get("instruction_keys", 0))


def test_the_plan_is_within_ten_percent_of_measured_peak_memory():
    """A fresh process: resident memory after loading and at the peak of one batch (benchmarks/memory_plan.py)."""
    result = subprocess.run(
        [sys.executable, "benchmarks/memory_plan.py", "--batch-size", "8", "--prompt-tokens", "128",
         "--max-new-tokens", "8", "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    measured = json.loads(result.stdout)
    assert 0.9 <= measured["total"]["ratio"] <= 1.1, measured


def test_unset_batch_size_takes_the_most_rows_that_fit(smollm2, monkeypatch):
    """With a budget for exactly three rows, three rows decode together (each finished one's place taken
    by the next), and each row's tokens are those it gets alone."""
    directer = Directer(smollm2)
    config = SteeringConfig(max_new_tokens=6)
    prompts = prompts_of(directer, 7)
    directer.memory_budget = directer.plan_batch(prompts, config).total(3)
    sizes = []
    generate = directer.engine.generate

    def spy(requests, steering, batch_size):
        sizes.append((len(requests), batch_size))
        return generate(requests, steering, batch_size)

    monkeypatch.setattr(directer.engine, "generate", spy)
    chosen = directer.complete(prompts, config)
    assert sizes == [(7, 3)]
    alone = directer.complete(prompts[:1], config, batch_size=1)
    assert all(c.token_ids == alone[0].token_ids for c in chosen)


def test_a_batch_that_does_not_fit_fails_before_decoding(smollm2, monkeypatch):
    directer = Directer(smollm2)
    config = SteeringConfig(max_new_tokens=6)
    prompts = prompts_of(directer, 4)
    directer.memory_budget = directer.plan_batch(prompts, config).total(2)
    monkeypatch.setattr(directer.engine, "generate", lambda *args: pytest.fail("decoded a batch that does not fit"))
    with pytest.raises(MemoryPlanError, match="a batch of 4 rows .* the most that fit is 2"):
        directer.complete(prompts, config, batch_size=4)


def directer_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "jobs.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )


def test_generate_refuses_a_batch_that_cannot_fit_before_the_model_loads(tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"id": "a", "prompt": "Say hi. Answer in capitals."}) + "\n")
    out = directer_cli("generate", str(rows), "-o", str(tmp_path / "out"), "--batch-size", "1000000",
                       "--max-new-tokens", "4096")  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    assert "a batch of 1000000 rows" in " ".join(out.stderr.split())
    assert not (tmp_path / "out" / "data").exists()


def test_plan_command_reads_inputs_and_checks_a_batch_size(smollm2, tmp_path):
    """The longest templated prompt of the inputs is planned for; a batch that does not fit exits 1."""
    rows = tmp_path / "rows.jsonl"
    lines = [{"prompt": "Hi. Answer in capitals."}, {"prompt": "Tell me about the sea. " * 20 + "Answer in capitals."}]
    rows.write_text("".join(json.dumps(row) + "\n" for row in lines))
    out = directer_cli("plan", str(rows), "--max-new-tokens", "64", "--json")
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    assert plan["prompts"] == 2
    assert plan["prompt_tokens"] == max(len(prompt_from_row(smollm2.tokenizer, row).token_ids) for row in lines)
    assert plan["weights"] == 4 * sum(p.numel() for p in smollm2.model.parameters())
    too_many = directer_cli("plan", "--prompt-tokens", "512", "--memory", "1", "--batch-size", "64")
    assert too_many.returncode == 1
    assert "does NOT fit" in too_many.stdout


def test_plan_for_a_gpu_this_machine_lacks():
    out = directer_cli("plan", "--model", "smollm2-1.7b-random", "--device", "cuda", "--memory", "80",
                       "--prompt-tokens", "1024", "--json")  # fmt: skip
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    assert plan["dtype"] == "bfloat16" and plan["workspace"] == {}
    assert plan["max_batch"] == (plan["budget"] - plan["runtime"] - plan["weights"]) // plan["row_bytes"]
    assert plan["chosen_batch"] == min(plan["max_batch"], 128)
