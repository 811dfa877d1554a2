"""``directer generate`` end to end: real Ray Data, two actors, Parquet shards, errors, resume, ranking cache."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from directer import Directer, SteeringConfig
from directer.spans import DETECTOR
from pipeline.config import GenerateConfig
from pipeline.run import generate

MAX_NEW = 8
GOOD = [
    (f"Write one sentence about {topic}. {instruction}", instruction)
    for topic in ("rain", "cats", "tea", "maps", "bees", "snow", "jazz", "moss", "kites", "ink", "owls", "figs")
    for instruction in ("Answer in French.", "Use all capital letters.")
][:21]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """Four Parquet shards: 21 good rows and 7 planted bad ones (one shard types ``instruction`` as int)."""
    folder = tmp_path_factory.mktemp("inputs")
    rows = [{"id": f"good-{i:02d}", "prompt": p, "instruction": s, "source": "test"} for i, (p, s) in enumerate(GOOD)]
    bad = [
        {"id": "no-prompt", "prompt": None, "instruction": "Be brief.", "source": "test"},
        {"id": "empty-prompt", "prompt": "  ", "instruction": None, "source": "test"},
        {"id": "not-found", "prompt": "Name a color.", "instruction": "Answer in German.", "source": "test"},
        {"id": "too-long", "prompt": "word " * 9000, "instruction": None, "source": "test"},
        {"id": "twin", "prompt": "Say hi.", "instruction": None, "source": "test"},
        {"id": "twin", "prompt": "Say bye.", "instruction": None, "source": "test"},
    ]
    expected_errors = {
        "no-prompt": "prompt: missing",
        "empty-prompt": "prompt: empty",
        "not-found": "instruction: 'Answer in German.' is not in the prompt",
        "too-long": "prompt: ",
        "twin": "id: 'twin' appears 2 times",
        "typed": "instruction: expected a string, got int",
    }
    pq.write_table(pa.Table.from_pylist(rows[:8] + bad[:2]), folder / "part-0.parquet")
    pq.write_table(pa.Table.from_pylist(rows[8:15] + bad[2:6]), folder / "part-1.parquet")
    pq.write_table(pa.Table.from_pylist(rows[15:]), folder / "part-2.parquet")
    typed = [{"id": "typed", "prompt": "Count to three.", "instruction": 3, "source": "test"}]
    pq.write_table(pa.Table.from_pylist(typed), folder / "part-3.parquet")
    return folder, expected_errors


def read_output(output: Path) -> list[dict]:
    return pads.dataset(str(output / "data"), format="parquet").to_table().to_pylist()


@pytest.fixture(scope="module")
def first_run(shards, tmp_path_factory):
    folder, _ = shards
    output = tmp_path_factory.mktemp("run")
    config = GenerateConfig(
        inputs=(str(folder / "*.parquet"),), output=str(output), actors=2, batch_size=4,
        steering=SteeringConfig(max_new_tokens=MAX_NEW),
    )  # fmt: skip
    report = generate(config, progress=False)
    return config, report, read_output(output)


def test_one_row_per_input_row_with_errors_named(shards, first_run):
    _, expected_errors = shards
    _, report, rows = first_run
    assert len(rows) == 28 and report.rows == 28
    assert Counter(r["id"] for r in rows) == Counter(
        [f"good-{i:02d}" for i in range(21)] + [*expected_errors] + ["twin"]
    )
    for row in rows:
        if row["id"] in expected_errors:
            assert row["status"] == "error" and expected_errors[row["id"]] in row["error"], row["error"]
        else:
            assert row["status"] == "ok" and row["error"] is None
            assert row["source"] == "test"  # passthrough
            assert 0 < row["completion_tokens"] == len(row["token_ids"]) == len(row["telemetry"]) <= MAX_NEW
            assert row["model"] == "smollm2-135m@float32" and row["method"] == "directer"
            assert row["config_fingerprint"] == SteeringConfig(max_new_tokens=MAX_NEW).fingerprint()
            assert row["ranking_cache"] == "miss" and sorted(row["ranking"]) == list(range(30))
    assert report.ok == 21 and report.errors == 7
    manifest = json.loads((Path(first_run[0].output) / "run.json").read_text())
    assert manifest["totals"] == {"rows": 28, "ok": 21, "error": 7}


def test_rows_equal_the_engines_own_outputs(smollm2, first_run):
    _, _, rows = first_run
    steerer = Directer(smollm2, SteeringConfig(max_new_tokens=MAX_NEW))
    good = {r["id"]: r for r in rows if r["status"] == "ok"}
    ids = sorted(good)
    completions = steerer.generate([(good[i]["prompt"], good[i]["instruction"]) for i in ids], batch_size=8)
    for row_id, completion in zip(ids, completions):
        assert good[row_id]["token_ids"] == completion.token_ids
        assert good[row_id]["completion"] == completion.text
        assert [s["layers"] for s in good[row_id]["telemetry"]] == [s.layers for s in completion.telemetry]


def test_resume_after_losing_part_of_the_output(first_run):
    config, _, rows = first_run
    files = sorted((Path(config.output) / "data").glob("*.parquet"))
    lost = pq.read_table(files[0]).column("id").to_pylist()
    files[0].unlink()
    report = generate(config, progress=False)
    assert report.rows == len(lost) and report.skipped == 28 - len(lost)
    after = read_output(Path(config.output))
    assert Counter(r["id"] for r in after) == Counter(r["id"] for r in rows)
    again = generate(config, progress=False)
    assert again.rows == 0 and again.skipped == 28


def test_another_beta_reuses_the_rankings(shards, first_run, tmp_path):
    folder, _ = shards
    config, _, rows = first_run
    other = GenerateConfig(
        inputs=(str(folder),), output=str(tmp_path / "beta"), actors=2, batch_size=4,
        steering=SteeringConfig(max_new_tokens=MAX_NEW, beta=0.3), ranking_cache=str(config.ranking_cache_dir),
    )  # fmt: skip
    report = generate(other, progress=False)
    assert report.ranking_cache == {"hits": 21, "misses": 0}
    rankings = {r["id"]: r["ranking"] for r in rows if r["status"] == "ok"}
    for row in read_output(tmp_path / "beta"):
        if row["status"] == "ok":
            assert row["ranking_cache"] == "hit" and row["ranking"] == rankings[row["id"]]


def test_overwrite_starts_over(first_run, tmp_path):
    config, _, _ = first_run
    report = generate(
        GenerateConfig(inputs=config.inputs, output=config.output, actors=2, batch_size=8, overwrite=True,
                       steering=SteeringConfig(method="zero-shot", max_new_tokens=4)),
        progress=False,
    )  # fmt: skip
    assert report.rows == 28 and report.skipped == 0
    assert {r["method"] for r in read_output(Path(config.output))} == {"zero-shot"}


def test_bad_configuration_fails_before_ray(tmp_path):
    from directer.models import ModelNotFoundError
    from pipeline.inputs import InputError

    with pytest.raises(InputError, match="input not found"):
        generate(GenerateConfig(inputs=(str(tmp_path / "missing.parquet"),), output=str(tmp_path / "out")))
    (tmp_path / "in.jsonl").write_text(json.dumps({"id": "a", "prompt": "hi"}) + "\n")
    with pytest.raises(ModelNotFoundError, match="unknown model"):
        generate(GenerateConfig(inputs=(str(tmp_path / "in.jsonl"),), output=str(tmp_path / "out"), model="nope"))


def test_row_forms_from_jsonl_and_a_datasets_folder(tmp_path):
    import datasets

    rows = [
        {"id": "task", "task": "Describe a harbour.", "instruction": "Answer in lowercase."},
        {"id": "chat", "messages": [{"role": "user", "content": "Name a tree. Be brief."}], "instruction": "Be brief."},
        {"id": "spans", "prompt": "Answer in French. Describe Lyon.", "instruction_spans": [[0, 17]]},
        {"id": "auto", "prompt": "Tell me about Mars. Your answer must contain exactly 3 bullet points."},
    ]
    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    datasets.Dataset.from_list(
        [{"id": "hf", "prompt": "Name a color. Use one word.", "instruction": "Use one word."}]
    ).save_to_disk(str(tmp_path / "hf"))
    sources = {"auto": "auto", "none": "none"}
    for mode in sources:
        config = GenerateConfig(
            inputs=(str(tmp_path / "rows.jsonl"), str(tmp_path / "hf")), output=str(tmp_path / mode), spans=mode,
            steering=SteeringConfig(max_new_tokens=4),
        )  # fmt: skip
        report = generate(config, progress=False)
        assert report.ok == 5 and report.errors == 0
        out = {r["id"]: r for r in read_output(tmp_path / mode)}
        assert {i: r["span_source"] for i, r in out.items()} == {
            "task": "task", "chat": "instruction", "spans": "instruction_spans", "hf": "instruction", "auto": mode
        }  # fmt: skip
        assert (out["auto"]["instruction_tokens"] > 0) == (mode == "auto")
        assert {i: r["span_detector"] for i, r in out.items() if r["span_detector"]} == (
            {"auto": DETECTOR} if mode == "auto" else {}
        )
        assert (out["auto"]["ranking"] is not None) == (mode == "auto")


def test_a_folder_holding_another_run_is_not_resumed(tmp_path):
    import subprocess
    import sys

    rows = [{"id": f"r{i}", "prompt": f"Name a color. {s}", "instruction": s} for i, s in enumerate(["Be brief."] * 2)]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"id": "other", "prompt": "Say hi."}) + "\n")
    output = tmp_path / "out"
    generate(GenerateConfig(inputs=(str(tmp_path / "a.jsonl"),), output=str(output),
                            steering=SteeringConfig(max_new_tokens=3)), progress=False)  # fmt: skip
    manifest = (output / "run.json").read_text()
    assert json.loads(manifest)["config"]["ranking_cache"] == str(output / "ranking_cache")

    def cli(*args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "jobs.cli", "generate", "--output", str(output), "--max-new-tokens", "3"]
        root = Path(__file__).resolve().parents[1]
        return subprocess.run([*command, *args], cwd=root, capture_output=True, text=True, timeout=600)

    beta = cli(str(tmp_path / "a.jsonl"), "--beta", "0.7")
    assert beta.returncode == 2 and "steering.beta 0.5 -> 0.7" in beta.stderr and "--overwrite" in beta.stderr
    other = cli(str(tmp_path / "b.jsonl"))
    assert other.returncode == 2 and f"inputs {tmp_path / 'a.jsonl'} -> {tmp_path / 'b.jsonl'}" in other.stderr
    assert (output / "run.json").read_text() == manifest
    assert sorted(r["id"] for r in read_output(output)) == ["r0", "r1"]


def test_a_folder_moved_with_its_inputs_still_resumes(tmp_path):
    """An evaluation folder holds its inputs beside its runs; moved or cloned elsewhere, it resumes."""
    import shutil

    folder = tmp_path / "eval"
    folder.mkdir()
    (folder / "inputs.jsonl").write_text(json.dumps({"id": "r0", "prompt": "Name a color. Be brief."}) + "\n")
    steering = SteeringConfig(max_new_tokens=2)
    generate(GenerateConfig(inputs=(str(folder / "inputs.jsonl"),), output=str(folder / "runs" / "a"),
                            steering=steering), progress=False)  # fmt: skip
    moved = shutil.move(folder, tmp_path / "elsewhere")
    report = generate(GenerateConfig(inputs=(str(moved / "inputs.jsonl"),), output=str(moved / "runs" / "a"),
                                     steering=steering), progress=False)  # fmt: skip
    assert report.skipped == 1 and report.rows == 0


def test_resume_compares_what_changes_the_method_s_tokens(tmp_path):
    """A folder resumes under settings that do not change its method's tokens (zero-shot ignores beta and
    the ranking; the trial schedule changes nobody's), and refuses those that do, naming them."""
    from pipeline.resume import check_resumable
    from pipeline.run import write_manifest

    source = tmp_path / "a.jsonl"
    source.write_text(json.dumps({"id": "r0", "prompt": "Say hi."}) + "\n")
    files = [str(source.resolve())]

    def config(**steering) -> GenerateConfig:
        return GenerateConfig(inputs=(str(source),), output=str(tmp_path / "out"), steering=SteeringConfig(**steering))

    write_manifest(config(method="zero-shot"), None, files)
    check_resumable(config(method="zero-shot", beta=0.9, ranking="received", trial_schedule="lazy"), files)
    with pytest.raises(ValueError, match="steering.max_new_tokens 256 -> 8"):
        check_resumable(config(method="zero-shot", max_new_tokens=8), files)
    write_manifest(config(), None, files)
    check_resumable(config(trial_schedule="lazy"), files)
    with pytest.raises(ValueError, match="steering.ranking 'caused' -> 'received'.*--overwrite"):
        check_resumable(config(ranking="received"), files)


