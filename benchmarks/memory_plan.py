"""The memory plan (:mod:`directer.memory`) against measured peak memory on a CPU.

Each case runs in a fresh process: import, load the model (resident memory after load minus before:
the weights and the runtime), reset the peak counter (``/proc/self/clear_refs``), decode one batch
of random prompts
that never stop early (peak minus after load: the batch). Printed side by side with the plan.

    python benchmarks/memory_plan.py --model smollm2-135m --batch-size 16 --prompt-tokens 256
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
from pathlib import Path

MIB = 1024**2


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure(args: argparse.Namespace) -> dict[str, int]:
    import torch

    from directer.config import SteeringConfig
    from directer.engine import Engine, Request
    from directer.models import load_model

    torch.set_num_threads(args.threads)
    before = _status("VmRSS")
    loaded = load_model(args.model, device="cpu", dtype=args.dtype)
    with torch.no_grad():  # weights loaded from a file may be mapped: read every page in now
        for parameter in loaded.model.parameters():
            parameter.sum()
    gc.collect()
    after_load = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) restarts from the current size
    generator = torch.Generator().manual_seed(0)
    vocab = loaded.model.config.vocab_size
    span = list(range(args.prompt_tokens - args.span_tokens - 4, args.prompt_tokens - 4))
    requests = [
        Request(torch.randint(100, vocab, (args.prompt_tokens,), generator=generator).tolist(), span)
        for _ in range(args.batch_size)
    ]
    # an end-of-sequence id no token has: every row decodes all max_new_tokens
    engine = Engine(loaded.model, [-1], loaded.pad_token_id)
    config = SteeringConfig(method=args.method, max_new_tokens=args.max_new_tokens)
    engine.generate(requests, config)
    return {"loaded": after_load - before, "batch": _status("VmHWM") - after_load}


def planned(args: argparse.Namespace) -> dict[str, int]:
    from directer.config import SteeringConfig
    from directer.memory import ModelShape, plan_memory
    from directer.models import model_config, parse_dtype

    config = model_config(args.model)
    dtype = parse_dtype(args.dtype)
    steering = SteeringConfig(method=args.method, max_new_tokens=args.max_new_tokens)
    plan = plan_memory(ModelShape.of(config, dtype), steering, args.prompt_tokens, span_tokens=args.span_tokens)
    return {"loaded": plan.runtime + plan.weights, "batch": plan.batch_bytes(args.batch_size)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--method", default="directer")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--span-tokens", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args)))
        return
    child = [arg for arg in sys.argv[1:] if arg != "--json"]
    out = subprocess.run([sys.executable, __file__, *child, "--measure"], check=True, capture_output=True, text=True)
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    plan = planned(args)
    result = {"case": {k: v for k, v in vars(args).items() if k not in ("measure", "json")}}
    for part in ("loaded", "batch"):
        result[part] = {"planned": plan[part], "measured": measured[part], "ratio": measured[part] / plan[part]}
    total_plan, total_measured = plan["loaded"] + plan["batch"], measured["loaded"] + measured["batch"]
    result["total"] = {"planned": total_plan, "measured": total_measured, "ratio": total_measured / total_plan}
    if args.json:
        print(json.dumps(result))
        return
    print(
        f"{args.model} {args.dtype} {args.method}: batch {args.batch_size}, {args.prompt_tokens} prompt tokens "
        f"({args.span_tokens} instruction), {args.max_new_tokens} new"
    )
    for part in ("loaded", "batch", "total"):
        row = result[part]
        print(
            f"  {part:8} planned {row['planned'] / MIB:9.1f} MiB  measured {row['measured'] / MIB:9.1f} MiB  "
            f"measured/planned {row['ratio']:.3f}"
        )


if __name__ == "__main__":
    main()
