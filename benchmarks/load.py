"""A long ``directer generate`` on one machine: rows, wall time, and the peak memory of the driver, the
model actors, all of Ray's processes, and Ray's object store, sampled twice a second.

    .venv/bin/python benchmarks/load.py [--rows 2000] [--max-new-tokens 8] [--batch-size 32] [--method directer]

Rows are IFEval's prompts (gold spans) repeated under new ids. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
import threading
import time
from pathlib import Path

import psutil

from directer.config import SteeringConfig
from directer.ifeval import load_ifeval
from pipeline.config import GenerateConfig
from pipeline.run import generate

MIB = 2**20


def write_rows(path: Path, count: int) -> None:
    prompts = load_ifeval()
    with path.open("w") as handle:
        for n in range(count):
            row = prompts[n % len(prompts)]
            handle.write(
                json.dumps({"id": f"row-{n}", "prompt": row["prompt"], "instruction_spans": row["instruction_spans"]})
                + "\n"
            )


class Peaks(threading.Thread):
    """Samples memory until stopped: RSS of this process, of the model actors (each and together), of
    every process of the local Ray this run starts (this process's descendants), and the object
    store's use (``ray memory --stats-only``)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peaks = {"driver_rss_mib": 0.0, "actor_rss_mib": 0.0, "actors_rss_mib": 0.0, "ray_rss_mib": 0.0,
                      "object_store_mib": 0.0}  # fmt: skip
        self.stopping = threading.Event()

    def sample(self) -> None:
        driver = psutil.Process()
        actors, ray_total = [], 0.0
        for process in driver.children(recursive=True):  # this run's local Ray: GCS, raylet, workers
            try:
                rss = process.memory_info().rss / MIB
                line = " ".join(process.cmdline())
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            ray_total += rss
            if "GenerateStage" in line:
                actors.append(rss)
        self._peak("driver_rss_mib", driver.memory_info().rss / MIB)
        self._peak("actor_rss_mib", max(actors, default=0.0))
        self._peak("actors_rss_mib", sum(actors))
        self._peak("ray_rss_mib", ray_total)
        self._peak("object_store_mib", object_store_mib())

    def _peak(self, name: str, value: float) -> None:
        self.peaks[name] = max(self.peaks[name], value)

    def run(self) -> None:
        while not self.stopping.wait(0.5):
            self.sample()


def object_store_mib() -> float:
    import ray
    from ray._private.internal_api import memory_summary

    if not ray.is_initialized():
        return 0.0
    summary = memory_summary(address=ray.get_runtime_context().gcs_address, stats_only=True)
    used = re.search(r"Plasma memory usage (\d+) MiB", summary)
    return float(used.group(1)) if used else 0.0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--method", default="directer")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="directer-load-"))
    write_rows(folder / "rows.jsonl", args.rows)
    config = GenerateConfig(
        inputs=(str(folder / "rows.jsonl"),), output=str(folder / "out"), batch_size=args.batch_size,
        steering=SteeringConfig(method=args.method, max_new_tokens=args.max_new_tokens),
    )  # fmt: skip
    peaks = Peaks()
    peaks.start()
    started = time.perf_counter()
    report = generate(config, progress=False)
    seconds = time.perf_counter() - started
    peaks.stopping.set()
    peaks.join()
    machine = {"cpus": psutil.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2**30, 1)}
    print(json.dumps({"rows": report.rows, "ok": report.ok, "errors": report.errors, "seconds": round(seconds, 1),
                      "tokens_per_second": round(report.tokens_per_second, 1), "machine": machine,
                      **{k: round(v, 1) for k, v in peaks.peaks.items()}}))  # fmt: skip


if __name__ == "__main__":
    main()