def test_resume_keeps_one_row_per_input_row_without_ids_and_with_repeated_ids(tmp_path):
    """Rows without an id or with a repeated id cannot be told apart in the output: when an interrupted run
    wrote fewer of them than the input holds, the rerun runs the group again, never one row twice or none."""
    rows = [{"id": "a", "prompt": "Say hi."}, {"id": "b", "prompt": "Say bye."}, {"id": "twin", "prompt": "Say yes."},
            {"id": "twin", "prompt": "Say no."}, {"prompt": "Say why."}, {"prompt": "Say how."}]  # fmt: skip
    (tmp_path / "in.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    config = GenerateConfig(inputs=(str(tmp_path / "in.jsonl"),), output=str(tmp_path / "out"),
                            steering=SteeringConfig(method="zero-shot", max_new_tokens=2))  # fmt: skip
    generate(config, progress=False)
    want = Counter(r.get("id") for r in rows)
    assert Counter(r["id"] for r in read_output(tmp_path / "out")) == want

    # an interruption that kept "b", one twin and one row without an id
    written = pads.dataset(str(tmp_path / "out" / "data"), format="parquet").to_table()
    for path in (tmp_path / "out" / "data").glob("*.parquet"):
        path.unlink()
    kept = [written.column("id").to_pylist().index(i) for i in ("b", "twin", None)]
    pq.write_table(written.take(kept), tmp_path / "out" / "data" / "kept.parquet")
    (tmp_path / "out" / "data" / "torn.parquet").write_bytes(b"PAR1 not a whole file")  # a disk's damage

    report = generate(config, progress=False)
    assert (report.rows, report.skipped) == (5, 1)  # a, both twins and both rows without an id
    assert (tmp_path / "out" / "broken" / "torn.parquet").exists()  # set aside, out of data/, not lost
    after = read_output(tmp_path / "out")
    assert Counter(r["id"] for r in after) == want
    assert {r["error"] for r in after if r["id"] in ("twin", None)} == {
        "id: 'twin' appears 2 times in the input; ids must be unique", "id: missing or empty"
    }  # fmt: skip
    again = generate(config, progress=False)
    assert (again.rows, again.skipped) == (0, 6)


