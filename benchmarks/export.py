"""``directer export`` over a large run: wall time and peak memory, beside reading the run's rows whole.

    .venv/bin/python benchmarks/export.py [--rows 20000] [--steps 256]

A real ``directer generate`` output (the first 6 IFEval prompts, the bundled model, 32 new tokens) is
tiled to ``--rows`` rows of ``--steps`` steps each, every completion made distinct. Each measurement
runs in a fresh process, which reports its peak resident memory above what its imports took: the export
(``--verify --dedupe --require-finish eos``, Parquet) and, beside it, every column of the rows read
into Python (what an export read before it named its columns). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
FILE_ROWS = 2000
MEASURE = """
import json, sys, time
from pathlib import Path
sys.path.insert(0, {root!r})
from pipeline.export import ExportConfig, export
from pipeline.outputs import RunOutput

def status(field):
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field + ":"))
    return int(line.split()[1]) / 1024

before = status("VmRSS")
Path("/proc/self/clear_refs").write_text("5")  # restart the peak (VmHWM) here, after the imports
started = time.perf_counter()
{action}
print(json.dumps({{"seconds": time.perf_counter() - started, "peak_above_imports_mib": status("VmHWM") - before}}))
"""
ACTIONS = {
    "export": "export(ExportConfig(runs=({run!r},), output={output!r}, verify=True, dedupe=True, "
    "require_finish='eos', format='parquet'))",
    "whole_rows": "RunOutput({run!r}).rows()",
}


def small_run(folder: Path) -> Path:
    from directer.config import SteeringConfig
    from directer.ifeval import load_ifeval
    from pipeline.config import GenerateConfig
    from pipeline.run import generate

    source = folder / "prompts.parquet"
    pq.write_table(pa.Table.from_pylist(load_ifeval()[:6]), source)
    config = GenerateConfig(
        inputs=(str(source),), output=str(folder / "small"), score_nll=True, actors=1,
        steering=SteeringConfig(max_new_tokens=32),
    )  # fmt: skip
    generate(config, progress=False)
    return folder / "small"


def tiled_run(small: Path, target: Path, rows: int, steps: int) -> None:
    """``rows`` rows of ``steps`` steps from the small run's, ids and completions made distinct."""
    table = pq.read_table(sorted((small / "data").glob("*.parquet")))
    examples = table.to_pylist()
    for row in examples:
        row["telemetry"] = (row["telemetry"] * steps)[:steps]
        row["token_ids"] = (row["token_ids"] * steps)[:steps]
    (target / "data").mkdir(parents=True)
    for start in range(0, rows, FILE_ROWS):
        shard = []
        for n in range(start, min(rows, start + FILE_ROWS)):
            row = dict(examples[n % len(examples)], id=f"row-{n}", finish_reason="stop")
            row["completion"] += f" Variant {n}: " + " ".join(f"w{(n * 7 + j) % 9973}" for j in range(120))
            shard.append(row)
        pq.write_table(pa.Table.from_pylist(shard, schema=table.schema), target / "data" / f"part-{start:08d}.parquet")


def measure(action: str, run: Path, output: Path) -> dict[str, float]:
    code = MEASURE.format(root=str(ROOT), action=ACTIONS[action].format(run=str(run), output=str(output)))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--steps", type=int, default=256)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        run = Path(folder) / "large"
        tiled_run(small_run(Path(folder)), run, args.rows, args.steps)
        result = {name: measure(name, run, Path(folder) / "train") for name in ACTIONS}
    result["config"] = vars(args)
    result["export_vs_whole_rows_memory"] = (
        result["export"]["peak_above_imports_mib"] / result["whole_rows"]["peak_above_imports_mib"]
    )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
