"""Batch size and repetition against the engine's tokens: the same IFEval prompts (gold spans) decoded
one at a time, in batches, and in batches again, per method; counts the prompts whose tokens are
identical and the tokens that agree before a prompt's first difference.

    .venv/bin/python benchmarks/determinism.py [--prompts 48] [--max-new-tokens 64] [--batch-size 16]

On a CPU in fp32 products round by their shapes, so a padded batch could in principle flip a near
tie; this measures how often it does.
"""

from __future__ import annotations

import argparse

from directer import Directer, SteeringConfig
from directer.ifeval import load_ifeval


def agreement(first: list[list[int]], second: list[list[int]]) -> tuple[int, int, int]:
    """``(identical prompts, tokens before each prompt's first difference, tokens)``."""
    identical = agreeing = total = 0
    for a, b in zip(first, second):
        identical += a == b
        prefix = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        agreeing += prefix
        total += max(len(a), len(b))
    return identical, agreeing, total


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=48)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--model", default="smollm2-135m")
    args = parser.parse_args()
    steerer = Directer.from_pretrained(args.model)
    prompts = [
        steerer.prompt(message=r["prompt"], instruction_spans=r["instruction_spans"])
        for r in load_ifeval(limit=args.prompts)
    ]
    for method in ("zero-shot", "directer"):
        config = SteeringConfig(method=method, max_new_tokens=args.max_new_tokens)

        def tokens(batch_size: int, config: SteeringConfig = config) -> list[list[int]]:
            return [c.token_ids for c in steerer.complete(prompts, config, batch_size=batch_size)]

        alone, batched, again = tokens(1), tokens(args.batch_size), tokens(args.batch_size)
        identical, agreeing, total = agreement(alone, batched)
        repeated, _, _ = agreement(batched, again)
        print(
            f"{method}: batch 1 vs {args.batch_size}: {identical}/{len(prompts)} prompts identical, "
            f"{agreeing}/{total} tokens before the first difference ({agreeing / total:.1%}); "
            f"batch {args.batch_size} twice: {repeated}/{len(prompts)} identical",
            flush=True,
        )


if __name__ == "__main__":
    main()