def test_a_rerun_in_another_dtype_is_refused_until_the_dtype_is_named(tmp_path):
    """Rows written in float32 (the CPU's default) are not joined by rows in another dtype: a CPU run
    resumed on a GPU would otherwise mix precisions without a changed option to show it."""
    rows = [{"id": f"r{i}", "prompt": f"Say {word}."} for i, word in enumerate(["hi", "bye"])]
    (tmp_path / "in.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")

    def config(**options) -> GenerateConfig:
        steering = SteeringConfig(method="zero-shot", max_new_tokens=2)
        return GenerateConfig(inputs=(str(tmp_path / "in.jsonl"),), output=str(tmp_path / "out"), steering=steering,
                              **options)  # fmt: skip

    generate(config(), progress=False)
    assert generate(config(dtype="bfloat16"), progress=False).skipped == 2  # nothing to add: nothing mixes
    written = pads.dataset(str(tmp_path / "out" / "data"), format="parquet").to_table()
    for path in (tmp_path / "out" / "data").glob("*.parquet"):
        path.unlink()
    pq.write_table(written.slice(0, 1), tmp_path / "out" / "data" / "kept.parquet")  # one row lost
    with pytest.raises(ValueError, match="holds rows generated in float32; this run would generate in bfloat16: "
                                         "pass --dtype float32"):  # fmt: skip
        generate(config(dtype="bfloat16"), progress=False)
    report = generate(config(dtype="float32"), progress=False)
    assert (report.rows, report.skipped) == (1, 1)
    assert {r["model"] for r in read_output(tmp_path / "out")} == {"smollm2-135m@float32"}


