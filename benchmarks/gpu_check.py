"""The engine on an accelerator against the CPU in fp32: the same IFEval prompts (gold spans) decoded
on ``--device`` in each of ``--dtypes`` and on the CPU in fp32, per model and method; prints, per
setting, the prompts whose tokens are identical and the tokens that agree before each prompt's first
difference, and the device's peak memory. Needs only the repository and the bundled model's files.

    .venv/bin/python benchmarks/gpu_check.py [--device cuda] [--dtypes float32,bfloat16]
        [--models smollm2-135m,smollm2-1.7b-random] [--prompts 16] [--max-new-tokens 32]

``benchmarks/gpu_check.sh`` runs it with ``directer bench`` on the 1.7B random model; on a machine
without a GPU, ``--device cpu`` checks the script itself (every setting then agrees).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from determinism import agreement

from directer import Directer, SteeringConfig
from directer.ifeval import load_ifeval

METHODS = ("zero-shot", "directer")


def decode(model: str, device: str, dtype: str, rows: list[dict], max_new_tokens: int) -> dict[str, list[list[int]]]:
    """Each method's tokens for ``rows`` with ``model`` loaded on ``device`` in ``dtype``."""
    steerer = Directer.from_pretrained(model, device=device, dtype=dtype)
    prompts = [steerer.prompt(message=r["prompt"], instruction_spans=r["instruction_spans"]) for r in rows]
    tokens = {}
    for method in METHODS:
        config = SteeringConfig(method=method, max_new_tokens=max_new_tokens)
        tokens[method] = [c.token_ids for c in steerer.complete(prompts, config, batch_size=len(prompts))]
    del steerer
    return tokens


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--models", default="smollm2-135m,smollm2-1.7b-random")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()
    rows = load_ifeval(limit=args.prompts)
    cuda = args.device.startswith("cuda")
    for model in args.models.split(","):
        reference = decode(model, "cpu", "float32", rows, args.max_new_tokens)
        for dtype in args.dtypes.split(","):
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            started = time.perf_counter()
            tokens = decode(model, args.device, dtype, rows, args.max_new_tokens)
            seconds = time.perf_counter() - started
            for method in METHODS:
                identical, agreeing, total = agreement(reference[method], tokens[method])
                record = {
                    "model": model, "device": args.device, "dtype": dtype, "method": method,
                    "prompts_identical": f"{identical}/{len(rows)}", "tokens_agreeing": f"{agreeing}/{total}",
                    "seconds_both_methods": round(seconds, 1),
                    "peak_memory_mib": round(torch.cuda.max_memory_allocated() / 2**20) if cuda else None,
                }  # fmt: skip
                print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
