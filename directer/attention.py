"""The steering hook: one attention function over a static KV cache that can scale instruction keys.

While the engine runs, the model's config names ``"directer"`` as its attention implementation, so
every attention module of any ``transformers`` decoder calls :func:`directer_attention` with its
query/key/value (after RoPE and any q/k norm) and the :class:`ForwardPass` the engine passed to
``model(...)`` as a keyword. The function owns the cache: the model itself runs with ``cache=None``.

Steering multiplies the keys of the instruction tokens by ``alpha`` in the steered layers. The cache
keeps one scaled copy of those keys per row and layer (made on the first steered pass); a steered
token attends to the scaled copies in place of the originals, so the cache is never copied for a
trial and its keys never change (as in the plain reference, the scale applies to the keys, not the scores).

A decoding pass is one *packed* sequence: each cache row contributes one or more tokens (its raw
token, or the variants of its steering trials or ranking probes), laid out row after row. Every
token attends to its row's cached slots before the row's current slot, plus its own key; a raw token
also stores its key and value at that slot. Rows may sit at different slots, so one pass can carry
the raw tokens of some rows next to the trials of others. Each layer runs one attention call per
pass: the own keys of the pass's tokens and the scaled instruction keys go to scratch slots after the
last slot the pass reads, and a mask says which token sees what.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, PreTrainedModel

ATTENTION_NAME = "directer"


class KVCache:
    """Preallocated keys and values of every layer, one slot per position, left-padded rows.

    Buffers are allocated on the first write of each layer, so head counts and sizes come from the
    model itself. ``pad[b]`` slots at the left of row ``b`` are padding; ``lengths[b]`` slots are
    written (rows advance independently). When a pass may carry up to ``tokens_per_row`` tokens of a
    row, scratch slots at the end let it place their own keys and the scaled instruction keys right
    after the slots it reads.
    """

    def __init__(
        self, pad: torch.Tensor, span: torch.Tensor, max_len: int, tokens_per_row: int = 0, alpha: float = 1.0
    ) -> None:
        self.pad = pad  # [B] left padding per row
        self.span = span  # [B, max_len] bool: slots whose keys are steered
        self.max_len = max_len
        self.alpha = alpha
        self.lengths = torch.zeros_like(pad)  # [B] slots written per row
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        # the instruction keys of each row, gathered: [B, S] slots (valid where ``span_valid``), and per
        # layer their keys times alpha and their values, [B, kv_heads, S, dim], taken on the first
        # steered pass (the prompt's last token is written by the first raw pass, not the prefill)
        width = int(span.sum(dim=1).max())
        slot_ids = torch.arange(span.shape[1], device=span.device).expand_as(span)
        self.span_slots = torch.where(span, slot_ids, span.shape[1]).sort(dim=1).values[:, :width]
        self.span_valid = self.span_slots < span.shape[1]
        self.span_slots = self.span_slots.clamp(max=span.shape[1] - 1)
        self.span_keys: dict[int, torch.Tensor] = {}
        self.span_values: dict[int, torch.Tensor] = {}
        self.scratch = tokens_per_row + width if tokens_per_row else 0

    def _buffers(self, layer: int, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if layer not in self.keys:
            shape = (len(self.pad), key.shape[-3], self.max_len + self.scratch, key.shape[-1])
            self.keys[layer] = key.new_zeros(shape)
            self.values[layer] = key.new_zeros(shape)
        return self.keys[layer], self.values[layer]

    def write_prompt(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> None:
        """``key``/``value`` ``[B, kv_heads, T, dim]`` into slots ``0..T-1`` of every row."""
        keys, values = self._buffers(layer, key)
        keys[:, :, : key.shape[2]] = key
        values[:, :, : key.shape[2]] = value

    def _scaled_span(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        if layer not in self.span_keys:
            rows = torch.arange(len(self.pad), device=self.pad.device)[:, None]
            keys, values = self.keys[layer][rows, :, self.span_slots], self.values[layer][rows, :, self.span_slots]
            self.span_keys[layer] = (keys * self.alpha).transpose(1, 2).contiguous()
            self.span_values[layer] = values.transpose(1, 2).contiguous()
        return self.span_keys[layer], self.span_values[layer]

    def write_tokens(
        self, layer: int, rows: torch.Tensor, slots: torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> None:
        """One token per row: ``key``/``value`` ``[n, kv_heads, dim]`` into slot ``slots[i]`` of row ``rows[i]``."""
        keys, values = self._buffers(layer, key)
        keys[rows, :, slots] = key
        values[rows, :, slots] = value

    def with_scratch(
        self,
        layer: int,
        rows: torch.Tensor | None,
        length: int,
        own_key: torch.Tensor,
        own_value: torch.Tensor,
        steered: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[N, kv_heads, length + P (+ S), dim]`` of the pass rows: their first ``length``
        slots, then the own key of each of their ``P`` grid cells, then (``steered``) the scaled
        instruction keys. Written in place to the scratch slots for a decoding pass (every row); the
        ranking probes (``rows`` given, one token per layer in a row) gather theirs."""
        parts, value_parts = [own_key], [own_value]
        if steered:
            span_keys, span_values = self._scaled_span(layer)
            parts.append(span_keys)
            value_parts.append(span_values)
        if rows is not None:
            parts[1:] = [part[rows] for part in parts[1:]]
            value_parts[1:] = [part[rows] for part in value_parts[1:]]
            keys = torch.cat([self.keys[layer][rows, :, :length], *parts], dim=2)
            return keys, torch.cat([self.values[layer][rows, :, :length], *value_parts], dim=2)
        keys, values = self.keys[layer], self.values[layer]
        end = length
        for part, value_part in zip(parts, value_parts):
            keys[:, :, end : end + part.shape[2]] = part
            values[:, :, end : end + part.shape[2]] = value_part
            end += part.shape[2]
        return keys[:, :, :end], values[:, :, :end]

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Drop finished rows (one copy per event, so later passes stop paying for them)."""
        self.pad, self.span, self.lengths = self.pad[rows], self.span[rows], self.lengths[rows]
        self.span_slots, self.span_valid = self.span_slots[rows], self.span_valid[rows]
        for store in (self.keys, self.values, self.span_keys, self.span_values):
            for layer in store:
                store[layer] = store[layer][rows]


@dataclass
class ForwardPass:
    """What one forward asks of attention.

    rows: cache row of each pass row (``None``: every cache row, in order).
    variants: tokens of each pass row in the packed input (an int when all rows have as many).
    slots: ``[T]`` slot of each packed token: it attends to its row's slots before it, and its own key.
    write: ``[T]`` bool, the raw tokens, which store their key and value at their slot.
    stash: ``[T]`` bool, tokens whose keys and values are kept aside in ``stashed`` (per layer,
        ``[n, kv_heads, dim]`` each) rather than written: guesses of which only one may be kept.
    steer: ``[N, P, num_layers]`` bool, the layers in which each token scales instruction keys.
    reaches: per steered layer, ``[N, P]`` bool: which tokens saw any scaled key there (a sliding
        window may hide them all; then steering that layer changes nothing).
    """

    cache: KVCache
    prefill: bool = False
    rows: torch.Tensor | None = None
    variants: int | torch.Tensor = 1
    slots: torch.Tensor | None = None
    write: torch.Tensor | None = None
    stash: torch.Tensor | None = None
    steer: torch.Tensor | None = None
    stashed: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)
    reaches: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)
    _memo: dict[object, object] = field(default_factory=dict, repr=False)

    def _once(self, key: object, make):
        if key not in self._memo:
            self._memo[key] = make()
        return self._memo[key]

    @property
    def length(self) -> int:
        """Cached slots any token of the pass may read."""
        return self._once("length", lambda: int(self.slots.max()))

    @property
    def raw_only(self) -> bool:
        """One raw token per cache row: plain attention over each row's slots up to its own."""

        def make() -> bool:
            single = isinstance(self.variants, int) and self.variants == 1
            return single and self.rows is None and self.write is not None and bool(self.write.all())

        return self._once("raw_only", make)

    def layout(self) -> tuple[int, torch.Tensor | None, torch.Tensor | None]:
        """``(P, gather, scatter)``: the width of the ``[N, P]`` grid of the packed tokens, the packed
        index of each grid cell (short rows repeat their last token) and the grid cell of each packed
        token; both ``None`` when every row has ``P`` tokens."""

        def make():
            if isinstance(self.variants, int):
                return self.variants, None, None
            counts = self.variants
            width = int(counts.max())
            starts = torch.cumsum(counts, 0) - counts
            offsets = torch.arange(width, device=counts.device)
            gather = starts[:, None] + torch.minimum(offsets[None, :], counts[:, None] - 1)
            row = torch.repeat_interleave(torch.arange(len(counts), device=counts.device), counts)
            scatter = row * width + torch.arange(len(row), device=counts.device) - starts[row]
            return width, gather.reshape(-1), scatter

        return self._once("layout", make)

    def row_of_token(self) -> torch.Tensor:
        """``[T]`` cache row of each packed token."""

        def make():
            counts = self.variants
            if isinstance(counts, int):
                rows = len(self.slots) // counts
                counts = torch.full((rows,), counts, dtype=torch.long, device=self.slots.device)
            pass_rows = torch.repeat_interleave(torch.arange(len(counts), device=counts.device), counts)
            return pass_rows if self.rows is None else self.rows[pass_rows]

        return self._once("row_of_token", make)

    def steers(self, layer: int) -> bool:
        """Whether any token of the pass scales the instruction keys in ``layer``."""
        return self._once(("steers", layer), lambda: self.steer is not None and bool(self.steer[:, :, layer].any()))

    def _pass_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor if self.rows is None else tensor[self.rows]

    def _grid_slots(self) -> torch.Tensor:
        """``[N, P]`` slot of each grid cell."""

        def make():
            width, gather, _ = self.layout()
            return (self.slots if gather is None else self.slots[gather]).view(-1, width)

        return self._once("grid_slots", make)

    def mask(self, layer: int, sliding_window: int | None) -> torch.Tensor:
        """``[N, 1, P, length + 1 + P (+ S)]`` bool over the keys of :meth:`KVCache.with_scratch`: each
        token sees its row's slots from the padding to before its own, its own key, and, in the layers
        it steers, the scaled instruction keys in place of the originals (sliding windows apply)."""
        base = self._once(("visible", sliding_window), lambda: self._visible(sliding_window))
        if not self.steers(layer):
            return base
        steered = self.steer[:, :, layer, None]
        span_seen = self._once(("span_seen", sliding_window), lambda: self._span_seen(sliding_window)) & steered
        self.reaches[layer] = span_seen.any(dim=-1)
        hidden = torch.zeros_like(base[:, 0])
        hidden[..., : self.length] = self.span()[:, None, :] & steered
        return torch.cat([base[:, 0] & ~hidden, span_seen], dim=-1)[:, None]

    def _visible(self, sliding_window: int | None) -> torch.Tensor:
        """``[N, 1, P, length + 1 + P]``: the cached slots each token reads, then its own key."""
        pad = self._pass_rows(self.cache.pad)
        slots = self._grid_slots()
        slot_ids = torch.arange(self.length + 1, device=pad.device)
        visible = _readable(slot_ids, pad[:, None, None], slots[:, :, None], sliding_window)
        own = torch.eye(slots.shape[1], dtype=torch.bool, device=pad.device).expand(len(pad), -1, -1)
        return torch.cat([visible, own], dim=-1)[:, None]

    def _span_seen(self, sliding_window: int | None) -> torch.Tensor:
        """``[N, P, S]``: the instruction keys each token would read (a steered token reads their scaled copies)."""
        pad, valid = self._pass_rows(self.cache.pad), self._pass_rows(self.cache.span_valid)
        span_slots, slots = self._pass_rows(self.cache.span_slots)[:, None, :], self._grid_slots()[:, :, None]
        return valid[:, None, :] & _readable(span_slots, pad[:, None, None], slots, sliding_window)

    def raw_mask(self, sliding_window: int | None) -> torch.Tensor:
        """``[N, 1, 1, length + 1]`` bool for :attr:`raw_only` passes: slots from the padding to the token's own."""

        def make():
            slot_ids = torch.arange(self.length + 1, device=self.slots.device)
            slots = self.slots[:, None]
            visible = _readable(slot_ids, self.cache.pad[:, None], slots, sliding_window) | (slot_ids == slots)
            return visible[:, None, None, :]

        return self._once(("raw_mask", sliding_window), make)

    def span(self) -> torch.Tensor:
        """``[N, length]`` bool: which of the readable slots hold instruction tokens."""
        return self._once("span", lambda: self._pass_rows(self.cache.span)[:, : self.length])