def test_a_row_the_chat_template_refuses_is_an_error_row_and_the_run_goes_on(smollm2, tmp_path):
    """A model whose template refuses system turns (as Gemma's does): that row's error names the field and
    the template's words, and the other rows are generated."""
    from directer.models import cache_dir

    bundled = cache_dir() / "models" / "smollm2-135m"
    model = tmp_path / "refuses-system"
    model.mkdir()
    for source in bundled.iterdir():
        (model / source.name).symlink_to(source)
    (model / "chat_template.jinja").unlink()
    (model / "chat_template.jinja").write_text(
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}<|im_start|>assistant\n"
    )
    rows = [
        {"id": "system", "messages": [{"role": "system", "content": "Be brief."},
                                      {"role": "user", "content": "Describe Rome. Be brief."}]},
        {"id": "user", "prompt": "Describe Rome. Be brief.", "instruction": "Be brief."},
    ]  # fmt: skip
    source = tmp_path / "rows.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = GenerateConfig(inputs=(str(source),), output=str(tmp_path / "out"), model=str(model),
                            steering=SteeringConfig(max_new_tokens=4), score_nll=True)  # fmt: skip
    report = generate(config, progress=False)
    written = {r["id"]: r for r in pads.dataset(str(tmp_path / "out" / "data")).to_table().to_pylist()}
    assert (report.ok, report.errors) == (1, 1)
    assert written["system"]["status"] == "error"
    assert written["system"]["error"] == "messages: the model's chat template refuses it: System role not supported"
    assert written["user"]["status"] == "ok" and written["user"]["nll"] > 0


