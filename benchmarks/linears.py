"""The model's linear layers as ``F.linear`` (what the engine uses), as the column product an earlier
release used on CPUs (``W @ xᵀ``, one token as a batch of row blocks) and as MKL's product on weights
packed ahead for ``M`` rows (what ``torch.compile`` uses on CPUs; each pack is for one row count and
holds several times the weight), side by side: one forward of ``M`` tokens of the bundled model,
alternating, for a range of ``M``; median milliseconds, their ratios, the packs' size, and whether the
packed product's logits equal ``F.linear``'s bit for bit. Kept as the evidence for using ``F.linear``
everywhere (BENCHMARKS.md).

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


def packed_product(linear: torch.nn.Linear, packed: torch.Tensor, rows: int, x: torch.Tensor) -> torch.Tensor:
    """``linear(x)`` as MKL's product on the weight packed for ``rows`` rows (another count falls back
    to ``F.linear``)."""
    flat = x.reshape(-1, x.shape[-1])
    out = torch.ops.mkl._mkl_linear(flat, packed, linear.weight, linear.bias, rows)
    return out.view(*x.shape[:-1], out.shape[-1])


def linears(model: torch.nn.Module) -> list[torch.nn.Linear]:
    return [module for module in model.modules() if isinstance(module, torch.nn.Linear)]


@contextlib.contextmanager
def replaced_linears(forwards: dict[torch.nn.Linear, functools.partial]) -> Iterator[None]:
    for linear, forward in forwards.items():
        linear.forward = forward
    try:
        yield
    finally:
        for linear in forwards:
            del linear.forward


def column_linears(model: torch.nn.Module) -> contextlib.AbstractContextManager[None]:
    return replaced_linears({linear: functools.partial(column_product, linear) for linear in linears(model)})


def packed_linears(packs: dict[torch.nn.Linear, torch.Tensor], rows: int) -> contextlib.AbstractContextManager[None]:
    return replaced_linears(
        {linear: functools.partial(packed_product, linear, pack, rows) for linear, pack in packs.items()}
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", default="1,2,3,4,6,8,12,15,16,24,32,48")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--model", default="smollm2-135m")
    args = parser.parse_args()
    model = Directer.from_pretrained(args.model).loaded.model
    weights = sum(linear.weight.numel() for linear in linears(model))
    print(f"{'tokens':>6} {'F.linear ms':>12} {'column ms':>10} {'packed ms':>10} {'column / F.linear':>18} "
          f"{'packed / F.linear':>18} {'packs / weights':>16} {'packed logits equal':>20}")  # fmt: skip
    with torch.inference_mode():
        for tokens in map(int, args.tokens.split(",")):
            ids = torch.randint(100, 10_000, (1, tokens))
            packs = {each: torch.ops.mkl._mkl_reorder_linear_weight(each.weight, tokens) for each in linears(model)}
            variants = {
                "F.linear": contextlib.nullcontext,
                "column product": lambda: column_linears(model),
                "packed": lambda packs=packs, tokens=tokens: packed_linears(packs, tokens),
            }
            plain = model(input_ids=ids, use_cache=False).logits  # warm-up
            with packed_linears(packs, tokens):
                equal = torch.equal(plain, model(input_ids=ids, use_cache=False).logits)
            times: dict[str, list[float]] = {name: [] for name in variants}
            for _ in range(args.rounds):
                for name, context in variants.items():
                    with context():
                        started = time.perf_counter()
                        model(input_ids=ids, use_cache=False)
                        times[name].append(time.perf_counter() - started)
            linear, column, packed = (1000 * statistics.median(times[name]) for name in variants)
            size = sum(pack.numel() for pack in packs.values()) / weights
            print(f"{tokens:>6} {linear:>12.1f} {column:>10.1f} {packed:>10.1f} {column / linear:>18.2f} "
                  f"{packed / linear:>18.2f} {size:>16.2f} {str(equal):>20}")  # fmt: skip


if __name__ == "__main__":
    main()
