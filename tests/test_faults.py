"""Faults a long run meets, through ``directer generate`` as a user's shell runs it: an actor that dies
mid-run, a disk that fills, and whether the same input gives the same bytes across runs and actor
counts. Faults are injected with ``DIRECTER_INJECT_FAULT`` (``pipeline/faults.py``)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from test_jobs import cli, write_rows
from test_local_ray import local_environment

ROWS = 6


def run(tmp_path: Path, name: str, *options: str, fault: str | None = None):
    env = local_environment(tmp_path)
    if fault:
        env["DIRECTER_INJECT_FAULT"] = fault
    inputs = tmp_path / "in.jsonl"
    if not inputs.exists():
        write_rows(inputs, ROWS)
    return cli("generate", str(inputs), "--output", str(tmp_path / name), "--batch-size", "1",
               "--max-new-tokens", "6", "--examples", "0", *options, env=env, timeout=600)  # fmt: skip


def completions(output: Path) -> dict[str, tuple[str, list[int]]]:
    """id -> (completion, token ids); fails on an id written twice."""
    rows = pads.dataset(str(output / "data"), format="parquet").to_table().to_pylist()
    by_id = {row["id"]: (row["completion"], row["token_ids"]) for row in rows if row["status"] == "ok"}
    assert len(by_id) == len(rows) == ROWS, [(r["id"], r["status"], r["error"]) for r in rows]
    return by_id


def ids_in(path: Path) -> list[str]:
    return pq.read_table(path, columns=["id"]).column("id").to_pylist()


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> dict[str, tuple[str, list[int]]]:
    folder = tmp_path_factory.mktemp("clean")
    result = run(folder, "out", "--actors", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr == ""  # off a terminal: no bar, no blank line, no Ray lines
    return completions(folder / "out")


def test_a_repeat_and_two_actors_give_byte_identical_completions(clean, tmp_path):
    assert run(tmp_path, "again", "--actors", "1").returncode == 0
    assert completions(tmp_path / "again") == clean
    assert run(tmp_path, "two", "--actors", "2").returncode == 0
    assert completions(tmp_path / "two") == clean


def test_an_actor_killed_mid_run_loses_no_row_and_duplicates_none(clean, tmp_path):
    marker = tmp_path / "killed"
    result = run(tmp_path, "out", "--actors", "2", fault=f"actor-exit:{marker}")
    assert marker.exists()  # an actor did die, after generating a batch it never returned
    assert result.returncode == 0, result.stderr[-3000:]
    assert "6 written (6 ok, 0 error)" in result.stdout
    assert completions(tmp_path / "out") == clean  # Ray restarted it and ran the batch again


def test_a_full_disk_fails_naming_the_file_and_the_rerun_resumes(clean, tmp_path):
    data = tmp_path / "out" / "data"
    result = run(tmp_path, "out", fault="disk-full:2")
    assert result.returncode == 2, result.stderr[-3000:]
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith(f"error: cannot write {data}/") and ".parquet: No space left on device" in message
    assert "rerun the same command to resume" in message and "Traceback" not in result.stderr
    assert len(list(data.glob("*.parquet"))) == 2 and not list(data.glob(".*"))  # nothing half-written

    rerun = run(tmp_path, "out")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "already done" in rerun.stdout
    assert completions(tmp_path / "out") == clean


def test_a_row_out_of_memory_is_an_error_row_and_the_rerun_runs_it_again(clean, tmp_path):
    """A failure of the run, not of the row (the device out of memory), is not final: the same command
    replaces that error row with the row's completion, and leaves the other rows as they were."""
    first = run(tmp_path, "out", fault="out-of-memory:row-3")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "6 written (5 ok, 1 error)" in first.stdout
    data = tmp_path / "out" / "data"
    rows = {r["id"]: r for r in pads.dataset(str(data), format="parquet").to_table().to_pylist()}
    assert rows["row-3"]["error"] == "engine: OutOfMemoryError: injected for rows row-3, 1 together"
    untouched = {path: path.stat().st_mtime_ns for path in data.glob("*.parquet") if "row-3" not in ids_in(path)}

    rerun = run(tmp_path, "out")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "1 written (1 ok, 0 error), 5 already done, 1 retried" in rerun.stdout
    assert completions(tmp_path / "out") == clean
    assert all(path.stat().st_mtime_ns == mtime for path, mtime in untouched.items())


def test_a_call_out_of_memory_is_split_in_halves_not_run_row_by_row(tmp_path, monkeypatch):
    """A call that fails is retried as two halves, each decoding at most half as many rows together, down
    to the size that fits: rows come out as a clean call gives them, and no row decodes alone."""
    import pyarrow as pa

    from directer import SteeringConfig
    from directer.steering import STEERERS
    from pipeline.config import GenerateConfig
    from pipeline.stage import GenerateStage

    rows = [json.loads(line) for line in write_rows(tmp_path / "in.jsonl", 8).read_text().splitlines()]
    config = GenerateConfig(inputs=("in.jsonl",), output=str(tmp_path / "out"), batch_size=8, gpus_per_actor=0,
                            steering=SteeringConfig(max_new_tokens=4))  # fmt: skip
    stage = GenerateStage(config, {}, STEERERS["directer"])
    clean = stage(pa.Table.from_pylist(rows)).select(["id", "status", "token_ids"]).to_pylist()

    calls = []
    complete = stage.directer.complete

    def recorded(prompts, steering, batch_size, *rest):
        calls.append((len(prompts), batch_size))
        return complete(prompts, steering, batch_size, *rest)

    monkeypatch.setattr(stage.directer, "complete", recorded)
    monkeypatch.setenv("DIRECTER_INJECT_FAULT", "out-of-memory-above:2")
    split = stage(pa.Table.from_pylist(rows)).select(["id", "status", "token_ids"]).to_pylist()
    assert split == clean and {row["status"] for row in split} == {"ok"}
    assert calls == [(2, 2)] * 4  # 8 together failed, then 4 and 4 (the fault comes before the engine)
