"""Trial schedules side by side: Directer tokens/s with ``lazy`` and ``batched`` trials, and forward
passes per emitted token, on the same IFEval prompts (gold spans), in one process, alternating.

    .venv/bin/python benchmarks/schedules.py [--prompts 16] [--max-new-tokens 64] [--rounds 2]

Both schedules give the same tokens (checked here too); ``auto`` picks ``batched``.
"""

from __future__ import annotations

import argparse
import time

import torch

from directer import Directer, SteeringConfig
from directer.ifeval import load_ifeval


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--model", default="smollm2-135m")
    args = parser.parse_args()
    steerer = Directer.from_pretrained(args.model)
    prompts = [
        steerer.prompt(message=r["prompt"], instruction_spans=r["instruction_spans"])
        for r in load_ifeval(limit=args.prompts)
    ]
    passes = []
    steerer.loaded.model.register_forward_pre_hook(lambda module, inputs: passes.append(1))
    seconds: dict[tuple[str, int], float] = {}
    counts: dict[tuple[str, int], tuple[int, int]] = {}
    tokens: dict[tuple[str, int], list[list[int]]] = {}
    with torch.inference_mode():
        steerer.complete(prompts[:2], SteeringConfig(max_new_tokens=8), batch_size=2)  # warm-up
        for _ in range(args.rounds):
            for size in (1, len(prompts)):
                for schedule in ("lazy", "batched"):
                    config = SteeringConfig(max_new_tokens=args.max_new_tokens, trial_schedule=schedule)
                    batch = prompts[:4] if size == 1 else prompts
                    passes.clear()
                    started = time.perf_counter()
                    done = steerer.complete(batch, config, batch_size=size)
                    key = (schedule, size)
                    seconds[key] = seconds.get(key, 0.0) + time.perf_counter() - started
                    counts[key] = (sum(len(c.token_ids) for c in done), len(passes))
                    tokens[key] = [c.token_ids for c in done]
    for size in (1, len(prompts)):
        assert tokens[("lazy", size)] == tokens[("batched", size)], "schedules must give the same tokens"
        rates = {s: args.rounds * counts[(s, size)][0] / seconds[(s, size)] for s in ("lazy", "batched")}
        per_token = {s: counts[(s, size)][1] / counts[(s, size)][0] for s in ("lazy", "batched")}
        print(
            f"batch {size:>2}: lazy {rates['lazy']:6.1f} tokens/s ({per_token['lazy']:.2f} passes/token), "
            f"batched {rates['batched']:6.1f} tokens/s ({per_token['batched']:.2f} passes/token), "
            f"batched/lazy {rates['batched'] / rates['lazy']:.2f}"
        )


if __name__ == "__main__":
    main()
