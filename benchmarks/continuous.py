"""Continuous batching against static batches, side by side in one process.

IFEval's prompts (gold spans) in order of length, ``--batch-size`` rows at a time: *static*, each
batch decoded to its last row (the batch shrinks as rows finish); *continuous*, one call in which
a finished row's place is taken by the next prompt, whose prefill joins the next decoding pass.
Prints forwards (decoding passes and probe passes), the passes that carried prefills, packed tokens
per decoding pass (prompt tokens included), wall time and the ratio, and how many prompts get
exactly the tokens they get alone (fp32 on a CPU rounds a product by its shape, and a row padded to
a longer prompt can flip a near tie: :mod:`benchmarks.determinism`).

A random-weight model (``--model smollm2-1.7b-random``, what the GPU check can run) never reaches an
end-of-sequence id, so every row would run to ``--max-new-tokens`` and the batches would never have a
place to refill; ``--end-share F`` makes a share ``F`` of the vocabulary (drawn with seed 0) end a
completion too, so that lengths vary as real completions' do.

    PYTHONPATH=benchmarks:. .venv/bin/python benchmarks/continuous.py --prompts 64 --batch-size 16 --max-new-tokens 64
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from determinism import agreement

from directer import Directer, SteeringConfig
from directer.engine import Engine, Request
from directer.ifeval import load_ifeval


def run(steerer: Directer, requests: list[Request], config: SteeringConfig, size: int, continuous: bool) -> dict:
    engine = steerer.engine
    counts = {"passes": 0, "tokens": 0, "passes_with_prefills": 0, "probe_passes": 0}
    forward = engine.forward

    def counted(tokens, positions, fp, logits=True):
        if not logits:  # the ranking probes
            counts["probe_passes"] += 1
        else:
            counts["passes"] += 1
            counts["tokens"] += len(tokens)
        return forward(tokens, positions, fp, logits)

    def count_prefill(module, args, kwargs):
        counts["passes_with_prefills"] += kwargs["directer_pass"].joined is not None

    engine.forward = counted
    hook = steerer.loaded.model.register_forward_pre_hook(count_prefill, with_kwargs=True)
    started = time.perf_counter()
    try:
        if continuous:
            generations = engine.generate(requests, config, size)
        else:
            batches = [requests[i : i + size] for i in range(0, len(requests), size)]
            generations = [g for batch in batches for g in engine.generate(batch, config)]
    finally:
        engine.forward = forward
        hook.remove()
    return {
        "seconds": time.perf_counter() - started,
        "forwards": counts["passes"] + counts["probe_passes"],
        "decoding_passes": counts["passes"],
        "passes_with_prefills": counts["passes_with_prefills"],
        "probe_passes": counts["probe_passes"],
        "tokens_per_pass": counts["tokens"] / counts["passes"],
        "generated": sum(len(g.token_ids) for g in generations),
        "token_ids": [g.token_ids for g in generations],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--method", default="directer")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--device", default=None)
    parser.add_argument("--end-share", type=float, default=0.0, help="share of the vocabulary that also ends a row")
    args = parser.parse_args()
    torch.manual_seed(0)
    steerer = Directer.from_pretrained(args.model, device=args.device)
    if args.end_share:
        loaded = steerer.loaded
        vocabulary = loaded.model.config.get_text_config().vocab_size
        drawn = torch.randperm(vocabulary, generator=torch.Generator().manual_seed(0))
        ends = drawn[: int(args.end_share * vocabulary)].tolist()
        steerer.engine = Engine(loaded.model, [*loaded.eos_token_ids, *ends], loaded.pad_token_id)
    rows = load_ifeval(limit=args.prompts)
    prompts = [steerer.prompt(message=r["prompt"], instruction_spans=r["instruction_spans"]) for r in rows]
    prompts.sort(key=lambda p: len(p.token_ids))
    requests = [Request(p.token_ids, p.span) for p in prompts]
    config = SteeringConfig(method=args.method, max_new_tokens=args.max_new_tokens)
    static = run(steerer, requests, config, args.batch_size, continuous=False)
    continuous = run(steerer, requests, config, args.batch_size, continuous=True)
    alone = [steerer.engine.generate([request], config)[0].token_ids for request in requests]
    for result in (static, continuous):
        identical, agreeing, total = agreement(alone, result.pop("token_ids"))
        result["prompts_identical_to_alone"] = f"{identical}/{len(requests)}"
        result["tokens_before_first_difference"] = f"{agreeing}/{total}"
    print(json.dumps({"config": vars(args), "static": static, "continuous": continuous}))
    print(
        f"decoding passes {static['decoding_passes']} -> {continuous['decoding_passes']}, forwards "
        f"{static['forwards']} -> {continuous['forwards']}, tokens per decoding pass "
        f"{static['tokens_per_pass']:.1f} -> {continuous['tokens_per_pass']:.1f}, wall "
        f"{static['seconds']:.1f} s -> {continuous['seconds']:.1f} s "
        f"(continuous/static {continuous['seconds'] / static['seconds']:.2f})"
    )


if __name__ == "__main__":
    main()
