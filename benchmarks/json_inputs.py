"""A large JSON-lines input: peak memory of the driver's survey and of the pipeline's reading tasks, beside
the file parsed whole (what both did before JSON files were read in parts).

    .venv/bin/python benchmarks/json_inputs.py [--rows 1000000] [--files 1]

Writes ``--rows`` rows of about 400 bytes to ``--files`` JSON-lines files in one folder. Each
measurement runs in a fresh process: ``survey`` (ids and column types, :func:`pipeline.inputs.survey`)
and ``whole`` (the rows parsed and typed at once, as the survey did for a file before) report their
peak resident memory above their imports; ``read`` runs the pipeline's reader
(:func:`pipeline.inputs.read_dataset`, a local Ray with 2 CPUs, blocks of 256 rows) and reports the
largest Ray worker's peak resident memory, sampled every 0.1 s. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle. " * 4
MEASURE = """
import json, resource, sys, time
sys.path.insert(0, {root!r})
import psutil
from pathlib import Path
from pipeline.inputs import json_file_rows, resolve_inputs, rows_to_table, survey

path = {path!r}
files = sorted(Path(path).glob("*.jsonl"))
before = psutil.Process().memory_info().rss
started = time.perf_counter()
{action}
seconds = time.perf_counter() - started
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({{"seconds": seconds, "peak_above_imports_mib": (peak - before) / 2**20}}))
"""
ACTIONS = {
    "survey": "survey(resolve_inputs([path]))",
    "whole": "rows_to_table([row for file in files for row in json_file_rows(file.read_bytes())]).schema",
}
READ = """
import json, sys, threading, time
sys.path.insert(0, {root!r})
import psutil, ray
from pipeline.cluster import on_this_node
from pipeline.inputs import read_dataset, read_tasks, resolve_inputs, survey

sources = resolve_inputs([{path!r}])
inputs = survey(sources)
ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
peak, done = [0], threading.Event()

def watch():
    while not done.is_set():
        for process in psutil.process_iter(["cmdline"]):
            try:
                if any("default_worker" in part or part.startswith("ray::") for part in process.info["cmdline"] or []):
                    peak[0] = max(peak[0], process.memory_info().rss)
            except psutil.Error:
                pass
        time.sleep(0.1)

watcher = threading.Thread(target=watch)
watcher.start()
started = time.perf_counter()
try:
    dataset = read_dataset(sources, inputs, on_this_node()).repartition(target_num_rows_per_block=256)
    rows = sum(batch.num_rows for batch in dataset.iter_batches(batch_format="pyarrow", batch_size=None))
finally:
    done.set()
    watcher.join()
print(json.dumps({{"rows": rows, "seconds": time.perf_counter() - started, "parts": len(inputs.json_parts),
                  "read_tasks": len(read_tasks(inputs.json_parts)),
                  "largest_worker_peak_mib": peak[0] / 2**20}}))
"""


def write_rows(folder: Path, rows: int, files: int) -> None:
    for index in range(files):
        with (folder / f"rows-{index:05d}.jsonl").open("w") as file:
            for n in range(index * rows // files, (index + 1) * rows // files):
                row = {"id": f"row-{n:09d}", "prompt": f"{PROMPT}{n}", "instruction": "Use at most 50 words."}
                file.write(json.dumps(row) + "\n")


def run(script: str) -> dict:
    out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--files", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "rows"
        path.mkdir()
        write_rows(path, args.rows, args.files)
        size = sum(file.stat().st_size for file in path.iterdir())
        result: dict = {"rows": args.rows, "files": args.files, "mib": size / 2**20}
        for name, action in ACTIONS.items():
            result[name] = run(MEASURE.format(root=str(ROOT), path=str(path), action=action))
        result["read"] = run(READ.format(root=str(ROOT), path=str(path)))
    result["survey_vs_whole_memory"] = (
        result["survey"]["peak_above_imports_mib"] / result["whole"]["peak_above_imports_mib"]
    )
    result["read_worker_vs_whole_memory"] = (
        result["read"]["largest_worker_peak_mib"] / result["whole"]["peak_above_imports_mib"]
    )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
