"""Bad options and inputs end in one clear line, never a traceback, and leave nothing behind."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def directer(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "jobs.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )


def fails_with(result: subprocess.CompletedProcess, message: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert message in " ".join(result.stderr.split()), result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "Say hi.", "--device", "tpu"], "unknown device 'tpu'"),
        (["run", "Say hi.", "--device", "cuda"], "device 'cuda': torch sees no cuda device"),
        (["ifeval", "--output", "x.parquet", "--limit", "-1"], "Invalid value for '--limit'"),
        (["ifeval", "--output", "x.parquet", "--limit", "0"], "Invalid value for '--limit'"),
        (["eval", "--limit", "0"], "Invalid value for '--limit'"),
        (["ifeval", "--output", "rows.txt"], "name a .parquet or .jsonl file"),
        (["report", "no-such-folder"], "no such folder: no-such-folder"),
        (["generate", "s3://bucket/prompts/", "-o", "out"], "s3://bucket/prompts/: remote URIs are not read yet"),
        (["generate", "examples/sample_prompts.jsonl", "-o", "s3://bucket/out"], "remote URIs are not written yet"),
    ],
)
def test_bad_options_fail_in_one_line(args, message):
    fails_with(directer(*args), message)


def test_ifeval_output_is_a_file_of_the_named_format(tmp_path):
    fails_with(directer("ifeval", "--output", str(tmp_path)), "is a folder")
    result = directer("ifeval", "--output", str(tmp_path / "rows.jsonl"), "--limit", "5")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 5 and {"id", "prompt", "instruction_spans", "instruction_id_list"} <= set(rows[0])


def test_a_datasetdict_folder_names_its_splits(tmp_path):
    import datasets

    rows = {"id": ["a"], "prompt": ["Say hi."]}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows)}).save_to_disk(str(tmp_path / "dd"))
    result = directer("generate", str(tmp_path / "dd"), "--output", str(tmp_path / "out"))
    fails_with(result, f"pass one split's folder, e.g. {tmp_path / 'dd' / 'train'}")


def test_eval_of_a_missing_file_leaves_no_output_folder(tmp_path):
    result = directer("eval", str(tmp_path / "nofile.jsonl"), "--output", str(tmp_path / "eval"))
    fails_with(result, "nofile.jsonl")
    assert not (tmp_path / "eval").exists()


def test_version_and_eval_options():
    from importlib.metadata import version

    assert directer("--version").stdout.strip() == f"directer {version('directer')}"
    help_text = directer("eval", "--help").stdout
    for option in ("--device", "--dtype", "--max-trials", "--connect-timeout", "--actor-start-timeout"):
        assert option in help_text


@pytest.mark.parametrize(
    "command",
    [[], ["run"], ["generate"], ["eval"], ["report"], ["bench"], ["export"], ["ifeval"], ["submit"], ["jobs"],
     ["jobs", "status"], ["jobs", "logs"], ["jobs", "stop"]],
)  # fmt: skip
def test_every_help_has_an_example_and_nothing_cut_off(command):
    from typer.testing import CliRunner

    from jobs.cli import app

    result = CliRunner().invoke(app, [*command, "--help"], prog_name="directer", terminal_width=80)
    assert result.exit_code == 0, result.output
    text = result.output
    assert "Example" in text
    shortened = [line for line in text.splitlines() if line.endswith("...") and not line.startswith("Usage:")]
    assert "…" not in text and not shortened
    assert "<bool>" not in text and "{" not in text.splitlines()[0]
    assert max(len(line) for line in text.splitlines()) <= 100


def test_an_output_that_cannot_be_written_fails_before_ray_or_the_model(tmp_path):
    source = tmp_path / "rows.jsonl"
    source.write_text(json.dumps({"id": "a", "prompt": "Say hi."}) + "\n")
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    result = directer("generate", str(source), "--output", str(blocked / "out"), "--max-new-tokens", "2")
    fails_with(result, f"--output: cannot write to {blocked / 'out' / 'data'}: Not a directory")
    assert "Started a local Ray" not in result.stderr and blocked.read_text() == ""


@pytest.mark.parametrize(
    "args",
    [["--help"], ["generate", "--help"], ["spans", "Describe Rome. Keep it under 50 words."]],
)
def test_commands_that_load_no_model_import_neither_torch_nor_transformers(args):
    """Their imports take about 7 s on two cores: help and span checks answer in about one."""
    script = (
        "import sys\nfrom jobs.cli import app\n"
        f"try:\n    app({args!r})\nexcept SystemExit as exit:\n    assert not exit.code, exit.code\n"
        "print('HEAVY', sorted({'torch', 'transformers', 'ray'} & set(sys.modules)))"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "HEAVY []" in result.stdout, result.stdout


def test_the_package_names_its_exports_alike_for_type_checkers_lazy_loading_and_star_imports():
    """``directer/__init__.py`` lists each name three times; a name in one list only would load for
    one reader and be missing for another."""
    import ast

    import directer

    tree = ast.parse((ROOT / "directer" / "__init__.py").read_text())
    guarded = next(node for node in tree.body if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING")
    for_type_checkers = {
        alias.name: node.module for node in guarded.body if isinstance(node, ast.ImportFrom) for alias in node.names
    }
    assert for_type_checkers == directer._MODULE_OF
    assert sorted(directer.__all__) == sorted(for_type_checkers)
    assert all(getattr(directer, name) is not None for name in directer.__all__)
