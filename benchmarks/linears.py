"""The model's linear layers as ``F.linear`` and as the engine's column product, side by side: one
forward of ``M`` tokens of the bundled model, alternating, for a range of ``M``; median milliseconds
and their ratio.

    .venv/bin/python benchmarks/linears.py [--tokens 1,2,3,4,6,8,12,15,16,24,32,48] [--rounds 5]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

from directer import Directer
from directer.linears import column_linears


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", default="1,2,3,4,6,8,12,15,16,24,32,48")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--model", default="smollm2-135m")
    args = parser.parse_args()
    model = Directer.from_pretrained(args.model).loaded.model
    variants = {"F.linear": contextlib.nullcontext, "column product": lambda: column_linears(model)}
    print(f"{'tokens':>6} {'F.linear ms':>12} {'column ms':>10} {'speed-up':>9}")
    with torch.inference_mode():
        for tokens in map(int, args.tokens.split(",")):
            ids = torch.randint(100, 10_000, (1, tokens))
            model(input_ids=ids, use_cache=False)  # warm-up
            times: dict[str, list[float]] = {name: [] for name in variants}
            for _ in range(args.rounds):
                for name, context in variants.items():
                    with context():
                        started = time.perf_counter()
                        model(input_ids=ids, use_cache=False)
                        times[name].append(time.perf_counter() - started)
            linear, column = (1000 * statistics.median(times[name]) for name in variants)
            print(f"{tokens:>6} {linear:>12.1f} {column:>10.1f} {linear / column:>9.2f}")


if __name__ == "__main__":
    main()
