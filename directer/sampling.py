"""Choosing a token from logits: greedy (the default), or sampled with temperature, top-k and top-p.

A sampled row draws one uniform number per step from a counter-based hash of its key and the step
(splitmix64, computed on the device), never from a shared generator: its tokens then do not depend on
the batch it sits in, the actor that runs it, the trial schedule or the engine's next-token guesses.
A row's key hashes the config's ``seed`` with the row's id (:func:`row_key`). Within a step, the raw
token and every steered variant use the same number, so a variant that leaves the distribution as it
was samples the raw token.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

_GOLDEN, _MIX1, _MIX2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def _signed(value: int) -> int:
    """A 64-bit pattern as the int64 torch holds (its products wrap around)."""
    return value - (1 << 64) if value >= 1 << 63 else value


def row_key(seed: int, row_id: str) -> int:
    """The key of a row's draws: ``seed`` and the row's id hashed (BLAKE2b) to a signed 64-bit integer."""
    digest = hashlib.blake2b(f"{seed}\x00{row_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def _shift(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (torch shifts arithmetically)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def uniforms(keys: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """``[N]`` float64 in ``[0, 1)``: splitmix64 of ``key + (step + 1) * golden``, its top 53 bits."""
    x = keys + (steps + 1) * _signed(_GOLDEN)
    x = (x ^ _shift(x, 30)) * _signed(_MIX1)
    x = (x ^ _shift(x, 27)) * _signed(_MIX2)
    x = x ^ _shift(x, 31)
    return _shift(x, 11).double() / float(1 << 53)


@dataclass(frozen=True)
class Sampler:
    """temperature 0: greedy (argmax). Otherwise softmax(logits / temperature), truncated to the
    ``top_k`` most probable tokens (0: all), renormalised, and truncated to the smallest set whose
    probability reaches ``top_p`` (``transformers``' warpers in ``generate``'s order), then drawn by inverse
    CDF with the row's uniform number."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def choose(self, logits: torch.Tensor, draws: torch.Tensor | None) -> torch.Tensor:
        """Token ids ``[N, ...]`` from ``logits [N, ..., vocab]``; ``draws [N]`` are the rows' uniform
        numbers, shared by a row's variants (unused when greedy)."""
        if self.greedy:
            return logits.argmax(-1)
        probs = torch.softmax(logits.float() / self.temperature, dim=-1)
        probs, order = probs.sort(dim=-1, descending=True)
        if self.top_k:
            probs[..., self.top_k :] = 0
            probs = probs / probs.sum(dim=-1, keepdim=True)  # top_p is a share of what top_k kept, as in transformers
        if self.top_p < 1:
            before = probs.cumsum(dim=-1) - probs  # mass of the more probable tokens
            probs = probs.masked_fill(before >= self.top_p, 0)
        cdf = probs.cumsum(dim=-1)
        draws = draws.view(-1, *[1] * (cdf.dim() - 2))
        target = (draws * cdf[..., -1].double()).float()
        index = torch.searchsorted(cdf.contiguous(), target[..., None].contiguous(), right=True)
        index = index.clamp(max=cdf.shape[-1] - 1)
        # the last kept token when rounding leaves the target at the CDF's end
        index = torch.minimum(index, (probs > 0).sum(dim=-1, keepdim=True) - 1)
        return order.gather(-1, index)[..., 0]
