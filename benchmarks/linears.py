"""The model's linear layers as ``F.linear`` (what the engine uses) and as the column product an earlier
release used on CPUs (``W @ xᵀ``, one token as a batch of row blocks), side by side: one forward of
``M`` tokens of the bundled model, alternating, for a range of ``M``; median milliseconds and their
ratio. Kept as the evidence for using ``F.linear`` everywhere (BENCHMARKS.md).

    .venv/bin/python benchmarks/linears.py [--tokens 1,2,3,4,6,8,12,15,16,24,32,48] [--rounds 5]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import statistics
import time
from collections.abc import Iterator

import torch

from directer import Directer


def column_product(linear: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``linear(x)`` as ``W @ xᵀ`` (columns padded to a multiple of 8 beyond 8 tokens); one token as a
    batch of row blocks, one per thread."""
    flat = x.reshape(-1, x.shape[-1])
    tokens, weight = len(flat), linear.weight
    threads = torch.get_num_threads()
    if tokens == 1:
        blocks = max(b for b in range(1, threads + 1) if weight.shape[0] % b == 0)
        out = torch.bmm(weight.view(blocks, -1, weight.shape[1]), flat.t().expand(blocks, -1, 1)).view(1, -1)
    else:
        columns = tokens if tokens <= 8 else -(-tokens // 8) * 8
        if columns > tokens:
            flat = torch.cat([flat, flat.new_zeros(columns - tokens, flat.shape[1])])
        out = torch.mm(weight, flat.t())[:, :tokens].t().contiguous()
    if linear.bias is not None:
        out += linear.bias
    return out.view(*x.shape[:-1], out.shape[-1])


@contextlib.contextmanager
def column_linears(model: torch.nn.Module) -> Iterator[None]:
    linears = [module for module in model.modules() if isinstance(module, torch.nn.Linear)]
    for linear in linears:
        linear.forward = functools.partial(column_product, linear)
    try:
        yield
    finally:
        for linear in linears:
            del linear.forward


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", default="1,2,3,4,6,8,12,15,16,24,32,48")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--model", default="smollm2-135m")
    args = parser.parse_args()
    model = Directer.from_pretrained(args.model).loaded.model
    variants = {"F.linear": contextlib.nullcontext, "column product": lambda: column_linears(model)}
    print(f"{'tokens':>6} {'F.linear ms':>12} {'column ms':>10} {'column / F.linear':>18}")
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
            print(f"{tokens:>6} {linear:>12.1f} {column:>10.1f} {column / linear:>18.2f}")


if __name__ == "__main__":
    main()
