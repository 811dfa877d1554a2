"""Where Directer's trials and ranking probes start, per ranking: how much of their layer work lies
below their lowest steered layer (the layers where a steered pass computes exactly the raw one, and
which a pass that started at that layer would skip), on IFEval prompts with gold spans.

    .venv/bin/python benchmarks/trial_starts.py [--prompts 32] [--max-new-tokens 64] [--batch-size 16]

Work is counted in token-layers of the decoding passes: one raw token per step, every trial the
steps ran (set ``j`` is the ``L // 2**j`` most sensitive layers), one probe per layer per prompt. The
prefill and the next-token guesses are left out, so the saving of the whole run is smaller still.
"""

from __future__ import annotations

import argparse

from directer import Directer, SteeringConfig
from directer.ifeval import load_ifeval
from directer.steering import trial_sizes


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--model", default="smollm2-135m")
    args = parser.parse_args()
    steerer = Directer.from_pretrained(args.model)
    layers = steerer.loaded.model.config.num_hidden_layers
    prompts = [
        steerer.prompt(message=r["prompt"], instruction_spans=r["instruction_spans"])
        for r in load_ifeval(limit=args.prompts)
    ]
    for ranking in ("caused", "received"):
        config = SteeringConfig(max_new_tokens=args.max_new_tokens, ranking=ranking)
        sizes = trial_sizes(layers, config.max_trials)
        raw = trial = trial_below = 0
        lowest_by_set: list[list[int]] = [[] for _ in sizes]
        completions = steerer.complete(prompts, config, batch_size=args.batch_size)
        ranked = [c for c in completions if c.ranking is not None]  # rows without spans are not steered
        for completion in ranked:
            lowest = [min(completion.ranking[:size]) for size in sizes]
            for j, layer in enumerate(lowest):
                lowest_by_set[j].append(layer)
            for step in completion.telemetry:
                raw += layers
                trial += step.trials * layers
                trial_below += sum(lowest[: step.trials])
        probes = len(ranked) * layers * layers
        probes_below = len(ranked) * layers * (layers - 1) // 2
        total = raw + trial + probes
        mean_lowest = ", ".join(f"{sum(v) / len(v):.1f}" for v in lowest_by_set)
        print(
            f"{ranking}, {len(ranked)} steered prompts: mean lowest steered layer of the sets of {sizes} layers: "
            f"{mean_lowest}; below it: "
            f"{trial_below / trial:.1%} of the trial work, {probes_below / probes:.1%} of the probe work; "
            f"{(trial_below + probes_below) / total:.1%} of the decoding passes' token-layers "
            f"(raw {raw / total:.0%}, trials {trial / total:.0%}, probes {probes / total:.0%})",
            flush=True,
        )


if __name__ == "__main__":
    main()