def _readable(
    slot_ids: torch.Tensor, pad: torch.Tensor, slots: torch.Tensor, sliding_window: int | None
) -> torch.Tensor:
    """Bool, broadcast: which cached ``slot_ids`` a token at ``slots`` reads: from its row's padding to
    before its own slot, and within the sliding window if the layer has one."""
    visible = (slot_ids >= pad) & (slot_ids < slots)
    if sliding_window is not None:  # HF's window keeps keys at distance < window from the query
        visible = visible & (slot_ids > slots - sliding_window)
    return visible


def directer_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    directer_pass: ForwardPass | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """Attention for the engine's passes; signature of ``transformers``' attention interface."""
    if directer_pass is None:
        raise RuntimeError("the 'directer' attention runs only inside the directer engine")
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    layer = module.layer_idx
    if directer_pass.prefill:
        return _prefill(directer_pass, layer, query, key, value, scaling, sliding_window, softcap), None
    return _decode(directer_pass, layer, query, key, value, scaling, sliding_window, softcap), None


def _prefill(
    fp: ForwardPass,
    layer: int,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scaling: float,
    sliding_window: int | None,
    softcap: float | None,
) -> torch.Tensor:
    """Causal attention over the (left-padded) prompt, writing its keys and values to the cache."""
    fp.cache.write_prompt(layer, key, value)
    length = query.shape[2]
    slots = torch.arange(length, device=query.device)
    allowed = slots[None, :] <= slots[:, None]
    if sliding_window is not None:
        allowed = allowed & (slots[:, None] - slots[None, :] < sliding_window)
    allowed = allowed[None] & (slots[None, :] >= fp.cache.pad[:, None])[:, None, :]
    allowed = allowed | torch.eye(length, dtype=torch.bool, device=query.device)[None]  # pad rows
    out = _attend(query, key, value, allowed[:, None], scaling, softcap)
    return out.transpose(1, 2).contiguous()


