"""Attention kernels and dtypes against the plain reference: how often the engine's tokens agree.

    .venv/bin/python benchmarks/attention_kernels.py [--prompts 16] [--max-new-tokens 32] [--dtypes float32,bfloat16]

For each dtype, the reference (eager attention, one prompt at a time, an explicit cache copy per
steered pass) and the engine with each kernel for packed passes (``sdpa``, what GPUs run; ``matmul``,
the CPU default) decode the same IFEval prompts (gold spans), steered and zero-shot. Printed per
kernel: prompts whose tokens all agree, and the share of tokens before the first disagreement. In
fp32 they agree exactly; in bf16 the products of a batched, padded pass round otherwise than the
reference's, and a step whose two best tokens are nearly tied, or a plausibility test near its
threshold, can go the other way: from there the completions diverge. The zero-shot line is that
floor: the same comparison without steering.
"""

from __future__ import annotations

import argparse

import torch
from transformers.utils import logging

from directer import Directer, SteeringConfig
from directer.ifeval import load_ifeval
from directer.reference import reference_generate


def agreement(expected: list[list[int]], got: list[list[int]]) -> tuple[int, float]:
    """Prompts whose tokens all agree, and the share of expected tokens before each first disagreement."""
    same, prefix, total = 0, 0, 0
    for want, have in zip(expected, got):
        same += want == have
        common = next((i for i, (a, b) in enumerate(zip(want, have)) if a != b), min(len(want), len(have)))
        prefix += common
        total += len(want)
    return same, prefix / max(total, 1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--model", default="smollm2-135m")
    args = parser.parse_args()
    logging.disable_progress_bar()
    rows = load_ifeval(limit=args.prompts)
    config = SteeringConfig(max_new_tokens=args.max_new_tokens)
    print(f"{args.prompts} IFEval prompts, {args.max_new_tokens} new tokens, {args.model}")
    for dtype in args.dtypes.split(","):
        steerer = Directer.from_pretrained(args.model, device="cpu", dtype=dtype)
        loaded = steerer.loaded
        prompts = [steerer.prompt(message=r["prompt"], instruction_spans=r["instruction_spans"]) for r in rows]
        for method in ("directer", "zero-shot"):
            steering = config.with_(method=method)
            expected = [
                reference_generate(
                    loaded.model, p.token_ids, p.span, steer=steering.steers, max_new_tokens=steering.max_new_tokens,
                    eos_token_ids=loaded.eos_token_ids,
                ).token_ids
                for p in prompts
            ]  # fmt: skip
            for kernel in ("sdpa", "matmul"):
                engine = Directer(loaded, steering, kernel=kernel)
                with torch.inference_mode():
                    got = [c.token_ids for c in engine.complete(prompts, steering, batch_size=len(prompts))]
                same, share = agreement(expected, got)
                print(
                    f"{dtype:>9} {method:>9} {kernel:>6}: {same}/{len(prompts)} prompts identical, "
                    f"{share:.1%} of tokens agree"
                )


if __name__ == "__main__":
    main()
