"""The output embedding's product for ``M`` rows of hidden states, as ``F.linear`` and with the rows
padded to 16 (what the engine does on a CPU for 8-15 rows, ``directer.engine.PADDED_LOGIT_ROWS``),
alternating; median milliseconds (BENCHMARKS.md, "Logit rows").

    .venv/bin/python benchmarks/logit_rows.py [--rows 1,2,3,4,6,8,9,10,12,14,15,16,20,24,32] [--rounds 15]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from directer import Directer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", default="1,2,3,4,6,8,9,10,12,14,15,16,20,24,32")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--model", default="smollm2-135m")
    args = parser.parse_args()
    weight = Directer.from_pretrained(args.model).loaded.model.get_output_embeddings().weight
    print(f"output embedding {tuple(weight.shape)}, {torch.get_num_threads()} threads")
    print("rows | F.linear ms | padded to 16 ms | ratio")
    with torch.inference_mode():
        for rows in [int(r) for r in args.rows.split(",")]:
            hidden = torch.randn(rows, weight.shape[1])
            times: dict[str, list[float]] = {"plain": [], "padded": []}
            for _ in range(args.rounds):
                started = time.perf_counter()
                F.linear(hidden, weight)
                times["plain"].append(time.perf_counter() - started)
                started = time.perf_counter()
                padded = torch.cat([hidden, hidden.new_zeros(max(16 - rows, 0), hidden.shape[1])])
                F.linear(padded, weight)[:rows]
                times["padded"].append(time.perf_counter() - started)
            plain, padded = (statistics.median(times[k]) * 1e3 for k in ("plain", "padded"))
            print(f"{rows} | {plain:.1f} | {padded:.1f} | {plain / padded:.2f}")


if __name__ == "__main__":
    main()