def test_a_json_array_file_and_columns_named_as_the_output_s(tmp_path):
    """A ``.json`` dataset written as one pretty-printed array (it gave an error row per line), whose rows
    carry their own ``model`` and ``completion`` (they were dropped): every element is a row, and those
    columns are kept beside the run's own as ``input_model`` and ``input_completion``."""
    rows = [
        {"id": "a", "prompt": "Describe Rome. Be brief.", "instruction": "Be brief.", "model": "gpt-x",
         "completion": "Rome is old."},
        {"id": "b", "prompt": "Describe Paris. Be brief.", "instruction": "Be brief.", "model": "gpt-y",
         "completion": None},
        [1, 2],
    ]  # fmt: skip
    source = tmp_path / "rows.json"
    source.write_text(json.dumps(rows, indent=2))
    steering = SteeringConfig(max_new_tokens=2)
    config = GenerateConfig(inputs=(str(source),), output=str(tmp_path / "out"), steering=steering)
    report = generate(config, progress=False)
    written = pads.dataset(str(tmp_path / "out" / "data")).to_table().to_pylist()
    assert (report.ok, report.errors, len(written)) == (2, 1, 3)
    by_id = {r["id"]: r for r in written}
    assert (by_id["a"]["input_model"], by_id["a"]["input_completion"]) == ("gpt-x", "Rome is old.")
    assert by_id["a"]["model"].startswith("smollm2-135m@") and by_id["a"]["completion"] != "Rome is old."
    assert by_id[None]["error"] == "line: not a JSON object but list"


def test_partial_files_a_killed_actor_left_in_the_ranking_cache_are_removed_once_stale(tmp_path):
    """A run removes the ranking cache's partial files older than an hour (a killed actor's), and leaves a
    fresh one alone: another run sharing the folder may be writing it now."""
    import os
    import time

    from pipeline.outputs import discard_partial

    stale, fresh, kept = (tmp_path / name for name in (".a.parquet.partial", ".b.parquet.partial", "c.parquet"))
    for path in (stale, fresh, kept):
        path.write_bytes(b"x")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    discard_partial(tmp_path, older_than=3600)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".b.parquet.partial", "c.parquet"]
