"""Plot tokens/s per method and batch size from ``directer bench --json`` output.

.venv/bin/directer bench --json > benchmarks/cpu-2core-smollm2.json
.venv/bin/python benchmarks/plot.py benchmarks/cpu-2core-smollm2.json benchmarks/throughput.png
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def main(source: str, target: str) -> None:
    result = json.loads(Path(source).read_text())
    measured = result["measurements"]
    sizes = sorted({int(k.rsplit("_b", 1)[1]) for k in measured})
    methods = [("hf", "transformers generate"), ("zero_shot", "engine, zero-shot"), ("directer", "engine, Directer"),
               ("plain", "plain reference")]  # fmt: skip
    figure, axis = plt.subplots(figsize=(7, 3.5))
    width = 0.2
    for k, (key, label) in enumerate(methods):
        values = [measured.get(f"{key}_b{size}", {}).get("tokens_per_second", 0.0) for size in sizes]
        axis.bar([i + k * width for i in range(len(sizes))], values, width, label=label)
    if result.get("pipeline"):
        axis.bar(len(sizes) - 1 + 4 * width, result["pipeline"]["tokens_per_second"], width, label="pipeline, Directer")
    axis.set_xticks([i + 1.5 * width for i in range(len(sizes))], [f"batch {s}" for s in sizes])
    axis.set_ylabel("tokens/s")
    axis.set_title(f"{result['config']['model']} on {result['config']['device']}")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(target, dpi=110)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