def _to_grid(fp: ForwardPass, x: torch.Tensor) -> torch.Tensor:
    """Packed ``[1, heads, T, dim]`` -> ``[N, heads, P, dim]``."""
    width, gather, _ = fp.layout()
    packed = x[0] if gather is None else x[0][:, gather]
    return packed.view(x.shape[1], -1, width, x.shape[3]).transpose(0, 1)


def _from_grid(fp: ForwardPass, out: torch.Tensor) -> torch.Tensor:
    """``[N, heads, P, dim]`` -> packed ``[1, T, heads, dim]``."""
    rows, heads, width, dim = out.shape
    flat = out.transpose(1, 2).reshape(rows * width, heads, dim)
    _, _, scatter = fp.layout()
    return (flat if scatter is None else flat[scatter])[None]


def _decode(
    fp: ForwardPass,
    layer: int,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scaling: float,
    sliding_window: int | None,
    softcap: float | None,
) -> torch.Tensor:
    """Every token of the pass: attend to its row's cached slots before its slot, plus its own key."""
    cache = fp.cache
    if fp.write is not None:
        writers = fp._once("writers", lambda: fp.write.nonzero().squeeze(1))
        if writers.numel():
            new_k, new_v = key[0, :, writers].transpose(0, 1), value[0, :, writers].transpose(0, 1)
            cache.write_tokens(layer, fp.row_of_token()[writers], fp.slots[writers], new_k, new_v)
    if fp.stash is not None:
        kept = fp._once("stashers", lambda: fp.stash.nonzero().squeeze(1))
        fp.stashed[layer] = (key[0, :, kept].transpose(0, 1), value[0, :, kept].transpose(0, 1))
    if fp.raw_only:
        length = fp.length + 1
        keys, values = cache.keys[layer][:, :, :length], cache.values[layer][:, :, :length]
        out = _attend(query[0].transpose(0, 1)[:, :, None], keys, values, fp.raw_mask(sliding_window), scaling, softcap)
        return out.transpose(1, 2).reshape(1, -1, query.shape[1], query.shape[3])
    own_key, own_value = _to_grid(fp, key), _to_grid(fp, value)
    keys, values = cache.with_scratch(layer, fp.rows, fp.length + 1, own_key, own_value, fp.steers(layer))
    fused = query.device.type != "cpu"
    out = _attend(_to_grid(fp, query), keys, values, fp.mask(layer, sliding_window), scaling, softcap, fused)
    return _from_grid(fp, out)


