"""Linear layers for passes of a few tokens on a CPU: ``W @ xᵀ`` instead of ``x @ Wᵀ``.

A decoding pass multiplies every weight of the model by a handful of token vectors, so it streams
the weights from memory once and is bound by that. ``F.linear`` (``x @ Wᵀ``) has MKL repack the weight
on every call with more than one token: 2-16 tokens cost 1.5-2.5× one token's product. ``W @ xᵀ``
packs only the tokens and costs about as much for 2-4 tokens as for one; beyond 8 tokens its kernels
are slow for an odd count, so the tokens are padded with zero rows to a multiple of 8. For one token,
MKL's matrix-vector product runs on one thread (as fast with one as with two), so the weight's rows
are split into one block per thread and multiplied as a batch, which runs the blocks in parallel.
Side by side: ``benchmarks/linears.py`` (BENCHMARKS.md). On a GPU, and for a prefill, ``F.linear`` stays.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

# passes of more tokens (a prefill, the ranking probes) are as fast with ``F.linear``
MAX_COLUMN_TOKENS = 64


@contextlib.contextmanager
def column_linears(model: PreTrainedModel) -> Iterator[None]:
    """For the duration, the model's ``nn.Linear`` layers compute :func:`column_product` on a CPU."""
    if model.device.type != "cpu":
        yield
        return
    linears = [module for module in model.modules() if isinstance(module, torch.nn.Linear)]
    for linear in linears:
        linear.forward = functools.partial(column_product, linear)
    try:
        yield
    finally:
        for linear in linears:
            del linear.forward


@functools.cache
def row_blocks(rows: int, threads: int) -> int:
    """Blocks to split a weight's ``rows`` into for a one-token product: the most, up to ``threads``,
    that divide them evenly."""
    return max(blocks for blocks in range(1, threads + 1) if rows % blocks == 0)


def column_product(linear: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``linear(x)`` as ``W @ xᵀ`` for 1 to ``MAX_COLUMN_TOKENS`` tokens (one token: a batch of row
    blocks), else ``F.linear``."""
    flat = x.reshape(-1, x.shape[-1])
    tokens = len(flat)
    weight = linear.weight
    if tokens > MAX_COLUMN_TOKENS:
        return F.linear(x, weight, linear.bias)
    if tokens == 1:
        blocks = row_blocks(weight.shape[0], torch.get_num_threads())
        if blocks == 1 or not weight.is_contiguous():
            return F.linear(x, weight, linear.bias)
        out = torch.bmm(weight.view(blocks, -1, weight.shape[1]), flat.t().expand(blocks, -1, 1)).view(1, -1)
    else:
        columns = tokens if tokens <= 8 else -(-tokens // 8) * 8
        if columns > tokens:
            flat = torch.cat([flat, flat.new_zeros(columns - tokens, flat.shape[1])])
        out = torch.mm(weight, flat.t())[:, :tokens].t().contiguous()
    if linear.bias is not None:
        out += linear.bias
    return out.view(*x.shape[:-1], out.shape[-1])
