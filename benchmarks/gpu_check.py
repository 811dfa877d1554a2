"""The engine on an accelerator against the CPU in fp32: the same IFEval prompts (gold spans) decoded
on ``--device`` in each of ``--dtypes`` and on the CPU in fp32, per model and method; prints, per
setting, the prompts whose tokens are identical and the tokens that agree before each prompt's first
difference, and the device's peak allocated memory per method beside the memory plan's weights and
batch (``directer plan``; the CUDA context is not allocated memory). Needs only the repository and
the bundled model's config and tokenizer files: a model whose weights are not there (the bundled
model's, where only those files came along) is skipped with a line that says so, and the random
models, which need no weights, still run.

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

from directer import Directer, ModelNotFoundError, SteeringConfig
from directer.ifeval import load_ifeval

METHODS = ("zero-shot", "directer")


def decode(model: str, device: str, dtype: str, rows: list[dict], max_new_tokens: int) -> dict[str, dict]:
    """Per method: the tokens for ``rows`` (one batch) with ``model`` loaded on ``device`` in ``dtype``,
    and on CUDA the peak allocated memory beside the plan's weights and batch."""
    steerer = Directer.from_pretrained(model, device=device, dtype=dtype)
    prompts = [steerer.prompt(message=r["prompt"], instruction_spans=r["instruction_spans"]) for r in rows]
    cuda = device.startswith("cuda")
    results = {}
    for method in METHODS:
        config = SteeringConfig(method=method, max_new_tokens=max_new_tokens)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        tokens = [c.token_ids for c in steerer.complete(prompts, config, batch_size=len(prompts))]
        plan = steerer.plan_batch(prompts, config)
        results[method] = {
            "tokens": tokens,
            "peak_memory_mib": round(torch.cuda.max_memory_allocated() / 2**20) if cuda else None,
            "planned_mib": round((plan.weights + plan.batch_bytes(len(prompts))) / 2**20),
        }
    del steerer
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--models", default="smollm2-135m,smollm2-1.7b-random")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()
    rows = load_ifeval(limit=args.prompts)
    for model in args.models.split(","):
        try:
            reference = decode(model, "cpu", "float32", rows, args.max_new_tokens)
        except ModelNotFoundError as error:
            print(json.dumps({"model": model, "skipped": str(error)}), flush=True)
            continue
        for dtype in args.dtypes.split(","):
            started = time.perf_counter()
            results = decode(model, args.device, dtype, rows, args.max_new_tokens)
            seconds = time.perf_counter() - started
            for method, result in results.items():
                identical, agreeing, total = agreement(reference[method]["tokens"], result["tokens"])
                record = {
                    "model": model, "device": args.device, "dtype": dtype, "method": method,
                    "prompts_identical": f"{identical}/{len(rows)}", "tokens_agreeing": f"{agreeing}/{total}",
                    "seconds_both_methods": round(seconds, 1), "peak_memory_mib": result["peak_memory_mib"],
                    "planned_mib": result["planned_mib"],
                }  # fmt: skip
                print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