def _attend(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    scaling: float,
    softcap: float | None,
    fused: bool = True,
) -> torch.Tensor:
    """Masked attention ``[N, heads, P, dim]`` over ``keys``/``values`` ``[N, kv_heads, K, dim]``: one SDPA
    call when ``fused`` and the model does not soft-cap its logits, else the product written out with
    the query heads of each key head folded together (faster on a CPU for a few queries per row)."""
    rows, heads, width, dim = query.shape
    kv_heads = keys.shape[1]
    groups = heads // kv_heads
    if fused and softcap is None:
        return F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scaling, enable_gqa=groups > 1)
    grouped = query.reshape(rows, kv_heads, groups * width, dim)
    scores = torch.matmul(grouped, keys.transpose(2, 3)).view(rows, heads, width, -1) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    bias = torch.zeros(mask.shape, dtype=scores.dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
    probs = torch.softmax(scores + bias, dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(probs.view(rows, kv_heads, groups * width, -1), values)
    return out.view(rows, heads, width, dim)


AttentionInterface.register(ATTENTION_NAME, directer_attention)


@contextlib.contextmanager
def engine_attention(model: PreTrainedModel) -> Iterator[None]:
    """Route the model's attention through :func:`directer_attention` for the duration."""
    config = model.config
    previous = config._attn_implementation
    config._attn_implementation = ATTENTION_NAME
    try:
        yield
    finally:
        config._attn_implementation = previous
